#pragma once

#include <aikido/types.hpp>

#include <cstdint>

#include "base/error.hpp"

namespace aikido::detail {

/// Calls fn(T{}) with the C++ element type of `dtype` (float for f32, float16 for f16, ...) and returns its result:
/// the one place where a run-time element type becomes a compile-time one.
template <class Fn>
decltype(auto) visit_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32:
      return fn(float{});
    case DType::f64:
      return fn(double{});
    case DType::f16:
      return fn(float16{});
    case DType::bf16:
      return fn(bfloat16{});
    case DType::i32:
      return fn(std::int32_t{});
    case DType::i64:
      return fn(std::int64_t{});
    case DType::u8:
      return fn(std::uint8_t{});
  }
  throw ConfigError(str_cat("unsupported element type ", static_cast<int>(dtype)));
}

}  // namespace aikido::detail
