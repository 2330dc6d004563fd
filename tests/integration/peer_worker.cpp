// A worker for peer_process_test, run under aikido-run; it uses only the public API.
//
//   allreduce N   allreduce (sum) of N rank-dependent floats, a few times under one name, checked against the
//                 closed form; prints "OK"
//   collectives N broadcast, allgather, reduce-scatter, gather, barrier, consensus and the model store, N elements
//                 each, checked against closed forms; prints "OK"
//   crash R       after one successful allreduce rank R kills itself (SIGKILL); the others run another allreduce,
//                 which must fail: they print the error's type and message, hold their session 1.5 s, exit 3
//   hang R        after one successful allreduce rank R stops itself (SIGSTOP); the others must get an error
//                 within AIKIDO_TIMEOUT, print it, hold their session 1.5 s and exit 3
//   leave R       after one successful allreduce rank R closes its session and exits 0; the others post an
//                 allreduce and a barrier, each of which must fail with PeerLostError at once: they print each
//                 error, hold their session 1.5 s and exit 3
//   absent R      after one successful allreduce rank R runs no collective until it is stopped; the others post an
//                 allreduce, which must fail with TimeoutError: they print it, hold their session 1.5 s and exit 3
//   mismatch      rank 1 posts a collective with another size; every rank must catch MismatchError, print it,
//                 hold its session 1.5 s and exit 0
//
// Exit statuses: 0 success, 1 wrong result, 3 expected error caught, 4 unexpected error, 5 no error where one was
// expected, 64 bad usage.
#include <signal.h>
#include <unistd.h>

#include <aikido/aikido.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr std::size_t kFaultCount = 1 << 12;
// Less than aikido-run's grace period (3 s), so that survivors exit on their own.
constexpr auto kHoldAfterError = std::chrono::milliseconds(1500);

void say(const aikido::Peer& peer, const std::string& message) {
  std::printf("rank %d: %s\n", peer.rank(), message.c_str());
  std::fflush(stdout);
}

// x[i] = (rank + 1) * (i % 7 + 1): small integers, so the float sum is exact. The sum over ranks is
// (i % 7 + 1) * size * (size + 1) / 2.
std::vector<float> input(int rank, std::size_t count) {
  std::vector<float> x(count);
  for (std::size_t i = 0; i < count; ++i) x[i] = float((rank + 1) * int(i % 7 + 1));
  return x;
}

bool check_sum(const aikido::Peer& peer, const std::vector<float>& y) {
  const int size = peer.size();
  for (std::size_t i = 0; i < y.size(); ++i) {
    const float expected = float(int(i % 7 + 1) * size * (size + 1) / 2);
    if (y[i] != expected) {
      say(peer, "WRONG: element " + std::to_string(i) + " is " + std::to_string(y[i]) + ", expected " +
                    std::to_string(expected));
      return false;
    }
  }
  return true;
}

bool allreduce_once(aikido::Peer& peer, std::size_t count, const char* name) {
  const std::vector<float> x = input(peer.rank(), count);
  std::vector<float> y(count, -1.0f);
  peer.allreduce(std::span<const float>(x), std::span<float>(y), aikido::ReduceOp::sum, name);
  return check_sum(peer, y);
}

int mode_allreduce(aikido::Peer& peer, std::size_t count) {
  // The same name several times: occurrences match step by step.
  for (int step = 0; step < 3; ++step) {
    if (!allreduce_once(peer, count, "grad/fc1")) return 1;
  }
  // In place.
  std::vector<float> buffer = input(peer.rank(), count);
  peer.allreduce(std::span<float>(buffer), aikido::ReduceOp::sum, "grad/fc1/in-place");
  if (!check_sum(peer, buffer)) return 1;
  say(peer, "OK");
  return 0;
}

