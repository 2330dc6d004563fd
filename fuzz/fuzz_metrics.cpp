// Metrics publications as aikido-run reads them from the store: each worker's JSON (the summary line at the end of a
// job) and Prometheus text (merged into one exposition). Texts are separated by NUL bytes.
#include "fuzz.hpp"
#include "metrics_exporter.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  const auto texts = fuzz::split_words(fuzz::as_text(data, size), 8);
  for (std::size_t i = 0; i < texts.size(); ++i) run::summarize_metrics(int(i), texts[i]);
  const std::string merged = run::merge_prometheus(texts);
  fuzz::require(merged.size() <= 2 * size + 16 * texts.size(), "the merged exposition is bounded by its inputs");
  return 0;
}
