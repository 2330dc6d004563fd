// aikido-ctl: inspects and resizes a running elastic job, on one host through the control file aikido-run wrote, or
// across hosts through etcd.
//
//   aikido-ctl JOB status        the cluster: version, workers, their host, rank and step (and a note when the
//                                program does not use aikido::ElasticSession)
//   aikido-ctl JOB resize N      asks for N workers (a new cluster version; workers switch at their next step
//                                boundary, the launchers start or stop processes); refused when the workers joined
//                                with plain Peers instead of sessions
// where JOB is --control-file F (a job on one host: the file holds the store's address and the job secret, which
// the store asks for), or --store etcd://H:P[,H:P] --job-id ID --secret-file F (a job across hosts; the secret is
// checked against the job's; etcd's TLS files and credentials come from AIKIDO_STORE_CA, _CERT, _KEY and
// _CREDENTIALS). Exit status: 0 done, 1 the request failed, 2 bad command line.
#include <aikido/aikido.hpp>
#include <aikido/etcd.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <utility>

#include "base/env.hpp"
#include "base/launcher_env.hpp"
#include "ctl_options.hpp"
#include "elastic/etcd_client.hpp"
#include "launch/host_job.hpp"

namespace {

constexpr auto kTimeout = std::chrono::seconds(10);

using aikido::ctl::Control;
using aikido::ctl::read_key_values;
using aikido::ctl::UsageError;

const char* kUsage =
    "usage: aikido-ctl --control-file F status | resize N\n"
    "       aikido-ctl --store etcd://HOST:PORT[,HOST:PORT] --job-id ID --secret-file S status | resize N\n"
    "\n"
    "F is the file given to aikido-run --elastic --control-file F; a job across hosts is named by the --store,\n"
    "--job-id and --secret-file its launchers were given. status prints the cluster version, its workers and their\n"
    "step; resize N asks for N workers (within the job's minimum and maximum; across hosts, new workers go to the\n"
    "hosts with the fewest).\n";

Control read_control_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw aikido::ConfigError("cannot read the control file '" + path + "'; is the job running?");
  std::stringstream text;
  text << in.rdbuf();
  return aikido::ctl::parse_control(text.str(), path);
}

// The first line of a secret file, read as aikido-run reads it.
std::string read_secret(const std::string& path) {
  return aikido::env::job_secret([&](const char* name) -> std::optional<std::string> {
    if (std::string_view(name) == aikido::env::kSecretFile) return path;
    return std::nullopt;
  });
}

// What aikido-run found out about the job's sessions (aikido::no_session_key): kind ("plain-peer", "silent") and
// message; an empty kind when the workers use sessions (or have not been found not to).
std::pair<std::string, std::string> no_session(aikido::Store& store, const Control& control) {
  const std::string value = store.get(aikido::no_session_key(control.job)).value_or("");
  const auto space = value.find(' ');
  if (space == std::string::npos) return {};
  return {value.substr(0, space), value.substr(space + 1)};
}

int status(aikido::Store& store, aikido::MembershipStore& membership, const Control& control) {
  const auto spec = membership.latest();
  if (!spec) throw aikido::Error("the job has not published a cluster yet");
  const auto [kind, message] = no_session(store, control);
  std::printf("cluster version %llu (%s): %d worker%s, min %d, max %d\n", (unsigned long long)spec->version,
              spec->reason.c_str(), spec->size(), spec->size() == 1 ? "" : "s", spec->min_size, spec->max_size);
  if (!kind.empty()) std::printf("note: %s\n", message.c_str());
  for (int rank = 0; rank < spec->size(); ++rank) {
    const auto& w = spec->workers[std::size_t(rank)];
    const auto value = store.get(aikido::worker_status_key(control.job, w.id));
    auto fields = read_key_values(value.value_or(""), ' ');
    std::string where;
    if (!value) {
      where = kind == "plain-peer" ? "no elastic session (the program does not use aikido::ElasticSession)"
                                   : "no elastic session yet";
    } else if (fields["state"] == "joining") {
      where = "joining cluster version " + fields["version"];
    } else if (fields["state"] == "left") {
      where = "left at step " + fields["step"] + ", version " + fields["version"];
    } else {
      where = "step " + fields["step"] + ", at version " + fields["version"];
    }
    std::printf("  rank %d: worker %llu on %s, %s\n", rank, (unsigned long long)w.id, w.host.c_str(), where.c_str());
  }
  return 0;
}

int resize(aikido::Store& store, aikido::MembershipStore& membership, const Control& control, int n) {
  // Plain Peers never look at the membership: the new workers would wait for members that never join them.
  const auto [kind, message] = no_session(store, control);
  if (kind == "plain-peer") throw aikido::ConfigError("cannot resize this job: " + message);
  if (!kind.empty()) std::fprintf(stderr, "aikido-ctl: note: %s\n", message.c_str());
  for (;;) {
    const auto spec = membership.latest();
    if (!spec) throw aikido::Error("the job has not published a cluster yet");
    if (spec->size() == n) {
      std::printf("cluster version %llu already has %d workers\n", (unsigned long long)spec->version, n);
      return 0;
    }
    aikido::ClusterSpec next = spec->with_size(n);
    next.requested_by = "aikido-ctl";
    next.proposed_unix_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
            .count();
    if (membership.propose(next)) {
      std::printf("asked for %d worker%s: cluster version %llu\n", n, n == 1 ? "" : "s",
                  (unsigned long long)next.version);
      return 0;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const aikido::ctl::CtlOptions options = aikido::ctl::parse_ctl_options(argc, argv);
    if (options.help) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    const std::string &control_file = options.control_file, &store_url = options.store_url, &job_id = options.job_id,
                      &secret_file = options.secret_file;
    std::shared_ptr<aikido::Store> store;
    std::shared_ptr<aikido::MembershipStore> membership;
    Control control;
    if (!store_url.empty()) {
      control = {store_url, read_secret(secret_file), job_id, {}};
      const aikido::EtcdOptions etcd = aikido::etcd_options_from_env(store_url, kTimeout);
      aikido::elastic::EtcdClient client(etcd);
      if (client.range(job_id + "/secret-check").kvs.empty()) {
        throw aikido::ConfigError("no job '" + job_id + "' runs with its store at " + store_url);
      }
      aikido::launch::check_job_secret(client, job_id, control.secret);
      store = aikido::connect_etcd_store(etcd);
      membership = aikido::make_etcd_membership(etcd, job_id);
    } else {
      control = read_control_file(control_file);
      store = aikido::connect_tcp_store(control.store, control.secret, std::chrono::milliseconds(kTimeout), control.tls);
      membership = aikido::make_membership_store(store, control.job);
    }
    return options.command == "status" ? status(*store, *membership, control)
                                       : resize(*store, *membership, control, options.workers);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "aikido-ctl: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "aikido-ctl: %s\n", e.what());
    return 1;
  }
}
