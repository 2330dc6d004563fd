// A plain C++ elastic training program (no framework), run under aikido-run --elastic by elastic_process_test and
// the resize benchmark; it uses only the public API.
//
// It "trains" a float vector with allreduce-averaged synthetic gradients over a 60000-sample index space, sharded
// by global position (aikido::ElasticSampler), commits every few steps, follows resizes (from aikido-ctl, from its
// own --schedule through peer.resize, or from aikido-run after a lost worker) and recovers from lost workers. It
// prints one JSON object per line:
//   {"event":"start", ...}                      once per process
//   {"event":"step", ...}                       every --print-every steps (and the first step after a change)
//   {"event":"changed", ..., "params":HASH}     after each membership change (all members print the same HASH)
//   {"event":"lost", ...} / {"event":"recovered", ...}
//   {"event":"epoch","epoch":E,"global_samples":N,"index_sum_ok":B, ...}   at the end of every epoch
//   {"event":"removed", ...}                    when a resize removed this worker
//   {"event":"done", ...}
// Every line carries "worker", "rank", "workers", "cluster_version", "step", "epoch" and "unix_ms" (wall clock).
//
// options: --epochs E (2)  --batch B per worker (250)  --dim D (4096)  --commit-every K (4)  --step-ms M simulated
// compute per step (0)  --print-every P (10)  --steps N stop after N steps (0: after the epochs)  --schedule
// S:N,S:N,...  (at global step S, all workers call peer.resize(N))  --linger-rank R the worker at rank R waits 60 s
// after "done" before it exits (to be killed there)
// --linger-ms M every worker waits M ms after "done" before it exits  --linger-until F every worker waits after
// "done" until file F exists (at most 60 s) before it exits  --after-session-ms M every worker closes its session
// after "done", prints {"event":"closed","pid":P}, then works M ms more before it exits (writing its results)
#include <unistd.h>

#include <aikido/aikido.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr std::uint64_t kDatasetSize = 60000;

struct Options {
  std::uint64_t epochs = 2;
  std::uint64_t batch = 250;
  std::size_t dim = 4096;
  std::int64_t commit_every = 4;
  int step_ms = 0;
  std::int64_t print_every = 10;
  std::int64_t steps = 0;  // stop after this many steps (0: run the epochs)
  std::map<std::int64_t, int> schedule;
  int linger_rank = -1;
  int linger_ms = 0;
  std::string linger_until;
  std::int64_t hang_before_session = -1;
  int after_session_ms = 0;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--epochs")
      o.epochs = std::stoull(value);
    else if (flag == "--batch")
      o.batch = std::stoull(value);
    else if (flag == "--dim")
      o.dim = std::stoull(value);
    else if (flag == "--commit-every")
      o.commit_every = std::stoll(value);
    else if (flag == "--step-ms")
      o.step_ms = std::stoi(value);
    else if (flag == "--print-every")
      o.print_every = std::stoll(value);
    else if (flag == "--steps")
      o.steps = std::stoll(value);
    else if (flag == "--linger-rank")
      o.linger_rank = std::stoi(value);
    else if (flag == "--linger-ms")
      o.linger_ms = std::stoi(value);
    else if (flag == "--linger-until")
      o.linger_until = value;
    else if (flag == "--after-session-ms")
      o.after_session_ms = std::stoi(value);
    else if (flag == "--hang-before-session")  // the worker with this id sleeps 10 minutes before its session
      o.hang_before_session = std::stoll(value);
    else if (flag == "--schedule") {
      std::size_t begin = 0;
      while (begin < value.size()) {
        std::size_t end = value.find(',', begin);
        if (end == std::string::npos) end = value.size();
        const std::string item = value.substr(begin, end - begin);
        const auto colon = item.find(':');
        o.schedule[std::stoll(item.substr(0, colon))] = std::stoi(item.substr(colon + 1));
        begin = end + 1;
      }
    } else {
      throw aikido::ConfigError("elastic_worker: unknown option " + flag);
    }
  }
  return o;
}

