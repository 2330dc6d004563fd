#include "supervisor.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <optional>
#include <utility>

#include "events.hpp"
#include "output.hpp"

namespace aikido::run {
namespace {

using Clock = std::chrono::steady_clock;

// Output of the workers may still arrive after the last one exited (a process it started holds the pipe). Wait
// this long for the pipes to close before giving up on them.
constexpr std::chrono::milliseconds kDrainTimeout{2000};
// Longest a controller's stop preparation (a checkpoint) may delay stopping the workers.
constexpr std::chrono::milliseconds kStopPreparation{10'000};

sigset_t handled_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  return set;
}

std::string errno_text() { return std::string(::strerror(errno)); }

// A descriptor closed on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    reset();
    fd_ = std::exchange(other.fd_, -1);
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// One output stream of one worker: the read end of its pipe or pseudo-terminal, and the prefixer it feeds.
struct Stream {
  Fd fd;
  LinePrefixer prefixer;
  Stream(const std::string& label, int out_fd) : prefixer(label, out_fd) {}
  void close() {
    prefixer.finish();
    fd.reset();
  }
};

// A pipe: read end, write end (both close-on-exec; dup2 gives the child a plain descriptor).
bool open_pipe(Fd& read_end, Fd& write_end) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return false;
  read_end = Fd(fds[0]);
  write_end = Fd(fds[1]);
  return true;
}

// A pseudo-terminal in raw mode (no "\n" -> "\r\n", no echo): the master end, which aikido-run reads, and the
// terminal end, the worker's standard output. It never becomes the worker's controlling terminal (O_NOCTTY, and the
// worker does not start a session), so terminal signals do not reach the worker through it.
bool open_pty(Fd& master, Fd& terminal) {
  Fd m(::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC));
  char name[128];
  if (!m.valid() || ::grantpt(m.get()) != 0 || ::unlockpt(m.get()) != 0 ||
      ::ptsname_r(m.get(), name, sizeof name) != 0) {
    return false;
  }
  Fd t(::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC));
  termios mode{};
  if (!t.valid() || ::tcgetattr(t.get(), &mode) != 0) return false;
  ::cfmakeraw(&mode);
  if (::tcsetattr(t.get(), TCSANOW, &mode) != 0) return false;
  master = std::move(m);
  terminal = std::move(t);
  return true;
}

struct Process {
  int rank = 0;
  std::uint64_t id = 0;
  pid_t pid = -1;
  bool running = false;
  bool stopping = false;  // asked to stop on its own (elastic: removed from the cluster)
  Clock::time_point kill_at{};
  std::unique_ptr<Stream> out;
  std::unique_ptr<Stream> err;
  Fd log;  // --log-dir's rank-ID.log
};

// Everything the child needs, prepared before fork(): between fork and exec a multithreaded process may only call
// async-signal-safe functions.
struct ExecPlan {
  std::vector<char*> argv;
  std::vector<char*> envp;
  std::string failure_message;
  std::vector<int> cpus;
};

[[noreturn]] void exec_child(const std::string& path, ExecPlan& plan, pid_t launcher, int stdin_fd, int out_fd,
                             int err_fd) {
  ::setpgid(0, 0);
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != launcher) ::_exit(127);  // the launcher died before prctl took effect
  // Dispositions and the mask survive exec: give the program the defaults.
  ::signal(SIGPIPE, SIG_DFL);
  sigset_t empty;
  sigemptyset(&empty);
  ::sigprocmask(SIG_SETMASK, &empty, nullptr);
  if (!plan.cpus.empty()) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int cpu : plan.cpus) CPU_SET(cpu, &set);
    ::sched_setaffinity(0, sizeof set, &set);  // best effort: an unbound worker still works
  }
  ::dup2(stdin_fd, STDIN_FILENO);
  ::dup2(out_fd, STDOUT_FILENO);
  ::dup2(err_fd, STDERR_FILENO);
  ::execve(path.c_str(), plan.argv.data(), plan.envp.data());
  // strerror is not async-signal-safe: append the number by hand.
  char digits[16];
  int length = 0;
  for (int e = errno; length < int(sizeof digits) && (e > 0 || length == 0); e /= 10)
    digits[length++] = char('0' + e % 10);
  std::string& message = plan.failure_message;  // its capacity was reserved before fork
  for (int i = length - 1; i >= 0; --i) message.push_back(digits[i]);
  message.push_back('\n');
  [[maybe_unused]] ssize_t n = ::write(STDERR_FILENO, message.data(), message.size());
  ::_exit(127);
}

}  // namespace

