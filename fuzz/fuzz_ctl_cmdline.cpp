// aikido-ctl's command line (NUL-separated words after argv[0]).
#include <aikido/cluster_spec.hpp>

#include "ctl_options.hpp"
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  auto words = fuzz::split_words(fuzz::as_text(data, size));
  words.insert(words.begin(), "aikido-ctl");
  std::vector<const char*> argv;
  for (auto& w : words) argv.push_back(w.c_str());
  try {
    const ctl::CtlOptions o = ctl::parse_ctl_options(int(argv.size()), argv.data());
    if (!o.help) {
      fuzz::require(o.command == "status" || o.command == "resize", "a known command");
      fuzz::require(o.command != "resize" || (o.workers >= 1 && o.workers <= ClusterSpec::kMaxWorkers),
                    "resize to a valid size");
    }
  } catch (const ctl::UsageError&) {
  }
  return 0;
}
