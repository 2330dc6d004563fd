// A client of etcd's v3 JSON gateway (libcurl for HTTP, nlohmann-json for JSON): key-value reads and writes,
// transactions, leases and watch streams. Used by the etcd store and membership (etcd_store.cpp) and by the
// per-host launcher.
//
// Every call tries the endpoints in turn, starting with the one that answered last, and backs off between rounds
// until EtcdOptions::unavailable_timeout has passed; then it throws TimeoutError naming the endpoints and the last
// error. An answer of etcd that is an error of the request itself (a bad argument, permission denied) is thrown at
// once. Keys and values are bytes; the gateway's base64 and its 64-bit integers as strings stay inside the .cpp.
#pragma once

#include <aikido/errors.hpp>
#include <aikido/etcd.hpp>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace aikido::elastic {

using EtcdClock = std::chrono::steady_clock;

struct EtcdKeyValue {
  std::string key;  // without EtcdOptions::prefix
  std::string value;
  std::int64_t create_revision = 0;
  std::int64_t mod_revision = 0;
  std::int64_t version = 0;
  std::int64_t lease = 0;
};

struct EtcdEvent {
  bool deleted = false;  // a delete (or a lease's expiry); otherwise a put
  EtcdKeyValue kv;
};

/// The revisions a watch needed were compacted: read the current values again and watch from there.
class EtcdCompacted : public Error {
 public:
  EtcdCompacted(const std::string& what, std::int64_t compact_revision)
      : Error(what), compact_revision(compact_revision) {}
  std::int64_t compact_revision;
};

/// Thread safe: calls from several threads use separate HTTP connections.
class EtcdClient {
 public:
  /// Checks the options (ConfigError); connects lazily, on the first call.
  explicit EtcdClient(EtcdOptions options);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  const EtcdOptions& options() const;
  /// "etcd at 127.0.0.1:2379, 127.0.0.1:2380": for messages.
  std::string describe() const;

  struct Range {
    std::vector<EtcdKeyValue> kvs;
    std::int64_t revision = 0;  // the store's revision when it answered
  };
  /// The key, or every key that starts with it when `prefix`.
  Range range(std::string_view key, bool prefix = false);
  /// Returns the revision of the write. `lease` 0: none (the key stays until deleted).
  std::int64_t put(std::string_view key, std::string_view value, std::int64_t lease = 0);
  /// Returns the number of keys deleted.
  std::int64_t erase(std::string_view key, bool prefix = false);

  struct Compare {
    enum class Target : std::uint8_t { version, create_revision, mod_revision, value, lease };
    enum class Result : std::uint8_t { equal, greater, less, not_equal };
    std::string key;
    Target target = Target::version;
    Result result = Result::equal;
    std::int64_t number = 0;  // for every target but value
    std::string value;        // for Target::value
  };
  struct Operation {
    enum class Kind : std::uint8_t { put, erase, range };
    Kind kind = Kind::range;
    std::string key;
    std::string value;       // put
    std::int64_t lease = 0;  // put
    bool prefix = false;     // erase, range
  };
  struct TxnResult {
    bool succeeded = false;
    std::int64_t revision = 0;
    std::vector<Range> ranges;  // one per range operation of the branch taken, in order
  };
  /// If every comparison holds, runs `success`, else `failure`, atomically.
  TxnResult txn(const std::vector<Compare>& compares, const std::vector<Operation>& success,
                const std::vector<Operation>& failure);

  /// A lease of `ttl` (at least 1 s): keys put with it are deleted when it expires or is revoked.
  std::int64_t grant_lease(std::chrono::seconds ttl);
  /// Renews the lease; returns its remaining TTL in seconds, 0 when it no longer exists (expired or revoked).
  std::int64_t keep_alive(std::int64_t lease);
  /// Ends the lease and deletes its keys. A lease that no longer exists is not an error.
  void revoke_lease(std::int64_t lease);

 private:
  friend class EtcdWatch;
  class Impl;
  std::unique_ptr<Impl> impl_;
};

/// One watch stream on a key (or a prefix): the changes after `start_revision`, in order, without polling. The
/// stream stays open between calls of next(); when it breaks (etcd restarted, an endpoint lost) it is opened again
/// on any endpoint, resuming after the last revision it delivered. Not thread safe, except interrupt().
class EtcdWatch {
 public:
  /// Watches `key` (every key under it when `prefix`) for changes at revisions >= `start_revision` (usually the
  /// revision of a range() + 1).
  EtcdWatch(EtcdClient& client, std::string key, bool prefix, std::int64_t start_revision);
  ~EtcdWatch();
  EtcdWatch(const EtcdWatch&) = delete;
  EtcdWatch& operator=(const EtcdWatch&) = delete;

  /// Waits until at least one change arrived, `until` passed, or interrupt() was called, and returns the changes
  /// (empty on a timeout or an interrupt). While etcd is away it keeps trying until `until`. Throws EtcdCompacted
  /// when the revisions it needs no longer exist.
  std::vector<EtcdEvent> next(EtcdClock::time_point until);
  /// Makes a next() that is waiting (or the next one) return at once. Any thread.
  void interrupt();
  /// The revision from which the stream resumes.
  std::int64_t next_revision() const { return next_revision_; }

 private:
  class Stream;
  EtcdClient& client_;
  const std::string key_;
  const bool prefix_;
  std::int64_t next_revision_;
  std::unique_ptr<Stream> stream_;
  std::atomic<bool> interrupted_{false};
};

/// The key of job `job_id`'s newest ClusterSpec (make_etcd_membership), for readers that need its revision.
inline std::string etcd_cluster_key(std::string_view job_id) { return std::string(job_id) + "/cluster"; }

/// Standard padded base64 (RFC 4648), as the gateway writes bytes. decode throws ProtocolError on bad input.
std::string base64_encode(std::string_view bytes);
std::string base64_decode(std::string_view text);

/// Parses one answer of the gateway's watch stream (one JSON object, one line) into `events`; returns false for an
/// answer without events (created, progress). Throws EtcdCompacted for a compaction and ProtocolError for anything
/// unreadable. `prefix` (EtcdOptions::prefix) is removed from keys.
bool parse_watch_line(std::string_view line, std::string_view prefix, std::vector<EtcdEvent>& events);

/// Parses the gateway's answer to a range request (the JSON text of /v3/kv/range). Throws ProtocolError for anything
/// unreadable: not an object, fields of the wrong type, bad base64, keys outside `prefix`.
EtcdClient::Range parse_range_answer(std::string_view text, std::string_view prefix);

}  // namespace aikido::elastic
