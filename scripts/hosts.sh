#!/usr/bin/env bash
# Emulated hosts on one machine: one network namespace per host, joined by veth pairs to one bridge.
#
#   scripts/hosts.sh up N [--owner PID]   make hosts 0..N-1 (removing any left from an earlier run); with --owner,
#                                         they are removed as soon as process PID has exited (a killed test), and
#                                         hosts another live owner holds are waited for (AIKIDO_HOSTS_WAIT seconds)
#   scripts/hosts.sh down [--owner PID]   remove every emulated host and the bridge (with --owner: only if PID
#                                         owns them)
#   scripts/hosts.sh exec I CMD [ARG...]  run CMD on host I: in its namespace, with host name hI
#   scripts/hosts.sh ssh hI COMMAND...     like ssh: join the words into one command line and run it with sh -c on
#                                         host I (aikido-run's --launch-command, mpirun's plm_rsh_agent)
#   scripts/hosts.sh address I            print host I's address
#   scripts/hosts.sh shape I RATE         limit host I's link to RATE (tc units: 1gbit, 100mbit, ...) both ways
#   scripts/hosts.sh unshape I            remove the limit
#   scripts/hosts.sh cut I | heal I       take host I's link down (a partition) or up again
#   scripts/hosts.sh check                exit 0 when hosts can be made here, else print why and exit 1
#
# Host I is the namespace aikido-hI with address 198.18.0.(10+I)/24 (198.18.0.0/15 is reserved for benchmarks) on
# its interface eth0 and `lo` up; the bridge aikido-br holds 198.18.0.1, so processes outside the namespaces (an
# etcd server, a test) reach every host and every host reaches them. As on a real cluster, the hosts' names resolve:
# `up` adds "198.18.0.(10+I) hI" lines to /etc/hosts (marked, and removed by `down`). Hosts share the file system and /dev/shm, as
# emulated hosts do; each has its own host name, port space and abstract Unix sockets. This kernel has no netem:
# `shape` uses tbf (bandwidth only) and `cut` stands in for a lost link. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
set -euo pipefail

readonly bridge=aikido-br
readonly bridge_address=198.18.0.1
readonly prefix=aikido-h
# Who made the hosts now present (up --owner PID writes it): a watchdog removes only the hosts of its own owner.
readonly owner_file=/run/aikido-hosts.owner
readonly hosts_mark="# aikido emulated host"
readonly lock_file=/run/aikido-hosts.lock

die() {
  echo "hosts.sh: $*" >&2
  exit 1
}

host_address() { echo "198.18.0.$((10 + $1))"; }
namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep "^${prefix}[0-9]*$" || true; }

check() {
  [ "$(id -u)" -eq 0 ] || { echo "emulated hosts need root (network namespaces)"; return 1; }
  command -v ip >/dev/null || { echo "emulated hosts need iproute2 (ip)"; return 1; }
  command -v unshare >/dev/null || { echo "emulated hosts need unshare (util-linux)"; return 1; }
  local probe=aikido-probe-$$
  if ! ip netns add "$probe" 2>/dev/null; then
    echo "cannot create a network namespace here (ip netns add failed: no CAP_SYS_ADMIN?)"
    return 1
  fi
  ip netns del "$probe"
  if ! ip link add akprobe$$ type bridge 2>/dev/null; then
    echo "cannot create a bridge here (ip link add type bridge failed: no CAP_NET_ADMIN?)"
    return 1
  fi
  ip link del akprobe$$
}

down() {
  for ns in $(namespaces); do
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  rm -f "$owner_file"
  if grep -q "$hosts_mark" /etc/hosts 2>/dev/null; then
    # In place (not a rename): /etc/hosts may be a bind mount.
    grep -v "$hosts_mark" /etc/hosts >/etc/hosts.aikido.tmp && cat /etc/hosts.aikido.tmp >/etc/hosts
    rm -f /etc/hosts.aikido.tmp
  fi
  # veth ends left in the root namespace vanish with their peers; remove strays all the same.
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^${prefix}[0-9]*-br$" || true); do
    ip link del "$link" 2>/dev/null || true
  done
}

# Hosts have fixed names: while another live process owns them (a test run from another checkout), wait for it to
# finish, up to $AIKIDO_HOSTS_WAIT seconds (default 1200). The lock makes checking, claiming and making one step.
claim() {
  local owner=$1 waited=0 limit=${AIKIDO_HOSTS_WAIT:-1200} holder
  exec 9>"$lock_file"
  while :; do
    flock 9
    holder=$(cat "$owner_file" 2>/dev/null || true)
    if [ -z "$owner" ] || [ -z "$holder" ] || [ "$holder" = none ] || [ "$holder" = "$owner" ] ||
      ! kill -0 "$holder" 2>/dev/null; then
      down
      echo "${owner:-none}" >"$owner_file"
      return  # still locked: up makes the hosts, then unlocks
    fi
    flock -u 9
    [ "$waited" -eq 0 ] && echo "hosts.sh: the emulated hosts belong to process $holder; waiting for it to finish" >&2
    [ "$waited" -ge $((limit * 2)) ] && die "the emulated hosts still belong to process $holder after ${limit} s"
    sleep 0.5
    waited=$((waited + 1))
  done
}

