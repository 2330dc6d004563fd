// Reduction kernels: dst[i] = op(dst[i], src[i]) for `count` elements of `dtype`. Plain loops the compiler
// vectorises; f16 and bf16 compute in float and round to nearest even.
#pragma once

#include <aikido/types.hpp>
#include <cstddef>

namespace aikido::detail {

/// dst and src must not overlap. `mean` reduces as a sum (divide_by_count finishes it).
void reduce_into(DType dtype, ReduceOp op, void* dst, const void* src, std::size_t count);

/// dst[i] /= divisor (integer division for integer types): the last step of ReduceOp::mean.
void divide_by_count(DType dtype, void* dst, std::size_t count, int divisor);

}  // namespace aikido::detail
