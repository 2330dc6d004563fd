#!/usr/bin/python3
"""Allreduce across emulated hosts on shaped links: Aikido against OpenMPI and Gloo, side by side in one run.

Emulated hosts (scripts/hosts.sh: one network namespace per host on a bridge), every host's link shaped with tbf
(`scripts/hosts.sh shape I RATE`) to each --rates value in turn, for each --layouts value (HOSTSxWORKERS: 2x2 is two
hosts with two workers each). Float32 sum allreduce, the same timing method as bench/compare_allreduce.py (every
program prints tools/aikido-bench/bench_common.hpp's JSON lines: barrier, time, max over ranks, median):

  aikido-auto   mpirun ... aikido-bench allreduce, AIKIDO_TOPOLOGY=auto (chosen from the measured links)
  aikido-ring   the same with AIKIDO_TOPOLOGY=ring
  aikido-hier   the same with AIKIDO_TOPOLOGY=hierarchical (shared memory inside a host, TCP across)
  aikido-tls    aikido-auto with AIKIDO_TLS=1: TLS 1.3 on every TCP connection (shared memory inside a host stays
                plain); its ratio column /aikido-tls is TLS's cost, its latency over aikido-auto's
  openmpi       mpirun ... mpi_allreduce, --mca btl tcp,vader,self (TCP across hosts, shared memory inside),
                glibc malloc tuned as in bench/README.md ("OpenMPI and Gloo references")
  gloo          one gloo_allreduce per rank in its host's namespace, Gloo's TCP transport on the host's address,
                rendezvous through a file store

Aikido's workers and OpenMPI's are both started by mpirun across the namespaces (--mca plm_rsh_agent
"scripts/hosts.sh ssh"); Aikido reads OpenMPI's environment and rendezvous at MASTER_ADDR on host 0. Every size runs
in its own launch, with as many iterations as fit in about --seconds of the shaped link (at least 3).

Ratios: other's median latency / Aikido's (auto), so >1 means Aikido is faster; `link` is Aikido's (auto) bus
bandwidth over the shaped rate. Needs root. See bench/README.md ("Allreduce across hosts").

  sudo bench/multihost_allreduce.py build [--layouts 2x2,4x1] [--rates 10gbit,1gbit,100mbit]
                                          [--sizes 64K,1M,16M,64M] [--only aikido-auto,openmpi] [--json FILE]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_allreduce import busbw, parse_json_lines, run_command, size_bytes, size_label, stop_group  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOSTS = os.path.join(ROOT, "scripts", "hosts.sh")
SUBNET = "198.18.0.0/24"
MALLOC_TUNING = ["-x", "MALLOC_MMAP_THRESHOLD_=4294967296", "-x", "MALLOC_TRIM_THRESHOLD_=1099511627776"]
SECRET = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def host_address(i):
    return "198.18.0.%d" % (10 + i)


def rate_bits(text):
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for suffix, scale in units.items():
        if text.lower().endswith(suffix):
            return float(text[:-len(suffix)]) * scale
    raise argparse.ArgumentTypeError(f"bad rate '{text}': expected e.g. 10gbit, 1gbit, 100mbit")


def parse_layout(text):
    try:
        hosts, workers = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad layout '{text}': expected HOSTSxWORKERS, e.g. 2x2")
    if hosts < 2 or workers < 1:
        raise argparse.ArgumentTypeError(f"bad layout '{text}': at least 2 hosts and 1 worker per host")
    return hosts, workers


def mpirun_base(layout):
    hosts, workers = layout
    return ["mpirun", "--allow-run-as-root", "-np", str(hosts * workers), "-H",
            ",".join(f"h{h}:{workers}" for h in range(hosts)), "--mca", "plm_rsh_agent", HOSTS + " ssh",
            "--mca", "oob_tcp_if_include", SUBNET, "--mca", "btl_tcp_if_include", SUBNET]


def mpi_env():
    env = dict(os.environ)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


class Aikido:
    def __init__(self, key, topology, tls=False):
        self.key = key
        self.label = f"aikido ({topology}{', tls' if tls else ''})"
        self.topology = topology
        self.tls = tls

    def prepare(self, args):
        for name in ("aikido-bench",):
            if not os.access(os.path.join(args.bin, name), os.X_OK):
                return f"{name} not built (cmake --build BUILD --target {name})"
        if not shutil.which("mpirun"):
            return "mpirun not found (apt-get install openmpi-bin): it starts the workers across the hosts"
        return None

    def run(self, args, layout, bench_args, port):
        passed = [f"AIKIDO_SECRET_FILE={args.secret_file}", f"MASTER_ADDR={host_address(0)}", f"MASTER_PORT={port}",
                  f"AIKIDO_TOPOLOGY={self.topology}", "AIKIDO_TIMEOUT=300", f"AIKIDO_TLS={int(self.tls)}"]
        # Settings given to this script (AIKIDO_STREAMS=4 ...) reach the workers too.
        passed += [f"{k}={os.environ[k]}" for k in ("AIKIDO_STREAMS", "AIKIDO_SEGMENT_BYTES") if k in os.environ]
        cmd = mpirun_base(layout) + [w for p in passed for w in ("-x", p)] + [
            os.path.join(args.bin, "aikido-bench"), "allreduce"] + bench_args
        return run_command(cmd, mpi_env(), args.timeout)


class OpenMpi:
    key = "openmpi"
    label = "openmpi (tcp across)"

    def prepare(self, args):
        if not shutil.which("mpirun"):
            return "mpirun not found (apt-get install openmpi-bin)"
        if not os.access(os.path.join(args.bin, "mpi_allreduce"), os.X_OK):
            return "mpi_allreduce not built: CMake did not find MPI (apt-get install libopenmpi-dev, reconfigure)"
        return None

    def run(self, args, layout, bench_args, port):
        cmd = mpirun_base(layout) + ["--mca", "pml", "ob1", "--mca", "btl", "tcp,vader,self"] + MALLOC_TUNING + [
            os.path.join(args.bin, "mpi_allreduce")] + bench_args
        return run_command(cmd, mpi_env(), args.timeout)


class Gloo:
    key = "gloo"
    label = "gloo (tcp)"

    def prepare(self, args):
        if not os.access(os.path.join(args.bin, "gloo_allreduce"), os.X_OK):
            return "gloo_allreduce not built: CMake did not find Gloo (apt-get install libgloo-dev, reconfigure)"
        return None

    def run(self, args, layout, bench_args, port):
        hosts, workers = layout
        world = hosts * workers
        store = tempfile.mkdtemp(prefix="aikido-gloo-store.")
        procs = []
        try:
            for rank in range(world):
                host = rank // workers
                cmd = [HOSTS, "exec", f"h{host}", os.path.join(args.bin, "gloo_allreduce"), "--rank", str(rank),
                       "--world", str(world), "--store", store, "--hostname", host_address(host), "--timeout",
                       str(max(1, int(args.timeout)))] + bench_args
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
            deadline = time.monotonic() + args.timeout
            outs, codes = [], []
            for p in procs:
                try:
                    out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
                    outs.append((out, err))
                    codes.append(p.returncode)
                except subprocess.TimeoutExpired:
                    for q in procs:
                        if q.poll() is None:
                            stop_group(q)
                    return None, "", f"(killed after {args.timeout} s)"
            bad = [c for c in codes if c != 0]
            return (bad[0] if bad else 0), outs[0][0], "".join(e for _, e in outs)
        finally:
            for p in procs:
                if p.poll() is None:
                    stop_group(p)
            shutil.rmtree(store, ignore_errors=True)


CONFIGS = [Aikido("aikido-auto", "auto"), Aikido("aikido-ring", "ring"), Aikido("aikido-hier", "hierarchical"),
           Aikido("aikido-tls", "auto", tls=True), OpenMpi(), Gloo()]
OURS = "aikido-auto"
OTHERS = ["openmpi", "gloo", "aikido-tls"]


def iterations(nbytes, layout, rate, seconds):
    """Timed iterations that fit in about `seconds` of the shaped link: a ring crosses each host's link with about
    2 * (n - 1) / n of the buffer each way."""
    hosts, workers = layout
    n = hosts * workers
    estimate = max(2 * (n - 1) / n * nbytes * 8 / rate, 1e-4)
    return max(3, min(200, int(seconds / estimate)))


def main():
    parser = argparse.ArgumentParser(
        description="Allreduce across emulated hosts on shaped links: Aikido against OpenMPI and Gloo.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("build_dir", nargs="?", default="./build", help="CMake build directory (default ./build)")
    parser.add_argument("--layouts", default="2x2,4x1", help="HOSTSxWORKERS, comma-separated (default 2x2,4x1)")
    parser.add_argument("--rates", default="10gbit,1gbit,100mbit", help="link rates (tc units; default "
                                                                        "10gbit,1gbit,100mbit)")
    parser.add_argument("--sizes", default="64K,1M,16M,64M", help="sizes (default 64K,1M,16M,64M)")
    parser.add_argument("--max-bytes-100mbit", default="16M", type=size_bytes,
                        help="largest size on links of 100 Mbit/s and below (default 16M: 64M takes 10 s a call)")
    parser.add_argument("--seconds", type=float, default=2.0, help="link time per size and configuration")
    parser.add_argument("--only", default=None, help="configurations: " + ",".join(c.key for c in CONFIGS))
    parser.add_argument("--timeout", type=float, default=300, help="seconds before one launch is killed")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results to FILE")
    args = parser.parse_args()
    try:
        layouts = [parse_layout(l) for l in args.layouts.split(",")]
        rates = [(r, rate_bits(r)) for r in args.rates.split(",")]
        sizes = [size_bytes(s) for s in args.sizes.split(",")]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    configs = CONFIGS
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {c.key for c in CONFIGS}]
        if unknown:
            parser.error(f"unknown configuration(s) {','.join(unknown)}")
        configs = [c for c in CONFIGS if c.key in wanted]
    if os.geteuid() != 0:
        sys.exit("multihost_allreduce.py: emulated hosts need root (network namespaces); run it with sudo")
    args.bin = os.path.join(os.path.abspath(args.build_dir), "bin")
    skipped = {}
    for c in configs:
        why = c.prepare(args)
        if why:
            skipped[c.key] = why
            print(f"  {c.label}: skipped: {why}", flush=True)

    max_hosts = max(h for h, _ in layouts)
    print(f"allreduce across emulated hosts: float32 sum, layouts {args.layouts}, rates {args.rates}, sizes "
          f"{args.sizes}; host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    secret = tempfile.NamedTemporaryFile("w", prefix="aikido-bench-secret.", delete=False)
    secret.write(SECRET + "\n")
    secret.close()
    args.secret_file = secret.name
    results = {}  # (layout, rate, key, bytes) -> JSON object
    failures = []
    port = 29600
    start = time.monotonic()
    subprocess.run([HOSTS, "up", str(max_hosts), "--owner", str(os.getpid())], check=True)
    try:
        for rate_name, rate in rates:
            for h in range(max_hosts):
                subprocess.run([HOSTS, "shape", f"h{h}", rate_name], check=True)
            for layout in layouts:
                lname = f"{layout[0]}x{layout[1]}"
                for s in sizes:
                    if rate <= 100e6 and s > args.max_bytes_100mbit:
                        continue
                    iters = iterations(s, layout, rate, args.seconds)
                    bench_args = ["--format", "json", "--sizes", size_label(s), "--iters", str(iters), "--warmup",
                                  "1" if iters < 10 else "3"]
                    for c in configs:
                        if c.key in skipped:
                            continue
                        port += 1
                        t0 = time.monotonic()
                        code, out, err = c.run(args, layout, bench_args, port)
                        parsed = parse_json_lines(out)
                        if code != 0 or s not in parsed:
                            why = "timed out" if code is None else f"exit status {code}" if code else "no result"
                            tail = "\n".join(("      | " + l) for l in (err + out).strip().splitlines()[-6:])
                            failures.append(f"{lname} {rate_name} {size_label(s)} {c.key}: {why}\n{tail}")
                            print(f"  {lname} {rate_name} {size_label(s)} {c.label}: failed ({why})", flush=True)
                            continue
                        results[(lname, rate_name, c.key, s)] = parsed[s]
                        print(f"  {lname} {rate_name} {size_label(s)} {c.label}: {parsed[s]['median_us']:.0f} us "
                              f"({iters} iters, {time.monotonic() - t0:.1f} s)", flush=True)
    finally:
        for h in range(max_hosts):
            subprocess.run([HOSTS, "unshape", f"h{h}"], check=False)
        subprocess.run([HOSTS, "down", "--owner", str(os.getpid())], check=False)
        os.unlink(secret.name)

    rows = []
    print("\n== median latency (ms), ratios other/aikido-auto (>1: Aikido faster), link: aikido-auto's bus bandwidth "
          "over the shaped rate ==")
    header = f"{'layout':>6} {'rate':>8} {'size':>5} " + " ".join(f"{c.key:>12}" for c in configs) + \
        "".join(f" {'/' + o:>9}" for o in OTHERS) + f" {'link':>6}"
    print(header)
    for rate_name, rate in rates:
        for layout in layouts:
            lname = f"{layout[0]}x{layout[1]}"
            n = layout[0] * layout[1]
            for s in sizes:
                got = {c.key: results.get((lname, rate_name, c.key, s)) for c in configs}
                if not any(got.values()):
                    continue
                row = {"layout": lname, "rate": rate_name, "size": size_label(s), "bytes": s}
                cells = []
                for c in configs:
                    r = got[c.key]
                    cells.append(f"{r['median_us'] / 1e3:>12.2f}" if r else f"{'-':>12}")
                    if r:
                        row[c.key] = {"median_us": r["median_us"], "busbw_gbps": busbw(s, r["median_us"] * 1e-6, n)}
                ours = got.get(OURS)
                for o in OTHERS:
                    theirs = got.get(o)
                    if ours and theirs:
                        row[f"{o}/{OURS}"] = theirs["median_us"] / ours["median_us"]
                        cells.append(f" {row[f'{o}/{OURS}']:>9.2f}")
                    else:
                        cells.append(f" {'-':>9}")
                if ours:
                    row["link"] = busbw(s, ours["median_us"] * 1e-6, n) * 8e9 / rate
                    cells.append(f" {row['link']:>6.2f}")
                else:
                    cells.append(f" {'-':>6}")
                print(f"{lname:>6} {rate_name:>8} {size_label(s):>5} " + " ".join(cells[:len(configs)]) +
                      "".join(cells[len(configs):]))
                rows.append(row)
    if failures:
        print("\nfailures:")
        for f in failures:
            print("  " + f)
    print(f"\ntotal time {time.monotonic() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "skipped": skipped, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
