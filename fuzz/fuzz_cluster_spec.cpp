// The ClusterSpec text encoding (aikido/cluster_spec.hpp) and the proposals membership stores keep
// (elastic/proposal.hpp). What decodes must encode to text that decodes to the same spec.
#include <aikido/cluster_spec.hpp>
#include <optional>

#include "elastic/proposal.hpp"
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  const std::string_view text = fuzz::as_text(data, size);
  std::optional<ClusterSpec> spec;
  fuzz::expect_only_aikido_errors([&] { spec = ClusterSpec::decode(text); });
  if (spec) {
    spec->describe();
    // Outside the catch: what decoded once must encode to text that decodes, to the same spec.
    try {
      fuzz::require(ClusterSpec::decode(spec->encode()) == *spec, "decode(encode(spec)) == spec");
    } catch (const Error& e) {
      std::fprintf(stderr, "%s\n", e.what());
      fuzz::require(false, "the encoding of a decoded spec decodes");
    }
  }
  std::optional<ClusterSpec> proposal;
  fuzz::expect_only_aikido_errors([&] { proposal = elastic::decode_proposal(text); });
  if (proposal) {
    try {
      fuzz::require(elastic::decode_proposal(elastic::encode_proposal(*proposal)) == *proposal, "proposal round trip");
    } catch (const Error& e) {
      std::fprintf(stderr, "%s\n", e.what());
      fuzz::require(false, "the encoding of a decoded proposal decodes");
    }
  }
  return 0;
}