void Supervisor::block_signals() {
  const sigset_t set = handled_signals();
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
}

Supervisor::Supervisor(Config config) : config_(std::move(config)) {}

class Supervisor::Loop {
 public:
  Loop(Supervisor& owner, std::chrono::milliseconds grace, int signal_fd, int dev_null)
      : owner_(owner), grace_(grace), signal_fd_(signal_fd), dev_null_(dev_null), launcher_(::getpid()) {}

  bool start(const Worker& worker) {
    ExecPlan plan;
    const std::string& program = worker.program_path.empty() ? owner_.config_.program_path : worker.program_path;
    std::vector<std::string> argv = worker.argv.empty() ? owner_.config_.argv : worker.argv;
    for (auto& a : argv) plan.argv.push_back(a.data());
    plan.argv.push_back(nullptr);
    std::vector<std::string> environment = worker.environment;
    for (auto& e : environment) plan.envp.push_back(e.data());
    plan.envp.push_back(nullptr);
    plan.failure_message = "aikido-run: cannot execute '" + program + "': errno ";
    plan.failure_message.reserve(plan.failure_message.size() + 32);
    plan.cpus = worker.cpus;

    Fd out_read, out_write, err_read, err_write;
    if (owner_.config_.stdout_tty && !pty_failed_ && !open_pty(out_read, out_write)) {
      pty_failed_ = true;  // say it once; pipes work everywhere
      report("aikido-run: cannot open a pseudo-terminal for the workers' output (" + errno_text() +
             "); using pipes, through which C stdio passes output in blocks, not lines");
    }
    if ((!out_read.valid() && !open_pipe(out_read, out_write)) || !open_pipe(err_read, err_write)) {
      report("aikido-run: cannot create a pipe: " + errno_text());
      return false;
    }

    const pid_t pid = ::fork();
    if (pid < 0) {
      report("aikido-run: cannot start rank " + std::to_string(worker.rank) + ": fork failed: " + errno_text());
      return false;
    }
    if (pid == 0) {
      exec_child(program, plan, launcher_, dev_null_, out_write.get(), err_write.get());
    }
    ::setpgid(pid, pid);  // also here, so that the group exists before we may signal it
    ::fcntl(out_read.get(), F_SETFL, O_NONBLOCK);
    ::fcntl(err_read.get(), F_SETFL, O_NONBLOCK);
    const std::string label = owner_.config_.label_lines ? worker_label(worker.rank, worker.id) : "";
    Process p;
    p.rank = worker.rank;
    p.id = worker.id;
    p.pid = pid;
    p.running = true;
    p.out = std::make_unique<Stream>(label, STDOUT_FILENO);
    p.out->fd = std::move(out_read);
    p.err = std::make_unique<Stream>(label, STDERR_FILENO);
    p.err->fd = std::move(err_read);
    if (!owner_.config_.log_dir.empty()) {
      const std::string path = owner_.config_.log_dir + "/rank-" + std::to_string(worker.id) + ".log";
      p.log = Fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
      if (!p.log.valid()) report("aikido-run: cannot write " + path + ": " + errno_text());
    }
    for (Stream* stream : {p.out.get(), p.err.get()}) {
      stream->prefixer.set_log(p.log.get());
      stream->prefixer.set_in_place(owner_.config_.console_tty);
    }
    show_on_console(p);
    if (owner_.config_.events) {
      owner_.config_.events->emit("worker_started", {{"id", worker.id}, {"rank", worker.rank}, {"pid", pid}});
    }
    processes_.push_back(std::move(p));
    ++running_;
    drain_until_.reset();
    return true;
  }

  Process* find(std::uint64_t id) {
    for (auto& p : processes_) {
      if (p.running && p.id == id) return &p;
    }
    return nullptr;
  }

