#include "options.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <aikido/peer.hpp>
#include <aikido/types.hpp>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string_view>

namespace aikido::run {
namespace {

void parse_np(const std::string& flag, const std::string& value, int* np) {
  errno = 0;
  char* end = nullptr;
  const long long n = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || errno != 0 || *end != '\0' || n < 1 || n > kMaxWorkers) {
    throw UsageError("aikido-run: " + flag + " '" + value + "' is not a positive integer (at most " +
                     std::to_string(kMaxWorkers) + ")");
  }
  *np = int(n);
}

std::string check_seconds(const std::string& value) {
  errno = 0;
  char* end = nullptr;
  const double seconds = std::strtod(value.c_str(), &end);
  if (value.empty() || errno != 0 || *end != '\0' || !(seconds > 0) || !std::isfinite(seconds)) {
    throw UsageError("aikido-run: --timeout '" + value + "' is not a positive number of seconds");
  }
  return value;
}

std::string check_segment_bytes(const std::string& value) {
  errno = 0;
  char* end = nullptr;
  const long long bytes = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || errno != 0 || *end != '\0' || bytes < 1 || bytes > (1ll << 40)) {
    throw UsageError("aikido-run: --segment-bytes '" + value + "' is not a positive number of bytes");
  }
  return value;
}

std::string check_topology(const std::string& value) {
  try {
    parse_topology(value);
  } catch (const Error& e) {
    throw UsageError(std::string("aikido-run: --topology: ") + e.what());
  }
  return value;
}

std::string check_transport(const std::string& value) {
  try {
    parse_transport(value);
  } catch (const Error& e) {
    throw UsageError(std::string("aikido-run: --transport: ") + e.what());
  }
  return value;
}

bool is_executable_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

}  // namespace

std::string usage() {
  return R"(usage: aikido-run -np N [options] PROGRAM [ARGS...]

Starts N workers of PROGRAM on this host, each with the environment of one rank of an Aikido cluster, serves
their rendezvous store, and prefixes every line they print with "[RANK] ".

options:
  -np N, -n N           number of workers to start (required; 1..1024)
  --topology T          collective topology: ring, tree, star or hierarchical    (sets AIKIDO_TOPOLOGY)
  --timeout S           deadline of each collective, in seconds                  (sets AIKIDO_TIMEOUT)
  --transport K         same-host transport: auto, tcp or unix                   (sets AIKIDO_TRANSPORT)
  --segment-bytes B     pipelining segment size in bytes                         (sets AIKIDO_SEGMENT_BYTES)
  --bind-to W           core (default): when there are no more workers than CPUs, bind worker i to the i-th CPU
                        aikido-run may use, so that waiting workers spin on their own core; none: do not bind
  -h, --help            print this help and exit
  --                    end of options (use when PROGRAM starts with '-')

Options take their value as the next argument or after '=' (--timeout=5). Options not given on the command line
pass through from aikido-run's own environment (AIKIDO_TOPOLOGY, AIKIDO_TIMEOUT, ...).

Each worker gets AIKIDO_RANK, AIKIDO_SIZE, AIKIDO_LOCAL_RANK, AIKIDO_LOCAL_SIZE, AIKIDO_HOST, AIKIDO_STORE_ADDR,
AIKIDO_SECRET (a fresh random job secret), AIKIDO_JOB_ID (a fresh random id) and AIKIDO_CLUSTER_VERSION=0. It
also gets OMP_NUM_THREADS=1 unless OMP_NUM_THREADS is already set, so that workers sharing a host do not
oversubscribe its cores. Workers read standard input from /dev/null.

When a worker exits with a non-zero status or is killed by a signal, aikido-run reports it, stops the other
workers (SIGTERM, then SIGKILL after 3 s) and exits with that worker's status (128 + signal number for a
signal). On SIGINT or SIGTERM it stops all workers the same way and exits with 130 or 143; a second signal
kills them at once. A bad command line exits with status 2.
)";
}

std::string find_program(const std::string& program) {
  if (program.find('/') != std::string::npos) {
    struct stat st {};
    if (::stat(program.c_str(), &st) != 0) throw UsageError("aikido-run: program '" + program + "' does not exist");
    if (!S_ISREG(st.st_mode) || ::access(program.c_str(), X_OK) != 0) {
      throw UsageError("aikido-run: program '" + program + "' is not an executable file");
    }
    return program;
  }
  const char* env_path = std::getenv("PATH");
  const std::string path = env_path != nullptr ? env_path : "/usr/local/bin:/usr/bin:/bin";
  std::size_t begin = 0;
  for (;;) {
    const std::size_t end = std::min(path.find(':', begin), path.size());
    std::string dir = path.substr(begin, end - begin);
    if (dir.empty()) dir = ".";  // an empty PATH entry means the current directory
    const std::string candidate = dir + "/" + program;
    if (is_executable_file(candidate)) return candidate;
    if (end == path.size()) break;
    begin = end + 1;
  }
  throw UsageError("aikido-run: program '" + program + "' not found in PATH");
}

Options parse_options(int argc, char** argv) {
  Options options;
  bool have_np = false;
  int i = 1;
  for (; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") {
      ++i;
      break;
    }
    if (arg.size() < 2 || arg[0] != '-') break;  // PROGRAM
    if (arg == "-h" || arg == "--help") {
      options.help = true;
      return options;
    }
    std::string flag = arg;
    std::optional<std::string> value;
    if (const auto eq = arg.find('='); eq != std::string::npos) {
      flag = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    const bool known = flag == "-np" || flag == "--np" || flag == "-n" || flag == "--topology" || flag == "--timeout" ||
                       flag == "--transport" || flag == "--segment-bytes" || flag == "--bind-to";
    if (!known) throw UsageError("aikido-run: unknown option '" + arg + "'; see aikido-run --help");
    if (!value) {
      if (i + 1 >= argc) throw UsageError("aikido-run: option " + flag + " needs a value; see aikido-run --help");
      value = argv[++i];
    }
    if (flag == "-np" || flag == "--np" || flag == "-n") {
      parse_np(flag, *value, &options.np);
      have_np = true;
    } else if (flag == "--topology") {
      options.topology = check_topology(*value);
    } else if (flag == "--timeout") {
      options.timeout = check_seconds(*value);
    } else if (flag == "--transport") {
      options.transport = check_transport(*value);
    } else if (flag == "--bind-to") {
      if (*value != "core" && *value != "none") {
        throw UsageError("aikido-run: --bind-to expects core or none, got '" + *value + "'");
      }
      options.bind_to_core = *value == "core";
    } else {
      options.segment_bytes = check_segment_bytes(*value);
    }
  }
  if (!have_np) throw UsageError("aikido-run: missing -np N, the number of workers to start; see aikido-run --help");
  if (i >= argc)
    throw UsageError("aikido-run: missing PROGRAM to run; usage: aikido-run -np N [options] PROGRAM [ARGS...]");
  options.program = argv[i];
  options.program_path = find_program(options.program);
  options.argv.assign(argv + i, argv + argc);
  return options;
}

}  // namespace aikido::run
