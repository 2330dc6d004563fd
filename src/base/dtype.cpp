#include <aikido/types.hpp>
#include <string>

#include "base/error.hpp"
#include "base/half.hpp"
#include "base/parse_name.hpp"

namespace aikido {

float16::float16(float value) : bits(detail::float_to_half_bits(value)) {}

float16::operator float() const { return detail::half_bits_to_float(bits); }

bfloat16::bfloat16(float value) : bits(detail::float_to_bfloat16_bits(value)) {}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return 4;
    case DType::f64:
      return 8;
    case DType::f16:
      return 2;
    case DType::bf16:
      return 2;
    case DType::i32:
      return 4;
    case DType::i64:
      return 8;
    case DType::u8:
      return 1;
  }
  throw ProtocolError(detail::str_cat("unknown element type code ", int(dtype)));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "f32";
    case DType::f64:
      return "f64";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::i32:
      return "i32";
    case DType::i64:
      return "i64";
    case DType::u8:
      return "u8";
  }
  return "unknown";
}

DType parse_dtype(std::string_view name) {
  return detail::parse_name(name, {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i32, DType::i64, DType::u8},
                            dtype_name, "element type");
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return "sum";
    case ReduceOp::min:
      return "min";
    case ReduceOp::max:
      return "max";
    case ReduceOp::prod:
      return "prod";
    case ReduceOp::mean:
      return "mean";
  }
  return "unknown";
}

const char* topology_name(Topology topology) {
  switch (topology) {
    case Topology::ring:
      return "ring";
    case Topology::tree:
      return "tree";
    case Topology::star:
      return "star";
    case Topology::hierarchical:
      return "hierarchical";
    case Topology::multi_ring:
      return "multi-ring";
    case Topology::automatic:
      return "auto";
  }
  return "unknown";
}

Topology parse_topology(std::string_view name) {
  if (name == "multi_ring") return Topology::multi_ring;  // the enumerator's spelling
  return detail::parse_name(name,
                            {Topology::ring, Topology::tree, Topology::star, Topology::hierarchical,
                             Topology::multi_ring, Topology::automatic},
                            topology_name, "topology");
}

}  // namespace aikido