  void stop_one(std::uint64_t id) {
    Process* p = find(id);
    if (p == nullptr || p->stopping) return;
    p->stopping = true;
    p->kill_at = Clock::now() + grace_;
    signal_one(*p, SIGTERM);
    signal_one(*p, SIGCONT);
  }

  void kill_one(std::uint64_t id) {
    if (Process* p = find(id)) signal_one(*p, SIGKILL);
  }

  std::vector<std::uint64_t> running_ids() const {
    std::vector<std::uint64_t> ids;
    for (const auto& p : processes_) {
      if (p.running) ids.push_back(p.id);
    }
    return ids;
  }

  pid_t pid_of(std::uint64_t id) const {
    for (const auto& p : processes_) {
      if (p.running && p.id == id) return p.pid;
    }
    return -1;
  }

  void set_rank(std::uint64_t id, int rank) {
    Process* p = find(id);
    if (p == nullptr || p->rank == rank) return;
    p->rank = rank;
    show_on_console(*p);
    if (!owner_.config_.label_lines) return;
    p->out->prefixer.set_label(worker_label(rank, id));
    p->err->prefixer.set_label(worker_label(rank, id));
  }

  int run() {
    while (running_ > 0 || streams_open()) {
      std::vector<pollfd> fds;
      std::vector<Stream*> streams;
      fds.push_back({signal_fd_, POLLIN, 0});
      Controller* controller = stopping_ ? nullptr : owner_.controller_;
      fds.push_back({controller ? controller->wake_fd() : -1, POLLIN, 0});
      for (auto& p : processes_) {
        for (Stream* s : {p.out.get(), p.err.get()}) {
          if (s->fd.valid()) {
            fds.push_back({s->fd.get(), POLLIN, 0});
            streams.push_back(s);
          }
        }
      }
      const int r = ::poll(fds.data(), fds.size(), poll_timeout_ms());
      if (r < 0 && errno != EINTR) {
        report("aikido-run: poll failed: " + errno_text() + "; killing the workers");
        kill_all(SIGKILL);
        return 1;
      }
      if (r > 0) {
        if (fds[0].revents & POLLIN) handle_signals();
        for (std::size_t i = 2; i < fds.size(); ++i) {
          if (fds[i].revents != 0) read_stream(*streams[i - 2]);
        }
      }
      if (controller && !stopping_ && (fds[1].revents != 0 || Clock::now() >= next_tick_)) {
        next_tick_ = Clock::now() + controller->tick();
        controller->on_wake(owner_);
        if (preparing_ && controller->stop_ready()) {
          begin_stop();
        } else if (preparing_ && Clock::now() >= prepare_until_) {
          controller->stop_preparation_abandoned("within " + std::to_string(kStopPreparation.count() / 1000) + " s");
          begin_stop();
        }
      }
      check_deadlines();
    }
    return exit_code_.value_or(0);
  }

  // Asks every running worker to stop; SIGKILL follows after the grace period (check_deadlines).
  void begin_stop() {
    if (stopping_) return;
    stopping_ = true;
    if (running_ > 0) {
      report("aikido-run: stopping " + std::to_string(running_) + " running worker" + (running_ == 1 ? "" : "s") +
             " (SIGTERM, then SIGKILL after " + std::to_string(grace_.count() / 1000) + " s)");
    }
    kill_all(SIGTERM);
    kill_all(SIGCONT);  // a stopped worker acts on SIGTERM only once continued
    kill_at_ = Clock::now() + grace_;
  }

  void set_exit_code(int code) {
    if (!exit_code_) exit_code_ = code;
  }

 private:
  void show_on_console(Process& p) {
    const auto& shown = owner_.config_.console_ranks;
    const bool on = shown.empty() || shown.contains(p.rank);
    p.out->prefixer.set_console(on);
    p.err->prefixer.set_console(on);
  }

  void record_exit(const Process& p, int status) {
    if (!owner_.config_.events) return;
    nlohmann::json e = {{"id", p.id}, {"rank", p.rank}, {"pid", p.pid}};
    if (WIFSIGNALED(status)) {
      e["signal"] = signal_name(WTERMSIG(status));
    } else {
      e["status"] = WEXITSTATUS(status);
    }
    owner_.config_.events->emit("worker_exited", std::move(e));
  }

