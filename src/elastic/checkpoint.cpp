#include "elastic/checkpoint.hpp"

#include <cstring>

#include "base/bytes.hpp"
#include "base/error.hpp"

namespace aikido::elastic {

CheckpointContents decode_checkpoint(std::span<const std::byte> bytes, const std::string& what) {
  using detail::str_cat;
  if (bytes.size() < kCheckpointMagic.size() ||
      std::memcmp(bytes.data(), kCheckpointMagic.data(), kCheckpointMagic.size()) != 0) {
    throw ConfigError(str_cat(what, " is not an Aikido checkpoint (aikido-run --checkpoint writes them)"));
  }
  detail::ByteReader r(bytes.subspan(kCheckpointMagic.size()), what);
  CheckpointContents contents;
  try {
    contents.commit = r.get<std::uint64_t>();
    const auto count = r.get<std::uint64_t>();
    // Each entry takes at least its two lengths: a count beyond that is damage, found before any allocation.
    if (count > r.remaining() / 16) throw ProtocolError(what);
    for (std::uint64_t i = 0; i < count; ++i) {
      contents.names.push_back(r.get_string());
      contents.values.push_back(r.get_bytes());
    }
    if (r.remaining() > 0) {
      if (r.get<std::array<char, 4>>() != kCheckpointStepTag) throw ProtocolError(what);
      contents.step = r.get<std::int64_t>();
    }
    r.finish();
  } catch (const ProtocolError&) {
    throw ConfigError(str_cat(what, " is truncated or damaged"));
  }
  return contents;
}

}  // namespace aikido::elastic