double unix_ms() {
  return double(
             std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
                 .count()) /
         1000.0;
}

std::string hash_of(const std::vector<float>& w) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* p = reinterpret_cast<const unsigned char*>(w.data());
  for (std::size_t i = 0; i < w.size() * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", (unsigned long long)h);
  return text;
}

// What a rollback restores: the model, the step, the data position and the epoch's accumulators.
struct TrainState {
  std::int64_t step = 0;
  std::uint64_t epoch_samples = 0;    // samples the whole cluster processed in this epoch
  std::uint64_t epoch_index_sum = 0;  // sum of their indices: 60000 * 59999 / 2 when each was seen once
};

class Worker {
 public:
  Worker(aikido::ElasticSession& session, const Options& options)
      : s_(session), o_(options), sampler_(kDatasetSize, 1), w_(options.dim, 0.0f) {
    s_.register_span("model", std::span<float>(w_));
    s_.register_value("train", state_);
    s_.register_sampler("sampler", sampler_);
  }

  void say(const std::string& event, const std::string& fields = "") {
    std::printf(
        "{\"event\":\"%s\",\"worker\":%llu,\"rank\":%d,\"workers\":%d,\"cluster_version\":%llu,\"pid\":%d,"
        "\"step\":%lld,\"epoch\":%llu,\"unix_ms\":%.3f%s%s}\n",
        event.c_str(), (unsigned long long)s_.worker_id(), s_.rank(), s_.size(),
        (unsigned long long)s_.cluster_version(), int(::getpid()), (long long)state_.step,
        (unsigned long long)sampler_.epoch(), unix_ms(), fields.empty() ? "" : ",", fields.c_str());
    std::fflush(stdout);
  }

  std::string timings() const {
    const auto& t = s_.last_change();
    char text[512];
    std::snprintf(text, sizeof text,
                  "\"from_version\":%llu,\"from_size\":%d,\"failure\":%s,\"agree_ms\":%.3f,\"connect_ms\":%.3f,"
                  "\"restore_ms\":%.3f,\"total_ms\":%.3f,\"proposed_unix_ms\":%lld",
                  (unsigned long long)t.from_version, t.from_size, t.failure ? "true" : "false", t.decided_to_agreed,
                  t.agree_to_connected, t.connected_to_restored, t.decided_to_restored,
                  (long long)s_.spec().proposed_unix_ms);
    return text;
  }

  void changed(const char* event) {
    say(event, "\"params\":\"" + hash_of(w_) + "\"," + timings());
    first_step_after_change_ = true;
  }