  bool streams_open() const {
    for (const auto& p : processes_) {
      if (p.out->fd.valid() || p.err->fd.valid()) return true;
    }
    return false;
  }

  int poll_timeout_ms() const {
    std::optional<Clock::time_point> next;
    if (stopping_ && !killed_ && running_ > 0) next = kill_at_;
    auto earlier = [&](Clock::time_point t) {
      if (!next || t < *next) next = t;
    };
    if (owner_.controller_ && !stopping_) earlier(next_tick_);
    for (const auto& p : processes_) {
      if (p.running && p.stopping) earlier(p.kill_at);
    }
    if (running_ == 0 && drain_until_ && (!next || *drain_until_ < *next)) next = drain_until_;
    if (!next) return -1;
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(*next - Clock::now()).count() + 1;
    return int(std::clamp<long long>(ms, 0, 60'000));
  }

  void check_deadlines() {
    const auto now = Clock::now();
    for (auto& p : processes_) {
      if (p.running && p.stopping && now >= p.kill_at) {
        report("aikido-run: killing worker " + std::to_string(p.id) +
               ", which did not stop within the grace period (SIGKILL)");
        signal_one(p, SIGKILL);
        p.kill_at = now + grace_;
      }
    }
    if (stopping_ && !killed_ && running_ > 0 && now >= kill_at_) {
      report("aikido-run: killing " + std::to_string(running_) + " worker" + (running_ == 1 ? "" : "s") +
             " that did not stop within the grace period (SIGKILL)");
      kill_all(SIGKILL);
    }
    if (running_ == 0 && !drain_until_) drain_until_ = now + kDrainTimeout;
    if (running_ == 0 && now >= *drain_until_) {
      for (auto& p : processes_) {
        p.out->close();
        p.err->close();
      }
    }
  }

  void kill_all(int sig) {
    if (sig == SIGKILL) killed_ = true;
    for (const auto& p : processes_) {
      if (p.running) signal_one(p, sig);
    }
  }

  static void signal_one(const Process& p, int sig) {
    // The whole group, so that processes the worker started stop too; the pid alone should the group be gone.
    if (::kill(-p.pid, sig) != 0) ::kill(p.pid, sig);
  }

  void handle_signals() {
    for (;;) {
      signalfd_siginfo info;
      const ssize_t n = ::read(signal_fd_, &info, sizeof info);
      if (n != ssize_t(sizeof info)) return;
      const int sig = int(info.ssi_signo);
      if (sig == SIGCHLD) {
        reap();
      } else if (!stopping_ && !preparing_) {
        report("aikido-run: received " + signal_name(sig));
        set_exit_code(128 + sig);
        if (owner_.controller_ && owner_.controller_->prepare_stop()) {
          preparing_ = true;
          prepare_until_ = Clock::now() + kStopPreparation;
        } else {
          begin_stop();
        }
      } else if (!stopping_) {
        report("aikido-run: received " + signal_name(sig) + " again; stopping the workers now");
        if (owner_.controller_) owner_.controller_->stop_preparation_abandoned("before the second signal");
        begin_stop();
      } else if (!killed_) {
        report("aikido-run: received " + signal_name(sig) + " again; killing the workers (SIGKILL)");
        kill_all(SIGKILL);
      }
    }
  }

  // Reaps every worker that has exited and reports its failure, unless it only died of our own stop signals.
  //
  // Workers that fail together (one crashes, the others notice and exit) are often reaped in one go, in no
  // particular order. Among the failures of one go, one killed by a signal is taken as the first: a worker that
  // notices another's failure exits with a status, it does not die of a signal.
  void reap() {
    struct Failure {
      std::string who;  // "rank R", or "worker ID" in elastic jobs (ranks change there)
      int status;
    };
    std::vector<Failure> failures;
    for (;;) {
      int status = 0;
      const pid_t pid = ::waitpid(-1, &status, WNOHANG);
      if (pid <= 0) break;
      for (auto& p : processes_) {
        if (p.pid != pid || !p.running) continue;
        p.running = false;
        --running_;
        record_exit(p, status);
        if (owner_.controller_ && !stopping_) {
          // Elastic: the controller decides; a failure it does not absorb ends the job.
          if (owner_.controller_->on_exit(owner_, p.id, status)) break;
          if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            failures.push_back({"worker " + std::to_string(p.id), status});
          } else if (!exit_code_) {
            set_exit_code(0);
          }
          break;
        }
        const bool failed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
        if (failed && !stopped_by_us(status)) failures.push_back({"rank " + std::to_string(p.rank), status});
        break;
      }
    }
    std::stable_sort(failures.begin(), failures.end(), [](const Failure& a, const Failure& b) {
      return WIFSIGNALED(a.status) && !WIFSIGNALED(b.status);
    });
    for (const auto& f : failures) {
      if (WIFSIGNALED(f.status)) {
        report("aikido-run: " + f.who + " " + killed_by(WTERMSIG(f.status)));
        set_exit_code(128 + WTERMSIG(f.status));
      } else {
        report("aikido-run: " + f.who + " exited with status " + std::to_string(WEXITSTATUS(f.status)));
        set_exit_code(WEXITSTATUS(f.status));
      }
    }
    if (!failures.empty()) begin_stop();
  }

  bool stopped_by_us(int status) const {
    if (!stopping_ || !WIFSIGNALED(status)) return false;
    return WTERMSIG(status) == SIGTERM || (WTERMSIG(status) == SIGKILL && killed_);
  }

  void read_stream(Stream& stream) {
    char buffer[64 << 10];
    const ssize_t n = ::read(stream.fd.get(), buffer, sizeof buffer);
    if (n > 0) {
      stream.prefixer.feed(buffer, std::size_t(n));
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)) {
      stream.close();
    }
  }

