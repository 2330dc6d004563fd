// Store protocol responses as a client reads them (runtime/store_protocol.hpp, client side). The first byte picks the
// request the response answers.
#include "fuzz.hpp"
#include "runtime/store_protocol.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  namespace sp = store_protocol;
  if (size < 1) return 0;
  const auto op = sp::Op(1 + data[0] % 4);
  sp::MemorySource source(fuzz::as_text(data + 1, size - 1));
  fuzz::expect_only_aikido_errors([&] {
    const auto value = sp::read_response(source, op);
    fuzz::require(!value || value->size() <= sp::kMaxValueBytes, "value within its cap");
    fuzz::require(op != sp::Op::set || (value && value->empty()), "a set is answered ok, without a value");
  });
  return 0;
}
