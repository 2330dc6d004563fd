#include "base/reduce.hpp"

#include <algorithm>
#include <cstdint>

#include "base/error.hpp"

namespace aikido::detail {
namespace {

struct Sum {
  template <class T>
  T operator()(T a, T b) const {
    return T(a + b);
  }
};
struct Min {
  template <class T>
  T operator()(T a, T b) const {
    return std::min(a, b);
  }
};
struct Max {
  template <class T>
  T operator()(T a, T b) const {
    return std::max(a, b);
  }
};
struct Prod {
  template <class T>
  T operator()(T a, T b) const {
    return T(a * b);
  }
};

template <class T, class Op>
void apply(void* dst, const void* src, std::size_t count, Op op) {
  T* __restrict d = static_cast<T*>(dst);
  const T* __restrict s = static_cast<const T*>(src);
  for (std::size_t i = 0; i < count; ++i) d[i] = op(d[i], s[i]);
}

// Half types: convert blocks to float, reduce, convert back, so the float loop vectorises.
template <class H, class Op>
void apply_half(void* dst, const void* src, std::size_t count, Op op) {
  H* d = static_cast<H*>(dst);
  const H* s = static_cast<const H*>(src);
  constexpr std::size_t kBlock = 256;
  float a[kBlock], b[kBlock];
  for (std::size_t base = 0; base < count; base += kBlock) {
    const std::size_t n = std::min(kBlock, count - base);
    for (std::size_t i = 0; i < n; ++i) a[i] = float(d[base + i]);
    for (std::size_t i = 0; i < n; ++i) b[i] = float(s[base + i]);
    for (std::size_t i = 0; i < n; ++i) a[i] = op(a[i], b[i]);
    for (std::size_t i = 0; i < n; ++i) d[base + i] = H(a[i]);
  }
}

template <class Op>
void dispatch(DType dtype, void* dst, const void* src, std::size_t count, Op op) {
  switch (dtype) {
    case DType::f32:
      return apply<float>(dst, src, count, op);
    case DType::f64:
      return apply<double>(dst, src, count, op);
    case DType::i32:
      return apply<std::int32_t>(dst, src, count, op);
    case DType::i64:
      return apply<std::int64_t>(dst, src, count, op);
    case DType::u8:
      return apply<std::uint8_t>(dst, src, count, op);
    case DType::f16:
      return apply_half<float16>(dst, src, count, op);
    case DType::bf16:
      return apply_half<bfloat16>(dst, src, count, op);
  }
  throw Error(str_cat("reduce: unknown element type code ", int(dtype)));
}

template <class T>
void divide(void* dst, std::size_t count, int divisor) {
  T* d = static_cast<T*>(dst);
  if constexpr (std::is_floating_point_v<T>) {
    // Division keeps results exact where they are representable; a multiply by 1/n would not.
    for (std::size_t i = 0; i < count; ++i) d[i] = d[i] / T(divisor);
  } else {
    for (std::size_t i = 0; i < count; ++i) d[i] = T(d[i] / T(divisor));
  }
}

template <class H>
void divide_half(void* dst, std::size_t count, int divisor) {
  H* d = static_cast<H*>(dst);
  for (std::size_t i = 0; i < count; ++i) d[i] = H(float(d[i]) / float(divisor));
}

}  // namespace

void reduce_into(DType dtype, ReduceOp op, void* dst, const void* src, std::size_t count) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::mean:
      return dispatch(dtype, dst, src, count, Sum{});
    case ReduceOp::min:
      return dispatch(dtype, dst, src, count, Min{});
    case ReduceOp::max:
      return dispatch(dtype, dst, src, count, Max{});
    case ReduceOp::prod:
      return dispatch(dtype, dst, src, count, Prod{});
  }
  throw Error(str_cat("reduce: unknown operation code ", int(op)));
}

void divide_by_count(DType dtype, void* dst, std::size_t count, int divisor) {
  switch (dtype) {
    case DType::f32:
      return divide<float>(dst, count, divisor);
    case DType::f64:
      return divide<double>(dst, count, divisor);
    case DType::i32:
      return divide<std::int32_t>(dst, count, divisor);
    case DType::i64:
      return divide<std::int64_t>(dst, count, divisor);
    case DType::u8:
      return divide<std::uint8_t>(dst, count, divisor);
    case DType::f16:
      return divide_half<float16>(dst, count, divisor);
    case DType::bf16:
      return divide_half<bfloat16>(dst, count, divisor);
  }
}

}  // namespace aikido::detail
