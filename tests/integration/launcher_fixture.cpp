// A worker program for launcher_test: each mode exercises one duty of aikido-run.
//
//   env                 prints the AIKIDO_* environment it got, and one line on stderr
//   args ARGS...        prints its arguments, one per line
//   exit R CODE         rank R exits with CODE once every rank is ready; the others sleep
//   signal R SIG        rank R raises SIG once every rank is ready; the others sleep
//   exit-ignore R CODE  like exit, but the other ranks ignore SIGTERM (aikido-run must SIGKILL them)
//   sleep S             prints "ready" and sleeps S seconds
//   partial             prints a line without its newline and exits
//   lines N             prints N numbered lines as fast as it can, on stdout
//   store               rendezvous through the store of aikido-run: every rank sets a key, waits for all others
//   peer                opens a Peer from the environment (Peer::from_env) and prints "peer of N ranks"
//   tick                prints "tick" with printf, no flush, then sleeps: its line must arrive while it runs
//   affinity            prints "cpus=A,B,..." (the CPUs it may run on, from inside: sched_getaffinity)
//   hold S              ignores SIGTERM, prints "ready" and sleeps S seconds (only SIGKILL stops it early)
//   peer-hold S         opens a plain Peer (Peer::from_env), prints "ready" and sleeps S seconds: a program that
//                       never opens an ElasticSession, run under aikido-run --elastic
//   session S [hold]    opens an ElasticSession, registers a counter, prints "ready" after its first sync and
//                       commit, then syncs and commits every 20 ms for S seconds, printing "changed rank=R size=N
//                       version=V" when the cluster changed; with "hold" it ignores SIGTERM
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <aikido/aikido.hpp>
#include <aikido/elastic.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <span>
#include <thread>
#include <vector>

namespace {

std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : fallback;
}

int rank() { return std::atoi(env_or("AIKIDO_RANK", "-1").c_str()); }
int size() { return std::atoi(env_or("AIKIDO_SIZE", "-1").c_str()); }

void sleep_seconds(int seconds) { std::this_thread::sleep_for(std::chrono::seconds(seconds)); }

// The launcher reports only failures; printing "ready" lets a test know every worker has started.
void ready() {
  std::printf("ready pid=%d\n", int(::getpid()));
  std::fflush(stdout);
}

std::shared_ptr<aikido::Store> connect_store(bool tls = true) {
  return aikido::connect_tcp_store(env_or("AIKIDO_STORE_ADDR", ""), env_or("AIKIDO_SECRET", ""),
                                   std::chrono::seconds(20), tls ? aikido::TlsOptions::from_env() : aikido::TlsOptions{});
}

// Every rank contributes rank + 1 to 1000 floats over the job's connections.
int mode_allreduce() {
  aikido::Peer peer = aikido::Peer::from_env();
  std::vector<float> data(1000, float(peer.rank() + 1));
  peer.allreduce(std::span<float>(data), aikido::ReduceOp::sum, "sum");
  const float expected = float(peer.size() * (peer.size() + 1) / 2);
  for (float v : data) {
    if (v != expected) {
      std::printf("allreduce gave %g, not %g\n", double(v), double(expected));
      return 1;
    }
  }
  std::printf("allreduce ok\n");
  return 0;
}

// Reaches the store without TLS; prints why that failed.
int mode_store_plain() {
  try {
    connect_store(false)->set("plain", "1");
  } catch (const aikido::Error& e) {
    std::printf("plain store client refused: %s\n", e.what());
    return 1;
  }
  return 0;
}

// Waits until every rank has started, so that a failing rank never fails before the others exist.
void wait_for_all_ranks() {
  auto store = connect_store();
  store->set("started/" + std::to_string(rank()), "1");
  for (int r = 0; r < size(); ++r) store->wait("started/" + std::to_string(r), std::chrono::seconds(20));
}

int mode_env() {
  std::printf("rank=%s size=%s local_rank=%s local_size=%s local_cpus=%s\n", env_or("AIKIDO_RANK", "unset").c_str(),
              env_or("AIKIDO_SIZE", "unset").c_str(), env_or("AIKIDO_LOCAL_RANK", "unset").c_str(),
              env_or("AIKIDO_LOCAL_SIZE", "unset").c_str(), env_or("AIKIDO_LOCAL_CPUS", "unset").c_str());
  std::printf("host=%s store=%s secret_bytes=%zu job=%s version=%s\n", env_or("AIKIDO_HOST", "unset").c_str(),
              env_or("AIKIDO_STORE_ADDR", "unset").c_str(), env_or("AIKIDO_SECRET", "").size(),
              env_or("AIKIDO_JOB_ID", "unset").c_str(), env_or("AIKIDO_CLUSTER_VERSION", "unset").c_str());
  std::printf("topology=%s timeout=%s transport=%s segment=%s streams=%s omp=%s blas=%s malloc=%s\n",
              env_or("AIKIDO_TOPOLOGY", "unset").c_str(), env_or("AIKIDO_TIMEOUT", "unset").c_str(),
              env_or("AIKIDO_TRANSPORT", "unset").c_str(), env_or("AIKIDO_SEGMENT_BYTES", "unset").c_str(),
              env_or("AIKIDO_STREAMS", "unset").c_str(), env_or("OMP_NUM_THREADS", "unset").c_str(),
              env_or("OPENBLAS_NUM_THREADS", "unset").c_str(), env_or("GLIBC_TUNABLES", "unset").c_str());
  std::fflush(stdout);
  std::fprintf(stderr, "stderr of rank %d\n", rank());
  return 0;
}

