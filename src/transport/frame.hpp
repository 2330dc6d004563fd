// Message framing on a data connection. A frame is a fixed header, then `name_bytes` bytes of collective name,
// then `payload_bytes` bytes of payload. The header is validated (magic, type, caps) before any byte of name or
// payload is read, and the payload length is checked against what the receiver expects before it is read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace aikido::transport {

inline constexpr std::uint32_t kFrameMagic = 0x414b4446;  // "AKDF"
inline constexpr std::size_t kMaxNameBytes = 1024;
/// Upper bound on any payload; real limits are tighter (the posted buffer, or the eager limit when nothing is
/// posted yet).
inline constexpr std::uint64_t kMaxPayloadBytes = std::uint64_t(1) << 40;

enum class FrameType : std::uint8_t {
  data = 1,         // a segment of a collective
  ready = 2,        // the sender has posted (name, seq): large segments may flow to it
  abort = 3,        // (name, seq) failed on the sender; the payload is the error text
  stall_query = 4,  // has the receiver posted (name, seq), and what is it waiting in? `tag`: the collective's path
  stall_reply = 5,  // answer: `root` holds 1 when posted, the payload what it waits in (text); `tag` as asked
  p2p_request = 6,  // send me your saved buffer `name`; `seq` is the request id, `count`/`dtype` what I expect
  p2p_reply = 7,    // answer to a p2p_request: `root` holds the status, payload the data or the error text
  goodbye = 8,      // the sender closes its session on purpose
};

/// Error kinds carried by abort and p2p_reply frames.
enum class WireError : std::uint8_t { none = 0, mismatch = 1, lost = 2, timeout = 3, config = 4, other = 5 };

#pragma pack(push, 1)
struct FrameHeader {  // every field at its natural alignment
  std::uint64_t cluster_version = 0;
  std::uint64_t seq = 0;    // occurrence of `name` on the sender
  std::uint64_t tag = 0;    // which message of the collective's plan
  std::uint64_t count = 0;  // element count of the collective (signature)
  std::uint64_t payload_bytes = 0;
  std::uint32_t magic = kFrameMagic;
  std::int32_t source = 0;  // sender's rank
  std::int32_t root = 0;    // root rank (signature); status for replies
  std::uint32_t name_bytes = 0;
  FrameType type = FrameType::data;
  std::uint8_t kind = 0;      // collective kind (signature)
  std::uint8_t dtype = 0;     // element type (signature)
  std::uint8_t op = 0;        // reduce operation (signature)
  std::uint8_t topology = 0;  // topology the sender planned with (signature)
  std::uint8_t reserved[3] = {};
};
#pragma pack(pop)
static_assert(sizeof(FrameHeader) == 64);

/// Throws ProtocolError when the header cannot be a valid frame: bad magic, unknown type, name or payload over
/// the caps. `peer` names the sender in the message.
void validate_header(const FrameHeader& header, int peer);

const char* frame_type_name(FrameType type);

}  // namespace aikido::transport
