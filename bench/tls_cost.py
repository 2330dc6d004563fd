#!/usr/bin/python3
"""What TLS costs: allreduce over TCP with and without --tls, side by side in one run.

For each number of ranks (default 2 and 4) it runs, alternately and R times each,
  plain   aikido-run -np N --transport tcp aikido-bench allreduce
  tls     aikido-run -np N --transport tcp --tls aikido-bench allreduce
(float32 sum, the sizes given), and prints per size the median over repeats of the median latency, the bus
bandwidth, and tls/plain: how many times longer an allreduce takes with TLS (1.00: no cost).

Loopback is the worst case for TLS: nothing else limits the transfer, so every byte's encryption and
decryption (AES-128-GCM, on the CPU that also reduces) shows. Across hosts a link slower than the CPU's cipher
hides most of it. The first line says whether the kernel could take the records over (kernel TLS: the "tls"
module listed in /proc/sys/net/ipv4/tcp_available_ulp) and whether the CPU has AES instructions.

Standard library only. See bench/README.md ("TLS").
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_allreduce import parse_json_lines, run_command, size_bytes, size_label  # noqa: E402


def machine_line():
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            ulps = f.read().split()
    except OSError:
        ulps = []
    try:
        with open("/proc/cpuinfo") as f:
            aes = any(line.startswith("flags") and " aes " in line + " " for line in f)
    except OSError:
        aes = False
    ktls = "available" if "tls" in ulps else "not available (no \"tls\" in tcp_available_ulp): records encrypted " \
                                                 "in user space"
    return f"kernel TLS: {ktls}; AES instructions: {'yes' if aes else 'no'}; CPUs: {os.cpu_count()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", help="the build directory (BUILD/bin/aikido-run, BUILD/bin/aikido-bench)")
    parser.add_argument("--np", default="2,4", help="numbers of ranks, comma-separated (default 2,4)")
    parser.add_argument("--sizes", default="64K,1M,16M,64M", help="buffer sizes (default 64K,1M,16M,64M)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration (default 3)")
    parser.add_argument("--iters", type=int, default=0, help="timed iterations per size (default: aikido-bench's)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run (default 600)")
    args = parser.parse_args()
    binary = os.path.join(args.build, "bin")
    for name in ("aikido-run", "aikido-bench"):
        if not os.access(os.path.join(binary, name), os.X_OK):
            sys.exit(f"tls_cost: {os.path.join(binary, name)} not found; build it first")
    sizes = [size_bytes(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in args.np.split(",")]
    bench = ["--sizes", ",".join(str(s) for s in sizes), "--format", "json"]
    if args.iters:
        bench += ["--iters", str(args.iters)]
    env = dict(os.environ)
    for name in ("AIKIDO_TLS", "AIKIDO_TLS_CERT", "AIKIDO_TLS_KEY", "AIKIDO_TLS_CA", "AIKIDO_TRANSPORT"):
        env.pop(name, None)

    print(machine_line())
    failed = False
    for np in counts:
        times = {"plain": {s: [] for s in sizes}, "tls": {s: [] for s in sizes}}
        busbw = {"plain": {s: [] for s in sizes}, "tls": {s: [] for s in sizes}}
        for repeat in range(args.repeats):
            for mode in ("plain", "tls") if repeat % 2 == 0 else ("tls", "plain"):
                cmd = [os.path.join(binary, "aikido-run"), "-np", str(np), "--transport", "tcp"]
                if mode == "tls":
                    cmd.append("--tls")
                cmd += [os.path.join(binary, "aikido-bench"), "allreduce"] + bench
                code, out, err = run_command(cmd, env, args.timeout)
                results = parse_json_lines(out)
                if code != 0 or any(s not in results for s in sizes):
                    print(f"  {mode} np={np} failed (exit {code}):\n{err.strip()[-2000:]}", file=sys.stderr)
                    failed = True
                    continue
                for s in sizes:
                    times[mode][s].append(float(results[s]["median_us"]))
                    busbw[mode][s].append(float(results[s]["busbw_gbps"]))
        print(f"\n{np} ranks, TCP on loopback, float32 sum, median of {args.repeats} runs")
        print(f"{'size':>6} {'plain us':>10} {'tls us':>10} {'plain GB/s':>11} {'tls GB/s':>9} {'tls/plain':>10}")
        for s in sizes:
            if not times["plain"][s] or not times["tls"][s]:
                continue
            plain, tls = statistics.median(times["plain"][s]), statistics.median(times["tls"][s])
            print(f"{size_label(s):>6} {plain:>10.1f} {tls:>10.1f} {statistics.median(busbw['plain'][s]):>11.3f} "
                  f"{statistics.median(busbw['tls'][s]):>9.3f} {tls / plain:>10.2f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
