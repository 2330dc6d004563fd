// The control file aikido-run writes and aikido-ctl reads (store address, secret, job id), and the key=value words
// of the worker status records aikido-ctl prints.
#include "ctl_options.hpp"
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  const std::string text(fuzz::as_text(data, size));
  fuzz::expect_only_aikido_errors([&] {
    const ctl::Control control = ctl::parse_control(text, "control-file");
    fuzz::require(!control.store.empty() && !control.secret.empty() && !control.job.empty(), "all three fields");
  });
  ctl::read_key_values(text, ' ');
  return 0;
}
