// The checkpoint file ElasticSession writes (ElasticConfig::checkpoint_path) and a job resumes from
// (ElasticConfig::resume_path). Layout, native byte order (a checkpoint is read on the machine kind that wrote it):
//
//   "AIKIDOCK"  u64 commit  u64 count  count x (u64 length, name bytes, u64 length, value bytes)  ["STEP" i64 step]
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace aikido::elastic {

inline constexpr std::array<char, 8> kCheckpointMagic = {'A', 'I', 'K', 'I', 'D', 'O', 'C', 'K'};
inline constexpr std::array<char, 4> kCheckpointStepTag = {'S', 'T', 'E', 'P'};

/// What a checkpoint holds; the values point into the bytes it was decoded from.
struct CheckpointContents {
  std::uint64_t commit = 0;
  std::vector<std::string> names;
  std::vector<std::span<const std::byte>> values;
  std::int64_t step = -1;  // -1: not recorded
};

/// Decodes a checkpoint file's bytes. `what` names the file in errors. Throws ConfigError when the bytes are not a
/// checkpoint, or are truncated or damaged; never reads outside `bytes`.
CheckpointContents decode_checkpoint(std::span<const std::byte> bytes, const std::string& what);

}  // namespace aikido::elastic