up() {
  local n=$1 owner=${2:-}
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "up N: N must be 1..200, not '$n'"
  claim "$owner"
  ip link add "$bridge" type bridge
  ip addr add "$bridge_address/24" dev "$bridge"
  ip link set "$bridge" up
  for ((i = 0; i < n; i++)); do
    local ns=$prefix$i outer=$prefix$i-br
    ip netns add "$ns"
    ip link add "$outer" type veth peer name eth0 netns "$ns"
    ip link set "$outer" master "$bridge"
    ip link set "$outer" up
    ip netns exec "$ns" ip addr add "$(host_address "$i")/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip route add default via "$bridge_address" dev eth0
    echo "$(host_address "$i") h$i $hosts_mark" >>/etc/hosts
  done
  flock -u 9
  if [ -n "$owner" ]; then
    # Removes the hosts once the owner has gone, however it ended, unless another owner has made hosts since.
    # Detached, so that it outlives this script.
    setsid bash -c "while kill -0 $owner 2>/dev/null; do sleep 0.5; done
      '$0' down --owner $owner" </dev/null >/dev/null 2>&1 9>&- &
  fi
}

host_index() {
  [[ "${1:-}" =~ ^[0-9]+$ ]] || die "host index must be a number (or hN), not '${1:-}'"
  ip netns list | awk '{print $1}' | grep -qx "$prefix$1" || die "host $1 does not exist (scripts/hosts.sh up N)"
}

cmd=${1:-}
shift || true
# Hosts may be named by their index or their host name (hI).
if [ $# -ge 1 ] && [[ "$cmd" =~ ^(exec|ssh|shape|unshape|cut|heal|address)$ ]] && [[ "$1" =~ ^h[0-9]+$ ]]; then
  set -- "${1#h}" "${@:2}"
fi
case "$cmd" in
  up)
    [ $# -ge 1 ] || die "usage: hosts.sh up N [--owner PID]"
    n=$1
    owner=""
    if [ "${2:-}" = "--owner" ]; then owner=${3:?--owner needs a PID}; fi
    up "$n" "$owner"
    ;;
  down)
    # With --owner, only that owner's hosts are removed (another process may have made hosts since).
    if [ "${1:-}" = "--owner" ]; then
      exec 9>"$lock_file"
      flock 9
      [ "$(cat "$owner_file" 2>/dev/null || true)" = "${2:?--owner needs a PID}" ] || exit 0
    fi
    down
    ;;
  exec)
    host_index "${1:-}"
    i=$1
    shift
    [ $# -ge 1 ] || die "usage: hosts.sh exec I CMD [ARG...]"
    exec ip netns exec "$prefix$i" unshare --uts sh -c 'hostname "$0" && exec "$@"' "h$i" "$@"
    ;;
  ssh)
    host_index "${1:-}"
    [ $# -ge 2 ] || die "usage: hosts.sh ssh HOST COMMAND LINE... (joined by spaces and run by sh -c, as ssh does)"
    i=$1
    shift
    exec ip netns exec "$prefix$i" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "h$i" "$*"
    ;;
  address) host_address "${1:?usage: hosts.sh address I}" ;;
  shape)
    host_index "${1:-}"
    rate=${2:?usage: hosts.sh shape I RATE}
    # tbf on both ends of the host's link: the outer end shapes what the host receives, eth0 what it sends. The
    # bucket holds about 4 ms at the rate (at least 32 KiB), and packets wait at most 50 ms.
    burst=$(echo "$rate" | awk '{
      if (!match(tolower($0), /^[0-9.]+[kmg]?bit$/)) exit 1
      r = tolower($0); sub(/bit$/, "", r); unit = substr(r, length(r)); mult = 1
      if (unit == "k") mult = 1e3; else if (unit == "m") mult = 1e6; else if (unit == "g") mult = 1e9
      if (mult > 1) r = substr(r, 1, length(r) - 1)
      b = int(r * mult / 8 * 0.004); if (b < 32768) b = 32768; print b }') ||
      die "RATE must look like 100mbit, 1gbit or 500kbit, not '$rate'"
    tc qdisc replace dev "$prefix$1-br" root tbf rate "$rate" burst "$burst" latency 50ms
    ip netns exec "$prefix$1" tc qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency 50ms
    ;;
  unshape)
    host_index "${1:-}"
    tc qdisc del dev "$prefix$1-br" root 2>/dev/null || true
    ip netns exec "$prefix$1" tc qdisc del dev eth0 root 2>/dev/null || true
    ;;
  cut)
    host_index "${1:-}"
    ip link set "$prefix$1-br" down
    ;;
  heal)
    host_index "${1:-}"
    ip link set "$prefix$1-br" up
    ;;
  check) check ;;
  *)
    die "usage: hosts.sh up N [--owner PID] | down | exec I CMD... | address I | shape I RATE | unshape I | cut I | heal I | check"
    ;;
esac
