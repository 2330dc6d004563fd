// aikido::ClusterSpec: the membership of an elastic job, a validated value with a version.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace aikido {

/// One worker of the cluster. `id` is unique for the job's lifetime (a replacement gets a new id), so that a
/// worker can be recognised across versions while its rank changes.
struct WorkerSpec {
  std::uint64_t id = 0;
  /// Host the worker runs on (its launcher's host).
  std::string host;
  friend bool operator==(const WorkerSpec&, const WorkerSpec&) = default;
};

/// The workers of one version of the cluster, in rank order: worker i has rank i.
///
/// A ClusterSpec is a plain value: copies are independent, nothing is shared. `validate()` checks the invariants
/// below; `decode()` validates what it reads. Versions only grow: the spec that replaces version v has version
/// v + 1 (see MembershipStore::propose).
///
/// Invariants: 1 <= min_size <= max_size <= kMaxWorkers; workers non-empty and at most max_size; worker ids
/// distinct and below next_id; no empty host. The size may be below min_size (a cluster that lost workers and
/// waits for replacements); `below_min()` says so.
struct ClusterSpec {
  static constexpr int kMaxWorkers = 1024;

  std::uint64_t version = 0;
  std::vector<WorkerSpec> workers;
  int min_size = 1;
  int max_size = kMaxWorkers;
  /// The id the next new worker gets.
  std::uint64_t next_id = 0;
  /// Why this version exists: "initial", "resize", "lost", "restart" (free text, for status and logs).
  std::string reason = "initial";
  /// Who proposed it, where that is known: "aikido-ctl", "policy NAME", "aikido-run" (a lost worker, a
  /// replacement), "program" (ElasticSession::resize called by the program); empty when unknown. One line.
  std::string requested_by;
  /// Wall-clock time (ms since the Unix epoch) at which this version was proposed: the start of a resize.
  std::int64_t proposed_unix_ms = 0;

  int size() const { return int(workers.size()); }
  bool below_min() const { return size() < min_size; }
  /// Rank of worker `id`, or -1 when it is not a member.
  int rank_of(std::uint64_t id) const;
  bool contains(std::uint64_t id) const { return rank_of(id) >= 0; }

  /// Throws ConfigError naming the broken invariant.
  void validate() const;

  /// The next version with `n` workers: the highest ranks are removed, or new workers (fresh ids, on `host`)
  /// are appended. Throws ConfigError when n is outside [1, max_size] (below min_size is refused too).
  ClusterSpec resized(int n, const std::string& host, std::string reason = "resize") const;
  /// The next version without the workers `ids` (ranks above them move down). Unknown ids are ignored.
  ClusterSpec without(const std::vector<std::uint64_t>& ids, std::string reason = "lost") const;

  // Jobs that span hosts keep each host's workers contiguous, hosts in the order they joined, so that ranks
  // r..r+k-1 share a host (the hierarchical topology and the same-host path rely on it). The three changes below
  // keep that order; resized() and without() keep it too when only the last host grows or shrinks.
  /// The next version with `n` workers: shrinking takes one worker at a time from the host with the most (the later
  /// host on a tie), its highest rank, so that every host keeps a worker while n is at least the number of hosts;
  /// each new worker goes to the host that has the fewest workers (the earlier host on a tie), right after that
  /// host's last worker. Throws ConfigError like resized().
  ClusterSpec with_size(int n, std::string reason = "resize") const;
  /// The next version with `n` new workers on `host`, after its last worker (appended for a new host).
  ClusterSpec with_workers_on(const std::string& host, int n, std::string reason) const;
  /// The next version without any worker on `host` (an empty cluster is allowed here: validate() refuses it).
  ClusterSpec without_host(const std::string& host, std::string reason) const;
  /// The hosts in rank order, each once.
  std::vector<std::string> hosts() const;
  /// Number of workers on `host`.
  int workers_on(const std::string& host) const;

  /// What changed from this spec to `next`: workers only in `next` (added) and only here (removed).
  struct Diff {
    std::vector<std::uint64_t> added;
    std::vector<std::uint64_t> removed;
  };
  Diff diff(const ClusterSpec& next) const;

  /// Line-based text: "version=V", "min=A", "max=B", "next_id=N", "reason=R", "proposed_ms=T", then one
  /// "worker=ID HOST" per rank. decode() throws ProtocolError on unreadable text and ConfigError on a spec that
  /// breaks an invariant.
  std::string encode() const;
  static ClusterSpec decode(std::string_view text);

  /// One line for logs and status: "version 3 (resize): 4 workers [0 1 2 5], min 1, max 4".
  std::string describe() const;

  friend bool operator==(const ClusterSpec&, const ClusterSpec&) = default;
};

}  // namespace aikido
