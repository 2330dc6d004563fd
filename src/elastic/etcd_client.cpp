// etcd's v3 JSON gateway over libcurl (see etcd_client.hpp).
#include "elastic/etcd_client.hpp"

#include <curl/curl.h>

#include <algorithm>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "base/error.hpp"
#include "base/log.hpp"

namespace aikido::elastic {

using detail::str_cat;
using json = nlohmann::json;

namespace {

constexpr std::chrono::milliseconds kFirstBackoff{50};
constexpr std::chrono::milliseconds kLongestBackoff{1000};
// Answers of the gateway are small (keys and values of a few KiB); a cap keeps a confused server from filling memory.
constexpr std::size_t kMaxAnswerBytes = std::size_t(64) << 20;

// gRPC status codes that etcd's gateway reports in {"code": N}.
enum GrpcCode : int {
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kOutOfRange = 11,
  kUnavailable = 14,
  kUnauthenticated = 16,
};

void init_curl_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) throw Error("libcurl could not be initialised");
  });
}

std::int64_t int64_field(const json& object, const char* name) {
  auto it = object.find(name);
  if (it == object.end() || it->is_null()) return 0;
  if (it->is_number_integer()) return it->get<std::int64_t>();
  if (it->is_string()) {
    const std::string& text = it->get_ref<const std::string&>();
    try {
      std::size_t used = 0;
      const long long value = std::stoll(text, &used);
      if (used == text.size()) return value;
    } catch (const std::exception&) {
    }
  }
  throw ProtocolError(str_cat("etcd answered '", name, "': ", it->dump(), ", not an integer"));
}

std::string bytes_field(const json& object, const char* name) {
  auto it = object.find(name);
  if (it == object.end() || it->is_null()) return {};
  if (!it->is_string()) throw ProtocolError(str_cat("etcd answered '", name, "': ", it->dump(), ", not base64 text"));
  return base64_decode(it->get_ref<const std::string&>());
}

std::string strip_prefix(std::string key, std::string_view prefix) {
  if (key.compare(0, prefix.size(), prefix) != 0) {
    throw ProtocolError(str_cat("etcd returned the key '", key, "' outside the prefix '", prefix, "'"));
  }
  return key.substr(prefix.size());
}

EtcdKeyValue parse_kv(const json& kv, std::string_view prefix) {
  if (!kv.is_object()) throw ProtocolError("etcd answered a key-value that is not an object");
  EtcdKeyValue out;
  out.key = strip_prefix(bytes_field(kv, "key"), prefix);
  out.value = bytes_field(kv, "value");
  out.create_revision = int64_field(kv, "create_revision");
  out.mod_revision = int64_field(kv, "mod_revision");
  out.version = int64_field(kv, "version");
  out.lease = int64_field(kv, "lease");
  return out;
}

std::int64_t header_revision(const json& answer) {
  auto it = answer.find("header");
  return it == answer.end() || !it->is_object() ? 0 : int64_field(*it, "revision");
}

EtcdClient::Range parse_range(const json& answer, std::string_view prefix) {
  EtcdClient::Range range;
  range.revision = header_revision(answer);
  auto it = answer.find("kvs");
  if (it != answer.end() && it->is_array()) {
    for (const json& kv : *it) range.kvs.push_back(parse_kv(kv, prefix));
  }
  return range;
}

// The first key after every key that starts with `key` (etcd's range_end for a prefix).
std::string prefix_end(std::string key) {
  while (!key.empty()) {
    if (static_cast<unsigned char>(key.back()) < 0xff) {
      key.back() = char(static_cast<unsigned char>(key.back()) + 1);
      return key;
    }
    key.pop_back();
  }
  return std::string(1, '\0');  // every key
}

// "host:port" or "scheme://host:port" to a base URL without a trailing slash.
std::string base_url(const std::string& endpoint, bool tls) {
  if (endpoint.find("://") != std::string::npos) {
    if (!endpoint.starts_with("http://") && !endpoint.starts_with("https://")) {
      throw ConfigError(
          str_cat("etcd endpoint '", endpoint, "': use host:port, http://host:port or https://host:port"));
    }
    std::string url = endpoint;
    while (url.ends_with("/")) url.pop_back();
    return url;
  }
  if (endpoint.empty() || endpoint.find(':') == std::string::npos) {
    throw ConfigError(str_cat("etcd endpoint '", endpoint, "' needs a port: host:port"));
  }
  return (tls ? "https://" : "http://") + endpoint;
}

