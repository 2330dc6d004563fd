#include "launch/hostfile.hpp"

#include <aikido/errors.hpp>
#include <fstream>
#include <sstream>

#include "base/error.hpp"

namespace aikido::launch {

using detail::str_cat;

namespace {

constexpr int kMaxSlots = 1024;

int parse_slots(std::string_view text, const std::string& where) {
  int value = 0;
  if (text.empty() || text.size() > 5 || text.find_first_not_of("0123456789") != std::string_view::npos ||
      (value = std::stoi(std::string(text))) < 1 || value > kMaxSlots) {
    throw ConfigError(str_cat(where, ": slots '", text, "' must be a number from 1 to ", kMaxSlots));
  }
  return value;
}

void check_host(std::string_view host, const std::string& where) {
  if (host.empty() || host.find_first_of(" \t/'\"") != std::string_view::npos) {
    throw ConfigError(str_cat(where, ": '", host, "' is not a host name"));
  }
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

HostSlots host_with_colon(std::string_view entry, const std::string& where) {
  HostSlots h;
  const auto colon = entry.rfind(':');
  h.host = std::string(entry.substr(0, colon));
  if (colon != std::string_view::npos) h.slots = parse_slots(entry.substr(colon + 1), where);
  check_host(h.host, where);
  return h;
}

void check_unique(const std::vector<HostSlots>& hosts, const std::string& where) {
  for (std::size_t i = 0; i < hosts.size(); ++i) {
    for (std::size_t j = 0; j < i; ++j) {
      if (hosts[i].host == hosts[j].host) {
        throw ConfigError(str_cat(where, ": host '", hosts[i].host, "' is listed twice; give its slots once"));
      }
    }
  }
}

}  // namespace

std::vector<HostSlots> parse_host_list(std::string_view text) {
  const std::string where = str_cat("-H '", text, "'");
  std::vector<HostSlots> hosts;
  while (!text.empty()) {
    const auto comma = text.find(',');
    const std::string_view entry = trim(text.substr(0, comma));
    text = comma == std::string_view::npos ? std::string_view() : text.substr(comma + 1);
    hosts.push_back(host_with_colon(entry, where + " (the form is HOST:SLOTS,HOST:SLOTS,...)"));
  }
  if (hosts.empty()) throw ConfigError(where + " names no host; the form is HOST:SLOTS,HOST:SLOTS,...");
  check_unique(hosts, where);
  return hosts;
}

std::vector<HostSlots> parse_hostfile(std::string_view text, std::string_view file_name) {
  std::vector<HostSlots> hosts;
  int number = 0;
  std::istringstream in{std::string(text)};
  std::string line;
  while (std::getline(in, line)) {
    ++number;
    const std::string where = str_cat("hostfile ", file_name, " line ", number);
    std::string_view content = line;
    content = trim(content.substr(0, content.find('#')));
    if (content.empty()) continue;
    const auto space = content.find_first_of(" \t");
    const std::string_view first = content.substr(0, space);
    HostSlots h = host_with_colon(first, where);
    if (space != std::string_view::npos) {
      const std::string_view rest = trim(content.substr(space));
      if (!rest.starts_with("slots=") || first.find(':') != std::string_view::npos) {
        throw ConfigError(str_cat(where, ": '", content, "' is not 'HOST slots=N'"));
      }
      h.slots = parse_slots(rest.substr(6), where);
    }
    hosts.push_back(std::move(h));
  }
  if (hosts.empty()) throw ConfigError(str_cat("hostfile ", file_name, " names no host (lines 'HOST slots=N')"));
  check_unique(hosts, str_cat("hostfile ", file_name));
  return hosts;
}

std::vector<HostSlots> read_hostfile(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(str_cat("cannot read the hostfile '", path, "'"));
  std::stringstream text;
  text << in.rdbuf();
  return parse_hostfile(text.str(), path);
}

std::vector<HostSlots> place_workers(std::vector<HostSlots> hosts, int np) {
  int total = 0;
  for (const auto& h : hosts) total += h.slots;
  if (np > total) {
    throw ConfigError(str_cat("-np ", np, " workers do not fit the ", total, " slots of the hosts given; list more ",
                              "hosts or slots, or ask for fewer workers"));
  }
  std::vector<HostSlots> used;
  for (auto& h : hosts) {
    if (np == 0) break;
    h.slots = std::min(h.slots, np);
    np -= h.slots;
    used.push_back(std::move(h));
  }
  return used;
}

std::string shell_quote(std::string_view text) {
  if (!text.empty() &&
      text.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.,/:=@+%") ==
          std::string_view::npos) {
    return std::string(text);
  }
  std::string out = "'";
  for (char c : text) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

std::vector<std::string> launch_argv(const std::string& launch_command, const std::string& host,
                                     const std::string& directory, const std::vector<std::string>& remote) {
  std::vector<std::string> argv;
  std::istringstream words(launch_command.empty() ? "ssh" : launch_command);
  for (std::string w; words >> w;) argv.push_back(w);
  argv.push_back(host);
  std::string line = directory.empty() ? "" : "cd " + shell_quote(directory) + " && exec";
  for (const auto& word : remote) line += (line.empty() ? "" : " ") + shell_quote(word);
  argv.push_back(std::move(line));
  return argv;
}

}  // namespace aikido::launch
