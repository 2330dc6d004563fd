// Answers of etcd's JSON gateway (elastic/etcd_client.hpp): range answers and lines of the watch stream. The first
// byte picks which.
#include "elastic/etcd_client.hpp"
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  if (size < 1) return 0;
  const std::string_view text = fuzz::as_text(data + 1, size - 1);
  const std::string_view prefix = (data[0] & 2) ? "/aikido/" : "";
  fuzz::expect_only_aikido_errors([&] {
    if (data[0] & 1) {
      std::vector<elastic::EtcdEvent> events;
      elastic::parse_watch_line(text, prefix, events);
    } else {
      elastic::parse_range_answer(text, prefix);
    }
  });
  fuzz::expect_only_aikido_errors([&] {
    const std::string decoded = elastic::base64_decode(text);
    fuzz::require(elastic::base64_decode(elastic::base64_encode(decoded)) == decoded, "base64 round trip");
  });
  return 0;
}
