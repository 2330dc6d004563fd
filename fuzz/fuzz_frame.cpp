// Frame header and name validation (transport/frame.hpp): the first bytes a receiver reads from a data connection
// after the handshake. Bytes: a 64-byte header, then the name it announces.
#include <cstring>

#include "fuzz.hpp"
#include "transport/frame.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  transport::FrameHeader header;
  if (size < sizeof header) return 0;
  std::memcpy(&header, data, sizeof header);
  const std::string_view rest = fuzz::as_text(data + sizeof header, size - sizeof header);
  for (const int peer : {header.source, 0, 3}) {
    bool valid = false;
    fuzz::expect_only_aikido_errors([&] {
      transport::validate_header(header, peer);
      valid = true;
    });
    if (!valid) continue;
    // What the receiver may then rely on: caps that bound what it allocates and reads.
    fuzz::require(header.name_bytes <= transport::kMaxNameBytes, "a valid header's name is within the cap");
    fuzz::require(header.payload_bytes <= transport::kMaxPayloadBytes, "a valid header's payload is within the cap");
    fuzz::require(header.source == peer, "a valid header comes from the connection's peer");
    fuzz::require(std::strcmp(transport::frame_type_name(header.type), "unknown") != 0, "a valid type has a name");
    const std::string name(rest.substr(0, std::min<std::size_t>(rest.size(), header.name_bytes)));
    fuzz::require(name.size() <= transport::kMaxNameBytes, "a name read is within the cap");
  }
  return 0;
}
