// aikido-ctl's command line and the control file aikido-run writes: parsed apart from main so that tests and fuzz
// targets reach them.
#pragma once

#include <aikido/tls.hpp>
#include <map>
#include <stdexcept>
#include <string>

namespace aikido::ctl {

/// A bad command line (exit status 2, with the usage).
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct CtlOptions {
  std::string control_file, store_url, job_id, secret_file;
  std::string command;  // "status" or "resize"
  int workers = 0;      // resize N
  bool help = false;    // -h / --help: print the usage, do nothing else
};

/// Parses argv (argv[0] is the program). Throws UsageError saying what is wrong.
CtlOptions parse_ctl_options(int argc, const char* const* argv);

/// What the control file names: the store's address, the job secret, the job id, and the store's TLS (tls=0|1,
/// tls_cert=, tls_key=, tls_ca=).
struct Control {
  std::string store;
  std::string secret;
  std::string job;
  TlsOptions tls;
};

/// "KEY=VALUE" items separated by `separator` ('\n': lines, where '#' starts a comment; ' ': words).
std::map<std::string, std::string> read_key_values(const std::string& text, char separator);

/// The control file's text; `path` names it in errors. Throws aikido::ConfigError when store=, secret= or job= is
/// missing or empty, tls= is neither 0 nor 1, or some but not all of tls_cert=, tls_key= and tls_ca= are given.
Control parse_control(const std::string& text, const std::string& path);

}  // namespace aikido::ctl
