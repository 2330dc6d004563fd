// Reduction kernels: dst[i] = op(dst[i], src[i]) for `count` elements of `dtype`. Plain loops the compiler
// vectorises; f16 and bf16 compute in float and round to nearest even.
#pragma once

#include <aikido/types.hpp>
#include <cstddef>

namespace aikido::detail {

/// dst and src must not overlap. `mean` reduces as a sum (divide_by_count finishes it).
void reduce_into(DType dtype, ReduceOp op, void* dst, const void* src, std::size_t count);

/// dst[i] = op(a[i], b[i]): a copy of `a` followed by reduce_into(dst, b) in one pass (bitwise the same result).
/// dst must overlap neither input.
void reduce_pair(DType dtype, ReduceOp op, void* dst, const void* a, const void* b, std::size_t count);

/// dst[i] /= divisor (integer division for integer types): the last step of ReduceOp::mean.
void divide_by_count(DType dtype, void* dst, std::size_t count, int divisor);

/// The sum of the squares of `count` floats (16 float lanes, added up in double at the end).
double sum_of_squares(const float* data, std::size_t count);
/// dst = src (not overlapping), returning what sum_of_squares(src, count) returns: a copy and a norm in one pass.
double copy_sum_of_squares(float* dst, const float* src, std::size_t count);

}  // namespace aikido::detail