  int run() {
    while (sampler_.epoch() < o_.epochs && (o_.steps == 0 || state_.step < o_.steps)) {
      aikido::SyncResult r = s_.sync(state_.step);
      if (r == aikido::SyncResult::changed) changed("changed");
      auto planned = o_.schedule.find(state_.step);
      if (r != aikido::SyncResult::removed && planned != o_.schedule.end() && s_.size() != planned->second) {
        s_.peer().resize(planned->second);
        r = s_.removed() ? aikido::SyncResult::removed : aikido::SyncResult::changed;
        if (r == aikido::SyncResult::changed) changed("changed");
      }
      if (r == aikido::SyncResult::removed) {
        say("removed");
        return 0;
      }
      try {
        train_step();
      } catch (const aikido::PeerLostError& e) {
        if (!recover(e.what())) return 0;
      } catch (const aikido::TimeoutError& e) {
        if (!recover(e.what())) return 0;
      }
    }
    say("done", "\"params\":\"" + hash_of(w_) + "\"");
    if (s_.rank() == o_.linger_rank) std::this_thread::sleep_for(std::chrono::seconds(60));
    if (o_.linger_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(o_.linger_ms));
    for (int i = 0; !o_.linger_until.empty() && ::access(o_.linger_until.c_str(), F_OK) != 0 && i < 6000; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return 0;
  }

 private:
  bool recover(const std::string& what) {
    std::string text = what.substr(0, 200);
    for (char& c : text) {
      if (c == '"' || c == '\\' || c < ' ') c = ' ';
    }
    say("lost", "\"error\":\"" + text + "\"");
    if (s_.recover() == aikido::SyncResult::removed) {
      say("removed");
      return false;
    }
    changed("recovered");
    return true;
  }

  void train_step() {
    const auto range = sampler_.shard(s_.rank(), s_.size(), o_.batch);
    std::vector<float> g(o_.dim, 0.0f);
    std::int64_t stats[2] = {std::int64_t(range.end - range.begin), 0};
    for (auto p = range.begin; p < range.end; ++p) {
      const std::uint64_t index = sampler_.index(p);
      stats[1] += std::int64_t(index);
      g[index % o_.dim] += float(index % 13) * 1e-3f;
    }
    if (o_.step_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(o_.step_ms));  // simulated compute
    auto& peer = s_.peer();
    aikido::Work a = peer.allreduce_async(std::span<float>(g), aikido::ReduceOp::sum, "grad");
    aikido::Work b = peer.allreduce_async(std::span<std::int64_t>(stats, 2), aikido::ReduceOp::sum, "stats");
    a.wait();
    b.wait();
    for (std::size_t i = 0; i < o_.dim; ++i) w_[i] -= 0.1f * g[i] / float(s_.size());
    state_.epoch_samples += std::uint64_t(stats[0]);
    state_.epoch_index_sum += std::uint64_t(stats[1]);
    ++state_.step;
    if (first_step_after_change_ || state_.step % o_.print_every == 0) {
      std::string extra;
      if (first_step_after_change_) {
        char text[96];
        std::snprintf(text, sizeof text, "\"first_after_change\":true,\"since_proposal_ms\":%.3f",
                      unix_ms() - double(s_.spec().proposed_unix_ms));
        extra = text;
      }
      say("step", extra);
      first_step_after_change_ = false;
    }
    if (sampler_.advance(s_.size(), o_.batch)) {
      const bool ok = state_.epoch_index_sum == kDatasetSize * (kDatasetSize - 1) / 2;
      say("epoch", "\"finished_epoch\":" + std::to_string(sampler_.epoch() - 1) + ",\"global_samples\":" +
                       std::to_string(state_.epoch_samples) + ",\"index_sum_ok\":" + (ok ? "true" : "false"));
      state_.epoch_samples = 0;
      state_.epoch_index_sum = 0;
    }
    if (state_.step % o_.commit_every == 0) s_.commit();
  }

  aikido::ElasticSession& s_;
  Options o_;
  aikido::ElasticSampler sampler_;
  std::vector<float> w_;
  TrainState state_;
  bool first_step_after_change_ = false;
};

}  // namespace

int main(int argc, char** argv) {
  const double started = unix_ms();
  try {
    const Options options = parse(argc, argv);
    if (const char* id = std::getenv("AIKIDO_WORKER_ID");
        id && options.hang_before_session >= 0 && std::atoll(id) == options.hang_before_session) {
      std::this_thread::sleep_for(std::chrono::minutes(10));
    }
    int status = 0;
    {
      auto session = aikido::ElasticSession::from_env();
      Worker worker(*session, options);
      char text[64];
      std::snprintf(text, sizeof text, "\"process_start_unix_ms\":%.3f", started);
      worker.say("start", text);
      status = worker.run();
    }
    if (options.after_session_ms > 0) {
      std::printf("{\"event\":\"closed\",\"pid\":%d}\n", int(::getpid()));
      std::fflush(stdout);
      std::this_thread::sleep_for(std::chrono::milliseconds(options.after_session_ms));
    }
    return status;
  } catch (const aikido::Error& e) {
    std::printf("{\"event\":\"error\",\"what\":\"%s\"}\n", e.what());
    std::fflush(stdout);
    return 4;
  }
}
