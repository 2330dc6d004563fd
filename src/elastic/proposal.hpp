// The text of a proposed ClusterSpec as membership stores keep it: a random token line, then ClusterSpec::encode().
// The token makes every proposal's text unique, so that a proposer whose compare-and-set answer was lost (or that
// raced an identical proposal) can tell its own proposal from another by reading the key back.
#pragma once

#include <aikido/cluster_spec.hpp>
#include <string>
#include <string_view>

namespace aikido::elastic {

std::string encode_proposal(const ClusterSpec& spec);
/// Throws like ClusterSpec::decode.
ClusterSpec decode_proposal(std::string_view text);

}  // namespace aikido::elastic
