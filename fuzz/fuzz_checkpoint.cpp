// Checkpoint files (elastic/checkpoint.hpp), as a job resuming from one reads them.
#include <span>

#include "elastic/checkpoint.hpp"
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  const auto bytes = std::as_bytes(std::span(data, size));
  fuzz::expect_only_aikido_errors([&] {
    const auto contents = elastic::decode_checkpoint(bytes, "the checkpoint under test");
    fuzz::require(contents.names.size() == contents.values.size(), "a value per name");
    for (const auto& value : contents.values) {
      fuzz::require(value.data() >= bytes.data() && value.data() + value.size() <= bytes.data() + bytes.size(),
                    "values lie inside the file");
    }
  });
  return 0;
}
