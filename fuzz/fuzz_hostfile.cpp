// Host lists (-H), hostfiles (--hostfile) and the host records launchers keep in etcd.
#include <optional>

#include "fuzz.hpp"
#include "launch/host_membership.hpp"
#include "launch/hostfile.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  const std::string_view text = fuzz::as_text(data, size);
  for (auto parse : {+[](std::string_view t) { return launch::parse_host_list(t); },
                     +[](std::string_view t) { return launch::parse_hostfile(t, "hostfile"); }}) {
    fuzz::expect_only_aikido_errors([&] {
      for (const auto& h : parse(text)) fuzz::require(h.slots >= 1 && !h.host.empty(), "a host with slots");
    });
  }
  std::optional<launch::HostRecord> record;
  fuzz::expect_only_aikido_errors([&] { record = launch::HostRecord::decode("h1", std::string(text)); });
  if (record) {
    try {
      fuzz::require(launch::HostRecord::decode("h1", record->encode()).encode() == record->encode(), "round trip");
    } catch (const Error& e) {
      std::fprintf(stderr, "%s\n", e.what());
      fuzz::require(false, "the encoding of a decoded host record decodes");
    }
  }
  return 0;
}