int mode_fail(int argc, char** argv, bool others_ignore_term, bool by_signal) {
  if (argc < 4) return 64;
  const int failing = std::atoi(argv[2]);
  const int code = std::atoi(argv[3]);
  if (rank() != failing && others_ignore_term) ::signal(SIGTERM, SIG_IGN);
  ready();
  wait_for_all_ranks();
  if (rank() == failing) {
    std::printf("failing now\n");
    std::fflush(stdout);
    if (by_signal) ::raise(code);
    return code;
  }
  sleep_seconds(120);
  return 0;
}

int mode_lines(int count) {
  // One printf per line into a fully buffered stdout: lines reach the pipe in large, arbitrarily cut writes.
  for (int i = 0; i < count; ++i) std::printf("line %d %d\n", rank(), i);
  return 0;
}

int mode_store() {
  auto store = connect_store();
  store->set("hello/" + std::to_string(rank()), "from " + std::to_string(rank()));
  for (int r = 0; r < size(); ++r) {
    const std::string value = store->wait("hello/" + std::to_string(r), std::chrono::seconds(20));
    if (value != "from " + std::to_string(r)) {
      std::printf("bad value '%s' for rank %d\n", value.c_str(), r);
      return 1;
    }
  }
  std::printf("store ok\n");
  return 0;
}

int mode_affinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return 1;
  std::string cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus += (cpus.empty() ? "" : ",") + std::to_string(cpu);
  }
  std::printf("cpus=%s\n", cpus.c_str());
  return 0;
}

int mode_session(int seconds, bool hold) {
  if (hold) ::signal(SIGTERM, SIG_IGN);
  auto session = aikido::ElasticSession::from_env();
  std::int64_t step = 0;
  session->register_value("step", step);
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  bool said = false;
  while (std::chrono::steady_clock::now() < end) {
    const aikido::SyncResult result = session->sync(step);
    if (result == aikido::SyncResult::removed) return 0;
    if (result == aikido::SyncResult::changed) {
      std::printf("changed rank=%d size=%d version=%llu\n", session->rank(), session->size(),
                  static_cast<unsigned long long>(session->cluster_version()));
    }
    ++step;
    session->commit();
    if (!said) {
      ready();
      said = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: launcher_fixture MODE [ARGS...]\n");
    return 64;
  }
  const std::string mode = argv[1];
  try {
    if (mode == "env") return mode_env();
    if (mode == "args") {
      for (int i = 2; i < argc; ++i) std::printf("arg %d: %s\n", i - 1, argv[i]);
      return 0;
    }
    if (mode == "exit") return mode_fail(argc, argv, false, false);
    if (mode == "exit-ignore") return mode_fail(argc, argv, true, false);
    if (mode == "signal") return mode_fail(argc, argv, false, true);
    if (mode == "sleep" && argc >= 3) {
      ready();
      sleep_seconds(std::atoi(argv[2]));
      return 0;
    }
    if (mode == "partial") {
      std::printf("no newline");
      return 0;
    }
    if (mode == "lines" && argc >= 3) return mode_lines(std::atoi(argv[2]));
    if (mode == "store") return mode_store();
    if (mode == "allreduce") return mode_allreduce();
    if (mode == "env-store-plain") return mode_store_plain();
    if (mode == "peer") {
      aikido::Peer peer = aikido::Peer::from_env();
      std::printf("peer of %d ranks\n", peer.size());
      return 0;
    }
    if (mode == "tick") {
      std::printf("tick\n");  // no fflush: stdout's buffering decides when the line leaves
      sleep_seconds(120);
      return 0;
    }
    if (mode == "affinity") return mode_affinity();
    if (mode == "hold" && argc >= 3) {
      ::signal(SIGTERM, SIG_IGN);
      ready();
      sleep_seconds(std::atoi(argv[2]));
      return 0;
    }
    if (mode == "peer-hold" && argc >= 3) {
      aikido::Peer peer = aikido::Peer::from_env();
      ready();
      sleep_seconds(std::atoi(argv[2]));
      return 0;
    }
    if (mode == "session" && argc >= 3)
      return mode_session(std::atoi(argv[2]), argc >= 4 && std::string(argv[3]) == "hold");
  } catch (const aikido::Error& e) {
    std::fprintf(stderr, "launcher_fixture: %s\n", e.what());
    return 70;
  }
  std::fprintf(stderr, "launcher_fixture: unknown mode '%s'\n", mode.c_str());
  return 64;
}
