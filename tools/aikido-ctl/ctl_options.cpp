#include "ctl_options.hpp"

#include <aikido/cluster_spec.hpp>
#include <aikido/errors.hpp>
#include <cerrno>
#include <cstdlib>
#include <sstream>

namespace aikido::ctl {

CtlOptions parse_ctl_options(int argc, const char* const* argv) {
  CtlOptions o;
  auto value_of = [&](const std::string& arg, const char* flag, int& i, std::string& out) {
    const std::string with_eq = std::string(flag) + "=";
    if (arg == flag) {
      if (i + 1 >= argc) throw UsageError(std::string(flag) + " needs a value");
      out = argv[++i];
      return true;
    }
    if (arg.starts_with(with_eq)) {
      out = arg.substr(with_eq.size());
      return true;
    }
    return false;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      o.help = true;
      return o;
    }
    if (value_of(arg, "--control-file", i, o.control_file) || value_of(arg, "--store", i, o.store_url) ||
        value_of(arg, "--job-id", i, o.job_id) || value_of(arg, "--secret-file", i, o.secret_file)) {
      continue;
    }
    if (o.command.empty() && (arg == "status" || arg == "resize")) {
      o.command = arg;
      if (arg == "resize") {
        if (i + 1 >= argc) throw UsageError("resize needs the number of workers");
        const char* text = argv[++i];
        char* end = nullptr;
        errno = 0;
        const long v = std::strtol(text, &end, 10);
        if (end == text || *end != '\0' || errno == ERANGE || v < 1 || v > ClusterSpec::kMaxWorkers) {
          throw UsageError(std::string("resize: '") + text + "' is not a number of workers (1.." +
                           std::to_string(ClusterSpec::kMaxWorkers) + ")");
        }
        o.workers = int(v);
      }
      continue;
    }
    throw UsageError("unexpected argument '" + arg + "'");
  }
  if (o.command.empty()) throw UsageError("missing command: status or resize N");
  if (!o.store_url.empty()) {
    if (!o.control_file.empty()) throw UsageError("give --control-file or --store, not both");
    if (o.job_id.empty() || o.secret_file.empty()) {
      throw UsageError("--store needs --job-id ID and --secret-file F, as the job's launchers were given");
    }
  } else if (o.control_file.empty()) {
    throw UsageError("missing --control-file F (or --store, --job-id, --secret-file)");
  }
  return o;
}

std::map<std::string, std::string> read_key_values(const std::string& text, char separator) {
  std::map<std::string, std::string> values;
  std::istringstream in(text);
  std::string item;
  while (separator == '\n' ? static_cast<bool>(std::getline(in, item)) : static_cast<bool>(in >> item)) {
    if (item.empty() || item[0] == '#') continue;
    const auto eq = item.find('=');
    if (eq != std::string::npos) values[item.substr(0, eq)] = item.substr(eq + 1);
  }
  return values;
}

Control parse_control(const std::string& text, const std::string& path) {
  auto values = read_key_values(text, '\n');
  Control c{values["store"], values["secret"], values["job"], {}};
  if (c.store.empty() || c.secret.empty() || c.job.empty()) {
    throw ConfigError("the control file '" + path + "' lacks store=, secret= or job=");
  }
  const std::string tls = values["tls"];
  if (!tls.empty() && tls != "0" && tls != "1") {
    throw ConfigError("the control file '" + path + "' has tls=" + tls + "; it must be 0 or 1");
  }
  c.tls.enabled = tls == "1";
  c.tls.cert_file = values["tls_cert"];
  c.tls.key_file = values["tls_key"];
  c.tls.ca_file = values["tls_ca"];
  const int files = int(!c.tls.cert_file.empty()) + int(!c.tls.key_file.empty()) + int(!c.tls.ca_file.empty());
  if (files != 0 && files != 3) {
    throw ConfigError("the control file '" + path + "' names some but not all of tls_cert=, tls_key= and tls_ca=");
  }
  return c;
}

}  // namespace aikido::ctl