std::size_t append_answer(char* data, std::size_t size, std::size_t count, void* user) {
  auto* out = static_cast<std::string*>(user);
  const std::size_t bytes = size * count;
  if (out->size() + bytes > kMaxAnswerBytes) return 0;  // ends the transfer with an error
  out->append(data, bytes);
  return bytes;
}

struct CurlSlist {
  curl_slist* list = nullptr;
  ~CurlSlist() { curl_slist_free_all(list); }
  void add(const std::string& line) {
    curl_slist* next = curl_slist_append(list, line.c_str());
    if (next == nullptr) throw Error("libcurl: out of memory");
    list = next;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Requests

class EtcdClient::Impl {
 public:
  explicit Impl(EtcdOptions o) : options(std::move(o)) {
    if (options.endpoints.empty()) throw ConfigError("etcd: no endpoint given (etcd://host:port[,host:port...])");
    if (options.request_timeout.count() <= 0 || options.unavailable_timeout.count() <= 0) {
      throw ConfigError("etcd: the request and unavailable timeouts must be positive");
    }
    if (options.cert_file.empty() != options.key_file.empty()) {
      throw ConfigError(
          "etcd: a client certificate needs its key and a key its certificate (--store-cert, --store-key)");
    }
    const bool tls = !options.ca_file.empty() || !options.cert_file.empty();
    for (const auto& e : options.endpoints) urls.push_back(base_url(e, tls));
    init_curl_once();
  }

  ~Impl() {
    for (CURL* handle : idle) curl_easy_cleanup(handle);
  }

  // How one request to one endpoint ended.
  struct Attempt {
    enum class Kind { ok, unavailable, unauthenticated, failed } kind = Kind::ok;
    json answer;
    std::string error;
    int code = 0;
  };

  // Sets what every request of this client shares: TLS, no proxy, no signals, timeouts.
  void configure(CURL* handle, std::chrono::milliseconds timeout) const {
    curl_easy_setopt(handle, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(handle, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(handle, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(handle, CURLOPT_CONNECTTIMEOUT_MS, long(std::max<std::int64_t>(1, timeout.count())));
    if (!options.ca_file.empty()) curl_easy_setopt(handle, CURLOPT_CAINFO, options.ca_file.c_str());
    if (!options.cert_file.empty()) curl_easy_setopt(handle, CURLOPT_SSLCERT, options.cert_file.c_str());
    if (!options.key_file.empty()) curl_easy_setopt(handle, CURLOPT_SSLKEY, options.key_file.c_str());
  }

  void add_headers(CurlSlist& headers) {
    headers.add("Content-Type: application/json");
    if (!options.user.empty()) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!token.empty()) headers.add("Authorization: " + token);
    }
  }

  CURL* take_handle() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (!idle.empty()) {
        CURL* handle = idle.back();
        idle.pop_back();
        return handle;
      }
    }
    CURL* handle = curl_easy_init();
    if (handle == nullptr) throw Error("libcurl: cannot create a handle");
    return handle;
  }

  void give_back(CURL* handle) {
    std::lock_guard<std::mutex> lock(mutex);
    idle.push_back(handle);
  }

  Attempt attempt(std::size_t endpoint, std::string_view path, const std::string& body,
                  std::chrono::milliseconds timeout) {
    CURL* handle = take_handle();
    curl_easy_reset(handle);
    configure(handle, timeout);
    const std::string url = urls[endpoint] + std::string(path);
    std::string answer;
    char error_text[CURL_ERROR_SIZE] = {};
    CurlSlist headers;
    add_headers(headers);
    curl_easy_setopt(handle, CURLOPT_URL, url.c_str());
    curl_easy_setopt(handle, CURLOPT_POSTFIELDS, body.c_str());
    curl_easy_setopt(handle, CURLOPT_POSTFIELDSIZE, long(body.size()));
    curl_easy_setopt(handle, CURLOPT_HTTPHEADER, headers.list);
    curl_easy_setopt(handle, CURLOPT_TIMEOUT_MS, long(std::max<std::int64_t>(1, timeout.count())));
    curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, append_answer);
    curl_easy_setopt(handle, CURLOPT_WRITEDATA, &answer);
    curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, error_text);
    const CURLcode result = curl_easy_perform(handle);
    long status = 0;
    curl_easy_getinfo(handle, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, nullptr);
    curl_easy_setopt(handle, CURLOPT_HTTPHEADER, nullptr);
    give_back(handle);

