// Policy specs as given on the command line (--policy NAME:key=value,...): parsed, then built.
#include <aikido/policy.hpp>

#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  const std::string_view text = fuzz::as_text(data, size);
  fuzz::expect_only_aikido_errors([&] { PolicySpec::parse(text); });
  fuzz::expect_only_aikido_errors([&] {
    const auto policy = make_policy(text);
    fuzz::require(policy != nullptr, "make_policy returns a policy or throws");
  });
  return 0;
}
