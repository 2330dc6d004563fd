// aikido-run's command line (NUL-separated words after argv[0]): parse_options either returns options or throws
// UsageError.
#include "fuzz.hpp"
#include "options.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  auto words = fuzz::split_words(fuzz::as_text(data, size));
  words.insert(words.begin(), "aikido-run");
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  argv.push_back(nullptr);
  try {
    const run::Options options = run::parse_options(int(words.size()), argv.data());
    fuzz::require(options.help || !options.argv.empty(), "options without --help name a program");
  } catch (const run::UsageError&) {
  } catch (const aikido::Error&) {
  }
  return 0;
}
