// Shared by the fuzz targets. Each target feeds bytes that come from outside the process to one parser and accepts
// only what the parser's contract allows: a result, or an aikido::Error (ProtocolError, ConfigError, ...). Any other
// exception escapes LLVMFuzzerTestOneInput and libFuzzer reports it as a crash, as it does memory errors (ASan) and
// undefined behaviour (UBSan).
#pragma once

#include <aikido/errors.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace aikido::fuzz {

inline std::string_view as_text(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

/// Runs `parse`; an aikido::Error is the contract's answer to bad input and is swallowed.
template <class F>
void expect_only_aikido_errors(F&& parse) {
  try {
    parse();
  } catch (const aikido::Error&) {
  }
}

/// A property every input must keep (a round trip, a bound); aborts so that libFuzzer keeps the input.
inline void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz property violated: %s\n", what);
    std::abort();
  }
}

/// Splits the input at NUL bytes into command-line words (at most `max_words`).
inline std::vector<std::string> split_words(std::string_view text, std::size_t max_words = 64) {
  std::vector<std::string> words;
  std::size_t start = 0;
  while (start <= text.size() && words.size() < max_words) {
    const std::size_t end = std::min(text.find('\0', start), text.size());
    words.emplace_back(text.substr(start, end - start));
    start = end + 1;
  }
  return words;
}

}  // namespace aikido::fuzz
