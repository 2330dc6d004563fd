#include "base/reduce.hpp"

#include <algorithm>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "base/error.hpp"
#include "base/half.hpp"

namespace aikido::detail {
namespace {

struct Sum {
  template <class T>
  T operator()(T a, T b) const {
    if constexpr (std::is_integral_v<T>) {
      // Integer sums wrap modulo 2^bits (secure aggregation relies on it); signed overflow would be undefined.
      using U = std::make_unsigned_t<T>;
      return T(U(a) + U(b));
    } else {
      return T(a + b);
    }
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

template <class T, class Op>
void apply_pair(void* dst, const void* a, const void* b, std::size_t count, Op op) {
  T* __restrict d = static_cast<T*>(dst);
  const T* __restrict x = static_cast<const T*>(a);
  const T* __restrict y = static_cast<const T*>(b);
  for (std::size_t i = 0; i < count; ++i) d[i] = op(x[i], y[i]);
}

template <class Op>
void dispatch_pair(DType dtype, void* dst, const void* a, const void* b, std::size_t count, Op op) {
  switch (dtype) {
    case DType::f32:
      return apply_pair<float>(dst, a, b, count, op);
    case DType::f64:
      return apply_pair<double>(dst, a, b, count, op);
    case DType::i32:
      return apply_pair<std::int32_t>(dst, a, b, count, op);
    case DType::i64:
      return apply_pair<std::int64_t>(dst, a, b, count, op);
    case DType::u8:
      return apply_pair<std::uint8_t>(dst, a, b, count, op);
    case DType::f16:
    case DType::bf16:
      break;
  }
  // Half types (and anything unknown, which reduce_into rejects): copy, then reduce.
  std::memcpy(dst, a, count * dtype_size(dtype));
  return dispatch(dtype, dst, b, count, op);
}

// Half types: convert blocks to float, reduce, convert back, so the float loop vectorises.
template <float (*ToFloat)(std::uint16_t), std::uint16_t (*FromFloat)(float), class Op>
void apply_half(void* dst, const void* src, std::size_t count, Op op) {
  std::uint16_t* d = static_cast<std::uint16_t*>(dst);
  const std::uint16_t* s = static_cast<const std::uint16_t*>(src);
  constexpr std::size_t kBlock = 256;
  float a[kBlock], b[kBlock];
  for (std::size_t base = 0; base < count; base += kBlock) {
    const std::size_t n = std::min(kBlock, count - base);
    for (std::size_t i = 0; i < n; ++i) a[i] = ToFloat(d[base + i]);
    for (std::size_t i = 0; i < n; ++i) b[i] = ToFloat(s[base + i]);
    for (std::size_t i = 0; i < n; ++i) a[i] = op(a[i], b[i]);
    for (std::size_t i = 0; i < n; ++i) d[base + i] = FromFloat(a[i]);
  }
}

// With F16C (x86 CPUs since about 2012), half conversions are single instructions; they round to nearest even like
// the scalar path.
#if defined(__x86_64__)
template <class Op>
__attribute__((target("avx,f16c"))) void apply_f16c(void* dst, const void* src, std::size_t count, Op op) {
  auto* d = static_cast<std::uint16_t*>(dst);
  const auto* s = static_cast<const std::uint16_t*>(src);
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + i)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    alignas(32) float x[8], y[8];
    _mm256_store_ps(x, a);
    _mm256_store_ps(y, b);
    for (int k = 0; k < 8; ++k) x[k] = op(x[k], y[k]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_load_ps(x), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < count; ++i) d[i] = float_to_half_bits(op(half_bits_to_float(d[i]), half_bits_to_float(s[i])));
}

bool has_f16c() {
  // F16C from CPUID leaf 1 (ECX bit 29): clang does not know "f16c" as a __builtin_cpu_supports feature.
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0 && __builtin_cpu_supports("avx");
  }();
  return yes;
}
#endif

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
#if defined(__x86_64__)
      if (has_f16c()) return apply_f16c(dst, src, count, op);
#endif
      return apply_half<half_bits_to_float, float_to_half_bits>(dst, src, count, op);
    case DType::bf16:
      return apply_half<bfloat16_bits_to_float, float_to_bfloat16_bits>(dst, src, count, op);
  }
  throw Error(str_cat("reduce: unknown element type code ", int(dtype)));
}

// 1/n is exact for these, and x * (1/n) is then the same correctly rounded value as x / n, at a fraction of the cost.
bool is_power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

template <class T>
void divide(void* dst, std::size_t count, int divisor) {
  T* d = static_cast<T*>(dst);
  if constexpr (std::is_floating_point_v<T>) {
    // Division keeps results exact where they are representable; a multiply by 1/n would not, but for powers of two.
    if (is_power_of_two(divisor)) {
      const T inverse = T(1) / T(divisor);
      for (std::size_t i = 0; i < count; ++i) d[i] = d[i] * inverse;
      return;
    }
    for (std::size_t i = 0; i < count; ++i) d[i] = d[i] / T(divisor);
  } else {
    for (std::size_t i = 0; i < count; ++i) d[i] = T(d[i] / T(divisor));
  }
}

template <class H>
void divide_half(void* dst, std::size_t count, int divisor) {
  H* d = static_cast<H*>(dst);
  if (is_power_of_two(divisor)) {
    const float inverse = 1.0f / float(divisor);
    for (std::size_t i = 0; i < count; ++i) d[i] = H(float(d[i]) * inverse);
    return;
  }
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

void reduce_pair(DType dtype, ReduceOp op, void* dst, const void* a, const void* b, std::size_t count) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::mean:
      return dispatch_pair(dtype, dst, a, b, count, Sum{});
    case ReduceOp::min:
      return dispatch_pair(dtype, dst, a, b, count, Min{});
    case ReduceOp::max:
      return dispatch_pair(dtype, dst, a, b, count, Max{});
    case ReduceOp::prod:
      return dispatch_pair(dtype, dst, a, b, count, Prod{});
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

// One pass over the data: with `dst` the copy is made in the same loop. Float lanes keep the loop vectorisable
// (a single double accumulator would serialise it); the lanes are added up in double.
template <bool kCopy>
double squares_pass(float* dst, const float* src, std::size_t count) {
  constexpr std::size_t kLanes = 16;
  float acc[kLanes] = {};
  std::size_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (std::size_t j = 0; j < kLanes; ++j) {
      if constexpr (kCopy) dst[i + j] = src[i + j];
      acc[j] += src[i + j] * src[i + j];
    }
  }
  double total = 0;
  for (; i < count; ++i) {
    if constexpr (kCopy) dst[i] = src[i];
    total += double(src[i]) * src[i];
  }
  for (float a : acc) total += a;
  return total;
}

double sum_of_squares(const float* data, std::size_t count) { return squares_pass<false>(nullptr, data, count); }

double copy_sum_of_squares(float* dst, const float* src, std::size_t count) {
  return squares_pass<true>(dst, src, count);
}

}  // namespace aikido::detail