// Rank `faulty` fails with `fault` after a first allreduce; the others must see their next allreduce fail.
int mode_fault(aikido::Peer& peer, int faulty, int fault) {
  if (faulty < 0 || faulty >= peer.size()) return 64;
  // aikido-run stops the job as soon as the faulty rank dies: the others keep running until they have reported
  // their own error (the launcher follows up with SIGKILL after its grace period).
  if (peer.rank() != faulty) ::signal(SIGTERM, SIG_IGN);
  if (!allreduce_once(peer, kFaultCount, "warmup")) return 1;
  say(peer, "warmup ok");
  if (peer.rank() == faulty) {
    ::raise(fault);
    say(peer, "continued after the fault");  // SIGSTOP: only once aikido-run stops the job
    return 0;
  }
  int status = 5;
  try {
    allreduce_once(peer, kFaultCount, "after-fault");
    say(peer, "no error although rank " + std::to_string(faulty) + " is gone");
  } catch (const aikido::PeerLostError& e) {
    say(peer, std::string("PeerLostError: ") + e.what());
    status = 3;
  } catch (const aikido::TimeoutError& e) {
    say(peer, std::string("TimeoutError: ") + e.what());
    status = 3;
  } catch (const aikido::Error& e) {
    say(peer, std::string("unexpected aikido::Error: ") + e.what());
    status = 4;
  }
  // Keep this session open a while, so that every survivor reports what it sees of the fault itself, not this
  // rank's exit (which would make the others' errors name this rank instead of the faulty one).
  std::this_thread::sleep_for(kHoldAfterError);
  return status;
}

// Prints how `post` ended ("NAME PeerLostError: ..."); true when it failed with PeerLostError.
bool expect_lost(const aikido::Peer& peer, const char* name, const std::function<void()>& post) {
  try {
    post();
    say(peer, std::string(name) + " completed although a rank left");
  } catch (const aikido::PeerLostError& e) {
    say(peer, std::string(name) + " PeerLostError: " + e.what());
    return true;
  } catch (const aikido::TimeoutError& e) {
    say(peer, std::string(name) + " TimeoutError: " + e.what());
  } catch (const aikido::Error& e) {
    say(peer, std::string(name) + " unexpected aikido::Error: " + e.what());
  }
  return false;
}

// Rank `leaver` closes its session after a first allreduce and exits 0; the others' allreduce and barrier must fail
// at once with PeerLostError naming it. Each holds its session after its errors (as in mode_fault), so a survivor that
// waited for another survivor instead would report that one's leaving, not the leaver's.
int mode_leave(aikido::Peer& peer, int leaver) {
  if (leaver < 0 || leaver >= peer.size()) return 64;
  if (!allreduce_once(peer, kFaultCount, "warmup")) return 1;
  say(peer, "warmup ok");
  if (peer.rank() == leaver) {
    aikido::Peer gone = std::move(peer);
    return 0;
  }
  bool lost = expect_lost(peer, "allreduce", [&] { allreduce_once(peer, kFaultCount, "after-leave"); });
  lost = expect_lost(peer, "barrier", [&] { peer.barrier("after-leave"); }) && lost;
  std::this_thread::sleep_for(kHoldAfterError);
  return lost ? 3 : 4;
}

// Rank `absent` stays in no collective (until aikido-run stops the job once a survivor has exited); the others'
// allreduce must time out, after a stall report, naming it.
int mode_absent(aikido::Peer& peer, int absent) {
  if (absent < 0 || absent >= peer.size()) return 64;
  if (peer.rank() != absent) ::signal(SIGTERM, SIG_IGN);  // as in mode_fault: every survivor reports
  if (!allreduce_once(peer, kFaultCount, "warmup")) return 1;
  say(peer, "warmup ok");
  if (peer.rank() == absent) {
    for (;;) ::pause();
  }
  int status = 5;
  try {
    allreduce_once(peer, kFaultCount, "after-absent");
    say(peer, "no error although rank " + std::to_string(absent) + " did not post");
  } catch (const aikido::TimeoutError& e) {
    say(peer, std::string("TimeoutError: ") + e.what());
    status = 3;
  } catch (const aikido::Error& e) {
    say(peer, std::string("unexpected aikido::Error: ") + e.what());
    status = 4;
  }
  std::this_thread::sleep_for(kHoldAfterError);
  return status;
}

int mode_mismatch(aikido::Peer& peer) {
  const std::size_t count = peer.rank() == 1 ? 1001 : 1000;
  std::vector<float> x(count, 1.0f), y(count);
  int status = 5;
  try {
    peer.allreduce(std::span<const float>(x), std::span<float>(y), aikido::ReduceOp::sum, "grad/mismatched");
    say(peer, "no error although rank 1 posted another size");
  } catch (const aikido::MismatchError& e) {
    say(peer, std::string("MismatchError: ") + e.what());
    status = 0;
  } catch (const aikido::Error& e) {
    say(peer, std::string("unexpected aikido::Error: ") + e.what());
    status = 4;
  }
  std::this_thread::sleep_for(kHoldAfterError);  // as in mode_fault: let every rank see the mismatch itself
  return status;
}