    Attempt a;
    if (result != CURLE_OK) {
      a.kind = Attempt::Kind::unavailable;
      a.error = str_cat(urls[endpoint], ": ", error_text[0] ? error_text : curl_easy_strerror(result));
      return a;
    }
    json parsed = json::parse(answer, nullptr, /*allow_exceptions=*/false);
    if (status == 200 && parsed.is_object()) {
      a.answer = std::move(parsed);
      return a;
    }
    std::string message = answer.substr(0, 200);
    if (parsed.is_object()) {
      a.code = parsed.contains("code") && parsed["code"].is_number_integer() ? parsed["code"].get<int>() : 0;
      for (const char* field : {"message", "error"}) {
        if (parsed.contains(field) && parsed[field].is_string()) {
          message = parsed[field].get<std::string>();
          break;
        }
      }
    }
    a.error = str_cat(urls[endpoint], ": HTTP ", status, ": ", message);
    if (a.code == kUnavailable || a.code == kDeadlineExceeded || a.code == kAborted || status >= 500 ||
        (status == 200 && !parsed.is_object())) {
      // A server that is starting, has no leader, or changes leader; or something else answering on its port.
      a.kind = Attempt::Kind::unavailable;
    } else if (a.code == kUnauthenticated || message.find("invalid auth token") != std::string::npos ||
               message.find("user name is empty") != std::string::npos) {  // auth is on and no user was given
      a.kind = Attempt::Kind::unauthenticated;
    } else {
      a.kind = Attempt::Kind::failed;
    }
    return a;
  }

  // Gets a token for options.user from the endpoint that will be asked next.
  void authenticate(std::size_t endpoint) {
    const json body = {{"name", options.user}, {"password", options.password}};
    {
      std::lock_guard<std::mutex> lock(mutex);
      token.clear();
    }
    Attempt a = attempt(endpoint, "/v3/auth/authenticate", body.dump(), options.request_timeout);
    if (a.kind == Attempt::Kind::ok && a.answer.contains("token") && a.answer["token"].is_string()) {
      std::lock_guard<std::mutex> lock(mutex);
      token = a.answer["token"].get<std::string>();
      return;
    }
    if (a.kind == Attempt::Kind::unavailable) return;  // the caller moves on to the next endpoint
    throw ConfigError(str_cat("etcd refused the user '", options.user, "' (", a.error,
                              "); check the user and password given for the store"));
  }

  json call(std::string_view path, const json& body) {
    const std::string text = body.dump();
    const auto deadline = EtcdClock::now() + options.unavailable_timeout;
    auto backoff = kFirstBackoff;
    std::string last_error;
    bool authenticated_now = false;
    for (;;) {
      const std::size_t first = preferred.load();
      for (std::size_t i = 0; i < urls.size(); ++i) {
        const std::size_t endpoint = (first + i) % urls.size();
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - EtcdClock::now());
        if (left.count() <= 0) break;
        if (!options.user.empty() && current_token().empty()) authenticate(endpoint);
        Attempt a = attempt(endpoint, path, text, std::min(options.request_timeout, left));
        switch (a.kind) {
          case Attempt::Kind::ok:
            preferred = endpoint;
            return std::move(a.answer);
          case Attempt::Kind::unavailable:
            last_error = a.error;
            continue;
          case Attempt::Kind::unauthenticated:
            if (!options.user.empty() && !authenticated_now) {
              authenticated_now = true;  // tokens expire: one fresh token per call
              authenticate(endpoint);
              --i;
              continue;
            }
            throw AuthError(str_cat("etcd refused ", path, ": ", a.error,
                                    options.user.empty() ? "; the store needs a user and password" : ""));
          case Attempt::Kind::failed:
            if (a.code == kPermissionDenied) {
              throw ConfigError(str_cat("etcd refused ", path, " for user '", options.user, "': ", a.error,
                                        "; grant the user read and write access to the keys under '", options.prefix,
                                        "'"));
            }
            throw ProtocolError(str_cat("etcd refused ", path, ": ", a.error));
        }
      }
      if (EtcdClock::now() >= deadline) {
        throw TimeoutError(str_cat(describe(), " did not answer for ", detail::seconds(options.unavailable_timeout),
                                   " (last error: ", last_error.empty() ? "none" : last_error,
                                   "); is etcd running and reachable from this host?"));
      }
      log::debug("etcd: no endpoint answered (", last_error, "); trying again in ", backoff.count(), " ms");
      std::this_thread::sleep_for(
          std::min(backoff, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - EtcdClock::now())));
      backoff = std::min(backoff * 2, kLongestBackoff);
    }
  }

  std::string current_token() {
    std::lock_guard<std::mutex> lock(mutex);
    return token;
  }

  std::string describe() const {
    std::string text = "etcd at ";
    for (std::size_t i = 0; i < options.endpoints.size(); ++i) text += (i ? ", " : "") + options.endpoints[i];
    return text;
  }

  std::string key(std::string_view k) const { return base64_encode(options.prefix + std::string(k)); }

  EtcdOptions options;
  std::vector<std::string> urls;
  std::atomic<std::size_t> preferred{0};
  std::mutex mutex;  // idle, token
  std::vector<CURL*> idle;
  std::string token;
};

