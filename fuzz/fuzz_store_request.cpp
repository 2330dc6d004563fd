// Store protocol requests as the store server reads them (runtime/store_protocol.hpp, server side): any number of
// requests back to back.
#include "fuzz.hpp"
#include "runtime/store_protocol.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  namespace sp = store_protocol;
  sp::MemorySource source(fuzz::as_text(data, size));
  fuzz::expect_only_aikido_errors([&] {
    while (source.remaining() > 0) {
      const sp::Request request = sp::read_request(source);
      fuzz::require(request.key.size() <= sp::kMaxKeyBytes, "key within its cap");
      fuzz::require(request.value.size() <= sp::kMaxValueBytes, "value within its cap");
      fuzz::require(!request.expected || request.expected->size() <= sp::kMaxValueBytes, "expected within its cap");
      fuzz::require(request.op == sp::Op::cas || !request.expected, "only compare_and_set expects a value");
    }
  });
  return 0;
}