// Every other collective and the model store, `count` elements each, with rank-dependent inputs whose results are
// known in closed form; prints "OK" (or "WRONG: ..." and exits 1).
int mode_collectives(aikido::Peer& peer, std::size_t count) {
  const int rank = peer.rank(), size = peer.size();
  auto fail = [&](const std::string& what) {
    say(peer, "WRONG: " + what);
    return 1;
  };
  // broadcast from the last rank
  std::vector<float> b(count, float(rank));
  peer.broadcast(std::span<float>(b), size - 1, "bcast");
  for (float v : b) {
    if (v != float(size - 1)) return fail("broadcast");
  }
  // allgather: block r holds r + i % 5
  std::vector<float> mine(count), all(count * std::size_t(size));
  for (std::size_t i = 0; i < count; ++i) mine[i] = float(rank + int(i % 5));
  peer.allgather(std::span<const float>(mine), std::span<float>(all), "gather-all");
  for (int r = 0; r < size; ++r) {
    for (std::size_t i = 0; i < count; ++i) {
      if (all[std::size_t(r) * count + i] != float(r + int(i % 5))) return fail("allgather");
    }
  }
  // reduce-scatter (max): element j of block r is max over ranks of (rank + j) = size - 1 + j
  std::vector<std::int64_t> send(count * std::size_t(size)), block(count);
  for (std::size_t j = 0; j < send.size(); ++j) send[j] = std::int64_t(rank) + std::int64_t(j);
  peer.reduce_scatter(std::span<const std::int64_t>(send), std::span<std::int64_t>(block), aikido::ReduceOp::max,
                      "scatter");
  for (std::size_t i = 0; i < count; ++i) {
    if (block[i] != std::int64_t(size - 1) + std::int64_t(std::size_t(rank) * count + i)) return fail("reduce_scatter");
  }
  // gather to rank 0
  std::vector<double> g(count, double(rank) * 0.5), gathered(rank == 0 ? count * std::size_t(size) : 0);
  peer.gather(std::span<const double>(g), std::span<double>(gathered), 0, "gather");
  for (std::size_t k = 0; k < gathered.size(); ++k) {
    if (gathered[k] != double(k / count) * 0.5) return fail("gather");
  }
  peer.barrier("barrier");
  // consensus: equal bytes agree, different ones do not
  const std::string same = "same", different = "rank" + std::to_string(rank);
  if (!peer.consensus(std::as_bytes(std::span(same.data(), same.size())), "agree")) return fail("consensus (same)");
  if (size > 1 && peer.consensus(std::as_bytes(std::span(different.data(), different.size())), "disagree")) {
    return fail("consensus (different)");
  }
  // model store: every rank saves, then fetches the next rank's
  std::vector<float> model(count, float(rank) + 0.25f), fetched(count);
  peer.save("model", std::span<const float>(model));
  peer.barrier("saved");
  const int next = (rank + 1) % size;
  peer.request(next, "model", std::span<float>(fetched));
  for (float v : fetched) {
    if (v != float(next) + 0.25f) return fail("request");
  }
  peer.barrier("done");
  say(peer, "OK");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const std::string arg = argc > 2 ? argv[2] : "";
  try {
    aikido::Peer peer = aikido::Peer::from_env();
    if (mode == "allreduce" && !arg.empty()) return mode_allreduce(peer, std::size_t(std::stoul(arg)));
    if (mode == "collectives" && !arg.empty()) return mode_collectives(peer, std::size_t(std::stoul(arg)));
    if (mode == "crash" && !arg.empty()) return mode_fault(peer, std::stoi(arg), SIGKILL);
    if (mode == "hang" && !arg.empty()) return mode_fault(peer, std::stoi(arg), SIGSTOP);
    if (mode == "leave" && !arg.empty()) return mode_leave(peer, std::stoi(arg));
    if (mode == "absent" && !arg.empty()) return mode_absent(peer, std::stoi(arg));
    if (mode == "mismatch") return mode_mismatch(peer);
  } catch (const aikido::Error& e) {
    std::printf("unexpected aikido::Error: %s\n", e.what());
    return 4;
  }
  std::fprintf(stderr,
               "usage: peer_worker allreduce N | crash RANK | hang RANK | leave RANK | absent RANK | mismatch\n");
  return 64;
}
