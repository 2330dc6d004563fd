// Compression of what a distributed optimizer exchanges: a value that names a codec and its parameter.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace aikido {

/// How the values that workers average are encoded on the wire (DistributedOptimizerOptions::compression in the
/// LibTorch integration; policies switch it with PolicyContext::set_compression). A plain value.
///
/// - none: float32 (or the parameters' own type) as is.
/// - fp16, bf16: each value rounded to 16 bits (IEEE half or bfloat16) and averaged in that type: half the bytes.
/// - int8: each block of kInt8Block values scaled by its largest magnitude and rounded to 8 bits; the blocks and
///   scales of every worker are gathered (an 8-bit sum would overflow), so its bytes per worker grow with the
///   number of workers: fewer than fp16 below 4 workers, equal at 4, more above.
/// - topk:FRACTION: each worker sends only the `fraction` of its values with the largest magnitude (an index and a
///   value each, gathered from all workers) and keeps the rest in an error-feedback residual that is added to the
///   next step's values, so nothing is lost, only delayed (Stich et al. 2018; Lin et al. 2018).
/// - powersgd:RANK: each matrix (a weight of 2 or more dimensions, seen as rows x the product of the other
///   dimensions) is approximated by a rank-`rank` product P Q^T found by one step of power iteration that starts
///   from the last step's Q (warm start); P and Q are averaged instead of the matrix, and the approximation's error
///   is fed back into the next step (Vogels et al. 2019). Vectors (biases) and matrices too small to gain travel
///   uncompressed.
///
/// fp16, bf16 and int8 lose precision only; topk and powersgd lose nothing in the long run thanks to error feedback,
/// but change the trajectory: they need more steps to a given accuracy than uncompressed training.
struct Compression {
  enum class Kind : std::uint8_t { none, fp16, bf16, int8, topk, powersgd };
  static constexpr std::int64_t kInt8Block = 256;

  Kind kind = Kind::none;
  double fraction = 0;  // topk: share of the values sent, in (0, 1]
  int rank = 0;         // powersgd: rank of the approximation, >= 1

  static Compression none() { return {}; }
  static Compression fp16() { return {Kind::fp16, 0, 0}; }
  static Compression bf16() { return {Kind::bf16, 0, 0}; }
  static Compression int8() { return {Kind::int8, 0, 0}; }
  /// ConfigError unless 0 < fraction <= 1.
  static Compression topk(double fraction);
  /// ConfigError unless rank >= 1.
  static Compression powersgd(int rank);

  /// "none", "fp16", "bf16", "int8", "topk:FRACTION" or "powersgd:RANK". ConfigError naming the accepted forms.
  static Compression parse(std::string_view text);
  /// The form parse() reads: "none", "fp16", "topk:0.01", "powersgd:4", ...
  std::string name() const;

  /// The bytes a worker puts on the wire with this compression, as a fraction of an uncompressed float32 ring
  /// allreduce of `count` values among `workers` workers (2 (n-1)/n of the buffer each); gathers (int8, topk) send
  /// (n-1) times each worker's part. An estimate for policies: for powersgd it assumes one square matrix.
  double wire_ratio(int workers, std::int64_t count) const;

  friend bool operator==(const Compression& a, const Compression& b) {
    return a.kind == b.kind && a.fraction == b.fraction && a.rank == b.rank;
  }
};

}  // namespace aikido