EtcdClient::EtcdClient(EtcdOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
EtcdClient::~EtcdClient() = default;

const EtcdOptions& EtcdClient::options() const { return impl_->options; }
std::string EtcdClient::describe() const { return impl_->describe(); }

namespace {

json range_request(const std::string& encoded_key, const std::string& full_key, bool prefix) {
  json r = {{"key", encoded_key}};
  if (prefix) r["range_end"] = base64_encode(prefix_end(full_key));
  return r;
}

}  // namespace

EtcdClient::Range EtcdClient::range(std::string_view key, bool prefix) {
  const std::string full = impl_->options.prefix + std::string(key);
  return parse_range(impl_->call("/v3/kv/range", range_request(impl_->key(key), full, prefix)), impl_->options.prefix);
}

std::int64_t EtcdClient::put(std::string_view key, std::string_view value, std::int64_t lease) {
  json body = {{"key", impl_->key(key)}, {"value", base64_encode(value)}};
  if (lease != 0) body["lease"] = std::to_string(lease);
  return header_revision(impl_->call("/v3/kv/put", body));
}

std::int64_t EtcdClient::erase(std::string_view key, bool prefix) {
  const std::string full = impl_->options.prefix + std::string(key);
  return int64_field(impl_->call("/v3/kv/deleterange", range_request(impl_->key(key), full, prefix)), "deleted");
}

EtcdClient::TxnResult EtcdClient::txn(const std::vector<Compare>& compares, const std::vector<Operation>& success,
                                      const std::vector<Operation>& failure) {
  static const char* const kTargets[] = {"VERSION", "CREATE", "MOD", "VALUE", "LEASE"};
  static const char* const kResults[] = {"EQUAL", "GREATER", "LESS", "NOT_EQUAL"};
  static const char* const kNumberFields[] = {"version", "create_revision", "mod_revision", "", "lease"};
  json body = json::object();
  body["compare"] = json::array();
  for (const Compare& c : compares) {
    json j = {{"key", impl_->key(c.key)}, {"target", kTargets[int(c.target)]}, {"result", kResults[int(c.result)]}};
    if (c.target == Compare::Target::value) {
      j["value"] = base64_encode(c.value);
    } else {
      j[kNumberFields[int(c.target)]] = std::to_string(c.number);
    }
    body["compare"].push_back(std::move(j));
  }
  auto operations = [&](const std::vector<Operation>& ops) {
    json list = json::array();
    for (const Operation& op : ops) {
      const std::string full = impl_->options.prefix + op.key;
      switch (op.kind) {
        case Operation::Kind::put: {
          json put = {{"key", impl_->key(op.key)}, {"value", base64_encode(op.value)}};
          if (op.lease != 0) put["lease"] = std::to_string(op.lease);
          list.push_back({{"request_put", std::move(put)}});
          break;
        }
        case Operation::Kind::erase:
          list.push_back({{"request_delete_range", range_request(impl_->key(op.key), full, op.prefix)}});
          break;
        case Operation::Kind::range:
          list.push_back({{"request_range", range_request(impl_->key(op.key), full, op.prefix)}});
          break;
      }
    }
    return list;
  };
  body["success"] = operations(success);
  body["failure"] = operations(failure);
  const json answer = impl_->call("/v3/kv/txn", body);
  TxnResult result;
  result.revision = header_revision(answer);
  result.succeeded =
      answer.contains("succeeded") && answer["succeeded"].is_boolean() && answer["succeeded"].get<bool>();
  auto it = answer.find("responses");
  if (it != answer.end() && it->is_array()) {
    for (const json& r : *it) {
      auto range = r.find("response_range");
      if (range != r.end()) result.ranges.push_back(parse_range(*range, impl_->options.prefix));
    }
  }
  return result;
}

std::int64_t EtcdClient::grant_lease(std::chrono::seconds ttl) {
  if (ttl.count() < 1) throw ConfigError("an etcd lease lasts at least 1 s");
  const json answer = impl_->call("/v3/lease/grant", {{"TTL", std::to_string(ttl.count())}});
  const std::int64_t id = int64_field(answer, "ID");
  if (id == 0) throw ProtocolError(str_cat(describe(), " granted no lease: ", answer.dump()));
  return id;
}

std::int64_t EtcdClient::keep_alive(std::int64_t lease) {
  // The gateway streams keep-alive answers; one request gives one {"result": {...}}, whose TTL is absent once the
  // lease is gone.
  const json answer = impl_->call("/v3/lease/keepalive", {{"ID", std::to_string(lease)}});
  auto it = answer.find("result");
  return it == answer.end() || !it->is_object() ? 0 : int64_field(*it, "TTL");
}

void EtcdClient::revoke_lease(std::int64_t lease) {
  try {
    impl_->call("/v3/lease/revoke", {{"ID", std::to_string(lease)}});
  } catch (const ProtocolError& e) {
    if (std::string_view(e.what()).find("lease not found") == std::string_view::npos) throw;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Watch streams

class EtcdWatch::Stream {
 public:
  Stream() {
    init_curl_once();
    multi_ = curl_multi_init();
    if (multi_ == nullptr) throw Error("libcurl: cannot create a multi handle");
  }
  ~Stream() {
    close();
    curl_multi_cleanup(multi_);
  }

  bool open() const { return easy_ != nullptr; }

  void start(EtcdClient::Impl& client, std::size_t endpoint, const std::string& body) {
    close();
    easy_ = curl_easy_init();
    if (easy_ == nullptr) throw Error("libcurl: cannot create a handle");
    endpoint_ = endpoint;
    body_ = body;
    buffer_.clear();
    error_text_[0] = 0;
    headers_ = std::make_unique<CurlSlist>();
    client.add_headers(*headers_);
    client.configure(easy_, client.options.request_timeout);
    url_ = client.urls[endpoint] + "/v3/watch";
    curl_easy_setopt(easy_, CURLOPT_URL, url_.c_str());
    curl_easy_setopt(easy_, CURLOPT_POSTFIELDS, body_.c_str());
    curl_easy_setopt(easy_, CURLOPT_POSTFIELDSIZE, long(body_.size()));
    curl_easy_setopt(easy_, CURLOPT_HTTPHEADER, headers_->list);
    curl_easy_setopt(easy_, CURLOPT_WRITEFUNCTION, append_answer);
    curl_easy_setopt(easy_, CURLOPT_WRITEDATA, &buffer_);
    curl_easy_setopt(easy_, CURLOPT_ERRORBUFFER, error_text_);
    // A stream that is cut off (no reset, no FIN) is found by TCP keep-alive within a few seconds.
    curl_easy_setopt(easy_, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(easy_, CURLOPT_TCP_KEEPIDLE, 2L);
    curl_easy_setopt(easy_, CURLOPT_TCP_KEEPINTVL, 1L);
    curl_multi_add_handle(multi_, easy_);
  }

  void close() {
    if (easy_ == nullptr) return;
    curl_multi_remove_handle(multi_, easy_);
    curl_easy_cleanup(easy_);
    easy_ = nullptr;
    headers_.reset();
  }

  // Runs the transfer; moves complete lines out of the buffer. Returns false once the stream has ended, with why.
  bool perform(std::vector<std::string>& lines, std::string& ended_because) {
    int running = 0;
    curl_multi_perform(multi_, &running);
    std::size_t start = 0;
    for (std::size_t nl; (nl = buffer_.find('\n', start)) != std::string::npos; start = nl + 1) {
      if (nl > start) lines.emplace_back(buffer_, start, nl - start);
    }
    buffer_.erase(0, start);
    int queued = 0;
    while (CURLMsg* message = curl_multi_info_read(multi_, &queued)) {
      if (message->msg != CURLMSG_DONE) continue;
      long status = 0;
      curl_easy_getinfo(easy_, CURLINFO_RESPONSE_CODE, &status);
      const CURLcode result = message->data.result;
      ended_because = str_cat(url_, ": ",
                              result != CURLE_OK ? (error_text_[0] ? error_text_ : curl_easy_strerror(result))
                                                 : str_cat("the stream ended (HTTP ", status, ")"));
      if (!buffer_.empty()) lines.push_back(std::move(buffer_));  // an error answer without a newline
      buffer_.clear();
      close();
      return false;
    }
    return true;
  }

  void poll(std::chrono::milliseconds timeout) {
    curl_multi_poll(multi_, nullptr, 0, int(std::max<std::int64_t>(0, timeout.count())), nullptr);
  }
  void wakeup() { curl_multi_wakeup(multi_); }
  std::size_t endpoint() const { return endpoint_; }

 private:
  CURLM* multi_ = nullptr;
  CURL* easy_ = nullptr;
  std::size_t endpoint_ = 0;
  std::string url_;
  std::string body_;
  std::string buffer_;
  std::unique_ptr<CurlSlist> headers_;
  char error_text_[CURL_ERROR_SIZE] = {};
};

EtcdWatch::EtcdWatch(EtcdClient& client, std::string key, bool prefix, std::int64_t start_revision)
    : client_(client),
      key_(std::move(key)),
      prefix_(prefix),
      next_revision_(std::max<std::int64_t>(1, start_revision)),
      stream_(std::make_unique<Stream>()) {}

EtcdWatch::~EtcdWatch() = default;

void EtcdWatch::interrupt() {
  interrupted_ = true;
  stream_->wakeup();
}

std::vector<EtcdEvent> EtcdWatch::next(EtcdClock::time_point until) {
  EtcdClient::Impl& client = *client_.impl_;
  std::vector<EtcdEvent> events;
  auto backoff = kFirstBackoff;
  auto retry_at = EtcdClock::now();
  std::string last_error;
  for (;;) {
    if (interrupted_.exchange(false)) return events;
    const auto now = EtcdClock::now();
    if (!stream_->open() && now >= retry_at) {
      const std::string full = client.options.prefix + key_;
      json request = range_request(client.key(key_), full, prefix_);
      request["start_revision"] = std::to_string(next_revision_);
      if (!client.options.user.empty() && client.current_token().empty()) {
        client.authenticate(client.preferred.load());
      }
      stream_->start(client, client.preferred.load(), json{{"create_request", std::move(request)}}.dump());
    }
    std::vector<std::string> lines;
    std::string ended_because;
    const bool still_open = !stream_->open() || stream_->perform(lines, ended_because);
    for (const std::string& line : lines) {
      const std::size_t before = events.size();
      try {
        parse_watch_line(line, client.options.prefix, events);
      } catch (const EtcdCompacted&) {
        stream_->close();
        throw;
      } catch (const ProtocolError& e) {
        // An error answer (no leader, an expired token, a server going down): open the stream again.
        ended_because = e.what();
        if (line.find("auth") != std::string::npos) client.authenticate(stream_->endpoint());
        stream_->close();
      }
      for (std::size_t i = before; i < events.size(); ++i) {
        next_revision_ = std::max(next_revision_, events[i].kv.mod_revision + 1);
      }
    }
    if (!still_open || (!stream_->open() && !ended_because.empty())) {
      last_error = ended_because;
      log::debug("etcd watch of '", key_, "' broke (", ended_because, "); opening it again");
      // The next attempt goes to the next endpoint; after a full round, wait a little longer each time.
      const std::size_t next_endpoint = (stream_->endpoint() + 1) % client.urls.size();
      client.preferred = next_endpoint;
      retry_at = EtcdClock::now() + (next_endpoint == 0 ? backoff : std::chrono::milliseconds(0));
      if (next_endpoint == 0) backoff = std::min(backoff * 2, kLongestBackoff);
    }
    if (!events.empty()) return events;
    const auto after = EtcdClock::now();
    if (after >= until) return events;
    const auto wake = stream_->open() ? until : std::min(until, retry_at);
    stream_->poll(std::chrono::duration_cast<std::chrono::milliseconds>(wake - after) + std::chrono::milliseconds(1));
  }
}

bool parse_watch_line(std::string_view line, std::string_view prefix, std::vector<EtcdEvent>& events) {
  const json parsed = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_object()) throw ProtocolError(str_cat("etcd watch: unreadable answer '", line.substr(0, 200), "'"));
  auto error = parsed.find("error");
  if (error != parsed.end()) {
    throw ProtocolError(str_cat(
        "etcd watch: ", error->is_object() && error->contains("message") ? (*error)["message"].dump() : error->dump()));
  }
  auto result = parsed.find("result");
  if (result == parsed.end() || !result->is_object()) {
    throw ProtocolError(str_cat("etcd watch: an answer without a result: '", line.substr(0, 200), "'"));
  }
  const std::int64_t compacted = int64_field(*result, "compact_revision");
  if (compacted > 0) {
    throw EtcdCompacted(str_cat("etcd compacted the revisions up to ", compacted, " that a watch needed"), compacted);
  }
  if (result->contains("canceled") && (*result)["canceled"].is_boolean() && (*result)["canceled"].get<bool>()) {
    throw ProtocolError(str_cat("etcd cancelled a watch: ", result->value("cancel_reason", std::string("no reason"))));
  }
  auto list = result->find("events");
  if (list == result->end() || !list->is_array() || list->empty()) return false;
  for (const json& e : *list) {
    EtcdEvent event;
    // The gateway leaves out fields that hold their default: a put has no "type".
    event.deleted = e.contains("type") && e["type"] == "DELETE";
    auto kv = e.find("kv");
    if (kv == e.end()) throw ProtocolError("etcd watch: an event without a key-value");
    event.kv = parse_kv(*kv, prefix);
    events.push_back(std::move(event));
  }
  return true;
}

EtcdClient::Range parse_range_answer(std::string_view text, std::string_view prefix) {
  const json parsed = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_object()) throw ProtocolError(str_cat("etcd range: unreadable answer '", text.substr(0, 200), "'"));
  return parse_range(parsed, prefix);
}

// ---------------------------------------------------------------------------------------------------------------
// base64

namespace {
constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}

std::string base64_encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const std::uint32_t v = std::uint32_t(std::uint8_t(bytes[i])) << 16 |
                            std::uint32_t(std::uint8_t(bytes[i + 1])) << 8 | std::uint8_t(bytes[i + 2]);
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
  }
  const std::size_t rest = bytes.size() - i;
  if (rest > 0) {
    std::uint32_t v = std::uint32_t(std::uint8_t(bytes[i])) << 16;
    if (rest == 2) v |= std::uint32_t(std::uint8_t(bytes[i + 1])) << 8;
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += rest == 2 ? kAlphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string base64_decode(std::string_view text) {
  auto value_of = [&](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  if (text.size() % 4 != 0) {
    throw ProtocolError(str_cat("etcd answered base64 of ", text.size(), " characters, not a multiple of 4"));
  }
  std::string out;
  out.reserve(text.size() / 4 * 3);
  for (std::size_t i = 0; i < text.size(); i += 4) {
    const bool last = i + 4 == text.size();
    const int pad = last ? int(text[i + 3] == '=') + int(text[i + 2] == '=') : 0;
    if (pad == 1 && text[i + 3] != '=') throw ProtocolError("etcd answered base64 with padding inside");
    std::uint32_t v = 0;
    for (int j = 0; j < 4; ++j) {
      const char c = text[i + std::size_t(j)];
      int d = 0;
      if (j >= 4 - pad) {
        if (c != '=') throw ProtocolError("etcd answered base64 with padding inside");
      } else if ((d = value_of(c)) < 0) {
        throw ProtocolError(str_cat("etcd answered base64 with the character '", c, "'"));
      }
      v = v << 6 | std::uint32_t(d);
    }
    out += char(v >> 16);
    if (pad < 2) out += char((v >> 8) & 0xff);
    if (pad < 1) out += char(v & 0xff);
  }
  return out;
}

}  // namespace aikido::elastic
