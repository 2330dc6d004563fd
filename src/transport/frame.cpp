#include "transport/frame.hpp"

#include "base/error.hpp"

namespace aikido::transport {

const char* frame_type_name(FrameType type) {
  switch (type) {
    case FrameType::data:
      return "data";
    case FrameType::ready:
      return "ready";
    case FrameType::abort:
      return "abort";
    case FrameType::stall_query:
      return "stall_query";
    case FrameType::stall_reply:
      return "stall_reply";
    case FrameType::p2p_request:
      return "p2p_request";
    case FrameType::p2p_reply:
      return "p2p_reply";
    case FrameType::goodbye:
      return "goodbye";
  }
  return "unknown";
}

void validate_header(const FrameHeader& header, int peer) {
  using detail::str_cat;
  if (header.magic != kFrameMagic) {
    throw ProtocolError(str_cat("rank ", peer, " sent a frame with a bad magic number; the stream is corrupt"));
  }
  const auto type = std::uint8_t(header.type);
  if (type < std::uint8_t(FrameType::data) || type > std::uint8_t(FrameType::goodbye)) {
    throw ProtocolError(str_cat("rank ", peer, " sent a frame of unknown type ", int(type)));
  }
  if (header.name_bytes > kMaxNameBytes) {
    throw ProtocolError(
        str_cat("rank ", peer, " sent a ", header.name_bytes, "-byte name; the cap is ", kMaxNameBytes));
  }
  if (header.payload_bytes > kMaxPayloadBytes) {
    throw ProtocolError(
        str_cat("rank ", peer, " announced a ", header.payload_bytes, "-byte payload; the cap is ", kMaxPayloadBytes));
  }
  if (header.source != peer) {
    throw ProtocolError(
        str_cat("a frame on the connection of rank ", peer, " claims to come from rank ", header.source));
  }
}

}  // namespace aikido::transport