  Supervisor& owner_;
  std::vector<Process> processes_;
  const std::chrono::milliseconds grace_;
  const int signal_fd_;
  const int dev_null_;
  const pid_t launcher_;
  Clock::time_point next_tick_{};
  int running_ = 0;
  bool stopping_ = false;
  bool pty_failed_ = false;
  bool preparing_ = false;  // asked to stop; the controller prepares (prepare_stop) until prepare_until_
  Clock::time_point prepare_until_{};
  bool killed_ = false;
  Clock::time_point kill_at_{};
  std::optional<Clock::time_point> drain_until_;
  std::optional<int> exit_code_;
};

int Supervisor::run(const std::vector<Worker>& workers) {
  const sigset_t set = handled_signals();
  Fd signal_fd(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!signal_fd.valid()) {
    report("aikido-run: cannot create a signalfd: " + errno_text());
    return 1;
  }
  Fd dev_null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!dev_null.valid()) {
    report("aikido-run: cannot open /dev/null: " + errno_text());
    return 1;
  }
  Loop loop(*this, config_.grace, signal_fd.get(), dev_null.get());
  loop_ = &loop;
  std::size_t started = 0;
  for (const auto& worker : workers) {
    if (!loop.start(worker)) break;
    ++started;
  }
  if (started < workers.size()) {
    report("aikido-run: not every worker could be started");
    loop.set_exit_code(1);
    loop.begin_stop();
  }
  const int status = loop.run();
  loop_ = nullptr;
  return status;
}

bool Supervisor::start_worker(const Worker& worker) { return loop_ != nullptr && loop_->start(worker); }

void Supervisor::stop_worker(std::uint64_t id) {
  if (loop_ != nullptr) loop_->stop_one(id);
}

void Supervisor::kill_worker(std::uint64_t id) {
  if (loop_ != nullptr) loop_->kill_one(id);
}

std::vector<std::uint64_t> Supervisor::running_workers() const {
  return loop_ != nullptr ? loop_->running_ids() : std::vector<std::uint64_t>{};
}

pid_t Supervisor::pid_of(std::uint64_t id) const { return loop_ != nullptr ? loop_->pid_of(id) : -1; }

void Supervisor::set_rank(std::uint64_t id, int rank) {
  if (loop_ != nullptr) loop_->set_rank(id, rank);
}

void Supervisor::set_exit_code(int code) {
  if (loop_ != nullptr) loop_->set_exit_code(code);
}

void Supervisor::stop_job(int code) {
  if (loop_ == nullptr) return;
  loop_->set_exit_code(code);
  loop_->begin_stop();
}

}  // namespace aikido::run
