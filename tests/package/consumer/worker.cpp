// The README's first worker, built against the installed package.
#include <aikido/aikido.hpp>
#include <cstdio>

int main() {
  try {
    aikido::Peer peer = aikido::Peer::from_env();  // from aikido-run's environment; one rank when run alone
    std::vector<float> x(1 << 20, float(peer.rank())), y(x.size());
    peer.allreduce(std::span<const float>(x), std::span<float>(y), aikido::ReduceOp::sum, "grad/fc1");
    aikido::Work w =
        peer.allreduce_async(std::span<const float>(x), std::span<float>(y), aikido::ReduceOp::max, "grad/fc2");
    w.wait();  // rethrows the collective's error, if any
  } catch (const aikido::Error& e) {
    std::fprintf(stderr, "worker: %s\n", e.what());
    return 1;
  }
}
