#!/usr/bin/python3
"""Side-by-side allreduce benchmark: Aikido against OpenMPI and Gloo on this host.

Runs, for each number of ranks (default 2 and 4), float32 sum allreduce over the same sizes with:
  aikido          aikido-run -np N aikido-bench allreduce               (default transport)
  aikido-tcp      the same with AIKIDO_TRANSPORT=tcp
  openmpi         mpirun --allow-run-as-root --oversubscribe -np N mpi_allreduce   (as installed: shared memory)
  openmpi-mt      the same with glibc's malloc tuned (-x MALLOC_MMAP_THRESHOLD_=4294967296
                  -x MALLOC_TRIM_THRESHOLD_=1099511627776): OpenMPI's large temporary buffers are then reused
                  instead of being mapped and unmapped on every call
  openmpi-tcp     --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include lo   (TCP on loopback)
  openmpi-tcp-mt  the same with the malloc tuning
  gloo            N gloo_allreduce processes over Gloo's TCP transport on 127.0.0.1 (file-store rendezvous)
Every program prints the same JSON lines (tools/aikido-bench/bench_common.hpp: barrier, time, max over ranks,
median and minimum). Each configuration is repeated R times; the table shows the median over repeats of the
median latency and the bus bandwidth computed from it, and the ratios
  aikido/openmpi          OpenMPI latency (best of openmpi, openmpi-mt) / Aikido latency
  aikido-tcp/openmpi-tcp  OpenMPI TCP latency (best of openmpi-tcp, openmpi-tcp-mt) / Aikido TCP latency
  aikido-tcp/gloo         Gloo latency / Aikido TCP latency
so a ratio above 1 means Aikido is faster (equivalently: Aikido's bus bandwidth over the other's).

Standard library only. See bench/README.md.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

JSON_KEYS = ("bytes", "median_us", "min_us", "algbw_gbps", "busbw_gbps")
MALLOC_TUNING = ["-x", "MALLOC_MMAP_THRESHOLD_=4294967296", "-x", "MALLOC_TRIM_THRESHOLD_=1099511627776"]
MPI_TCP = ["--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo"]


class Skip(Exception):
    """A configuration that cannot run here; the message says why."""


def size_bytes(text):
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
             "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
    digits = len(text) - len(text.lstrip("0123456789"))
    suffix = text[digits:].upper()
    if digits == 0 or suffix not in units or int(text[:digits]) == 0:
        raise argparse.ArgumentTypeError(f"bad size '{text}': expected e.g. 4K, 64K, 1M (binary multiples)")
    return int(text[:digits]) * units[suffix]


def size_label(n):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_json_lines(text):
    """The result objects among a program's output lines; tolerates prefixes such as aikido-run's "[0] "."""
    results = {}
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            obj = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and all(k in obj for k in JSON_KEYS):
            results[int(obj["bytes"])] = obj
    return results


def tail(text, lines=6):
    kept = [l for l in text.strip().splitlines() if l.strip()][-lines:]
    return "\n".join("      | " + l for l in kept)


class Config:
    def __init__(self, key, label, family):
        self.key = key
        self.label = label
        self.family = family

    def prepare(self, args):
        """Raises Skip when this configuration cannot run here."""

    def run(self, args, np, bench_args):
        """Returns (returncode, stdout, stderr)."""
        raise NotImplementedError


def stop_group(proc):
    """Stops a process started with start_new_session and everything it started (launchers' workers)."""
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass


def run_command(cmd, env, timeout):
    """Runs cmd in its own process group; returns (returncode or None on timeout, stdout, stderr)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, err = proc.communicate()
        return None, out, err + f"\n(killed after {timeout} s)"


def require_file(path, why):
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise Skip(f"{path} not found ({why})")


class AikidoConfig(Config):
    def __init__(self, key, label, transport):
        super().__init__(key, label, "aikido")
        self.transport = transport

    def prepare(self, args):
        require_file(os.path.join(args.bin, "aikido-run"), "build the launcher: cmake --build BUILD --target aikido-run")
        require_file(os.path.join(args.bin, "aikido-bench"), "build it: cmake --build BUILD --target aikido-bench")

    def run(self, args, np, bench_args):
        env = dict(os.environ)
        env.pop("AIKIDO_TRANSPORT", None)
        if self.transport:
            env["AIKIDO_TRANSPORT"] = self.transport
        cmd = [os.path.join(args.bin, "aikido-run"), "-np", str(np), os.path.join(args.bin, "aikido-bench"),
               "allreduce"] + bench_args
        return run_command(cmd, env, args.timeout)


class MpiConfig(Config):
    def __init__(self, key, label, extra):
        super().__init__(key, label, "openmpi")
        self.extra = extra

    def prepare(self, args):
        if not shutil.which("mpirun"):
            raise Skip("mpirun not found in PATH (install openmpi-bin)")
        require_file(os.path.join(args.bin, "mpi_allreduce"),
                     "not built: CMake did not find MPI; install libopenmpi-dev and reconfigure")

    def run(self, args, np, bench_args):
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np)] + self.extra + [
            os.path.join(args.bin, "mpi_allreduce")] + bench_args
        env = dict(os.environ)
        # Lets mpirun run as root even where the flag is not enough (older OpenMPI).
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        return run_command(cmd, env, args.timeout)


class GlooConfig(Config):
    def __init__(self):
        super().__init__("gloo", "gloo (tcp)", "gloo")

    def prepare(self, args):
        require_file(os.path.join(args.bin, "gloo_allreduce"),
                     "not built: CMake did not find Gloo; install libgloo-dev and reconfigure")

    def run(self, args, np, bench_args):
        store = tempfile.mkdtemp(prefix="aikido-gloo-store.")
        procs = []
        outputs = []
        try:
            for rank in range(np):
                out = tempfile.TemporaryFile(mode="w+")
                err = tempfile.TemporaryFile(mode="w+")
                cmd = [os.path.join(args.bin, "gloo_allreduce"), "--rank", str(rank), "--world", str(np), "--store",
                       store, "--timeout", str(max(1, int(args.timeout)))] + bench_args
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                              start_new_session=True))
                outputs.append((out, err))
            deadline = time.monotonic() + args.timeout
            timed_out = False
            codes = []
            for p in procs:
                try:
                    codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    codes.append(None)
            if timed_out or any(c not in (0, None) for c in codes):
                for p in procs:
                    if p.poll() is None:
                        stop_group(p)
            texts = []
            for out, err in outputs:
                out.seek(0)
                err.seek(0)
                texts.append((out.read(), err.read()))
            stderr = "".join(f"[{r}] {l}\n" for r, (_, e) in enumerate(texts) for l in e.splitlines())
            if timed_out:
                return None, texts[0][0], stderr + f"\n(killed after {args.timeout} s)"
            bad = [c for c in codes if c != 0]
            return (bad[0] if bad else 0), texts[0][0], stderr
        finally:
            for out, err in outputs:
                out.close()
                err.close()
            shutil.rmtree(store, ignore_errors=True)


CONFIGS = [
    AikidoConfig("aikido", "aikido (auto)", None),
    AikidoConfig("aikido-tcp", "aikido (tcp)", "tcp"),
    MpiConfig("openmpi", "openmpi (shm)", []),
    MpiConfig("openmpi-mt", "openmpi (shm, malloc tuned)", MALLOC_TUNING),
    MpiConfig("openmpi-tcp", "openmpi (tcp)", MPI_TCP),
    MpiConfig("openmpi-tcp-mt", "openmpi (tcp, malloc tuned)", MPI_TCP + MALLOC_TUNING),
    GlooConfig(),
]

RATIOS = [
    ("aikido/openmpi", "aikido", ["openmpi", "openmpi-mt"]),
    ("aikido-tcp/openmpi-tcp", "aikido-tcp", ["openmpi-tcp", "openmpi-tcp-mt"]),
    ("aikido-tcp/gloo", "aikido-tcp", ["gloo"]),
]


def busbw(nbytes, seconds, np):
    return nbytes / seconds / 1e9 * 2 * (np - 1) / np if seconds > 0 else 0.0


def main():
    parser = argparse.ArgumentParser(
        description="Compare Aikido's allreduce with OpenMPI and Gloo (float32 sum) on this host.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("build_dir", nargs="?", default="./build", help="CMake build directory (default ./build)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes (default 4K,64K,1M,16M,64M; "
                                                      "--quick: 4K,64K,1M)")
    parser.add_argument("--np", default="2,4", help="comma-separated rank counts (default 2,4)")
    parser.add_argument("--repeats", "-r", type=int, default=None, help="runs per configuration (default 3; "
                                                                        "--quick: 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per size (default: the programs' "
                                                                "size-dependent default; --quick: 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warmup iterations per size (--quick: 3)")
    parser.add_argument("--only", default=None,
                        help="comma-separated configurations to run, of: " + ",".join(c.key for c in CONFIGS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds before one run is killed (default 600)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the aggregated results to FILE")
    parser.add_argument("--quick", action="store_true", help="fast smoke run: sizes 4K,64K,1M, 1 repeat, 20 iters")
    args = parser.parse_args()

    sizes_text = args.sizes or ("4K,64K,1M" if args.quick else "4K,64K,1M,16M,64M")
    try:
        sizes = [size_bytes(s) for s in sizes_text.split(",")]
        nps = [int(n) for n in args.np.split(",")]
    except (argparse.ArgumentTypeError, ValueError) as e:
        parser.error(str(e))
    if any(n < 1 for n in nps):
        parser.error("--np values must be at least 1")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    iters = args.iters if args.iters is not None else (20 if args.quick else None)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else None)
    configs = CONFIGS
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {c.key for c in CONFIGS}]
        if unknown:
            parser.error(f"unknown configuration(s) {','.join(unknown)}; known: {','.join(c.key for c in CONFIGS)}")
        configs = [c for c in CONFIGS if c.key in wanted]
    args.bin = os.path.join(os.path.abspath(args.build_dir), "bin")

    bench_args = ["--format", "json", "--sizes", ",".join(size_label(s) for s in sizes)]
    if iters is not None:
        bench_args += ["--iters", str(iters)]
    if warmup is not None:
        bench_args += ["--warmup", str(warmup)]

    load = os.getloadavg()[0]
    print(f"allreduce comparison: float32 sum, sizes {','.join(size_label(s) for s in sizes)}, ranks "
          f"{','.join(map(str, nps))}, {repeats} repeat(s), iters {iters or 'default'}, build {args.bin}")
    print(f"host: {os.cpu_count()} CPUs, load average {load:.2f} at start"
          + ("  (other work is running: expect noisy timings)" if load > 0.5 else ""), flush=True)

    skipped = {}
    for c in configs:
        try:
            c.prepare(args)
        except Skip as e:
            skipped[c.key] = str(e)
            print(f"  {c.label}: skipped: {e}", flush=True)

    # results[(key, np, bytes)] = list of per-run JSON objects; failures[(key, np)] = list of reasons. A failed run
    # is reported and the other repeats still run, except after a timeout (a hang would cost the timeout each time).
    results = {}
    failures = {}
    timed_out = set()
    start = time.monotonic()
    for np in nps:
        for rep in range(repeats):
            for c in configs:
                if c.key in skipped or (c.key, np) in timed_out:
                    continue
                t0 = time.monotonic()
                code, out, err = c.run(args, np, bench_args)
                parsed = parse_json_lines(out)
                missing = [s for s in sizes if s not in parsed]
                if code != 0 or missing:
                    why = "timed out" if code is None else (f"exit status {code}" if code != 0 else
                                                             "no result for " + ",".join(map(size_label, missing)))
                    if code is None:
                        timed_out.add((c.key, np))
                    failures.setdefault((c.key, np), []).append(f"run {rep + 1}: {why}\n{tail(err + chr(10) + out)}")
                    print(f"  np={np} run {rep + 1}/{repeats} {c.label}: failed ({why})", flush=True)
                    continue
                for s in sizes:
                    results.setdefault((c.key, np, s), []).append(parsed[s])
                print(f"  np={np} run {rep + 1}/{repeats} {c.label}: {time.monotonic() - t0:.1f} s", flush=True)

    def aggregate(key, np, s):
        runs = results.get((key, np, s))
        if not runs:
            return None
        med = statistics.median(r["median_us"] for r in runs)
        return {"median_us": med, "min_us": min(r["min_us"] for r in runs), "runs": len(runs),
                "busbw_gbps": busbw(s, med * 1e-6, np)}

    summary = []
    for np in nps:
        print(f"\n== np = {np} ==")
        print(f"{'size':>6}  {'implementation':<28} {'busbw GB/s':>10} {'median us':>11} {'min us':>11} {'runs':>5}")
        for s in sizes:
            first = True
            for c in configs:
                name = size_label(s) if first else ""
                first = False
                agg = aggregate(c.key, np, s)
                if c.key in skipped:
                    print(f"{name:>6}  {c.label:<28} skipped: " + skipped[c.key].split(" (")[0])
                elif agg is None:
                    why = failures.get((c.key, np), ["no result"])[-1].split("\n", 1)[0]
                    print(f"{name:>6}  {c.label:<28} failed: {why}")
                else:
                    runs = f"{agg['runs']}/{repeats}"
                    print(f"{name:>6}  {c.label:<28} {agg['busbw_gbps']:>10.3f} {agg['median_us']:>11.2f} "
                          f"{agg['min_us']:>11.2f} {runs:>5}")
            row = {"np": np, "bytes": s, "size": size_label(s)}
            for c in configs:
                agg = aggregate(c.key, np, s)
                if agg:
                    row[c.key] = agg
            parts = []
            for ratio_name, ours, theirs in RATIOS:
                mine = aggregate(ours, np, s)
                others = [a for a in (aggregate(t, np, s) for t in theirs) if a]
                if mine and others:
                    value = min(a["median_us"] for a in others) / mine["median_us"]
                    row[ratio_name] = value
                    parts.append(f"{ratio_name} {value:.2f}")
                else:
                    parts.append(f"{ratio_name} n/a")
            print(f"{'':>6}  ratios (>1: Aikido faster): " + "   ".join(parts))
            summary.append(row)

    print("\n== ratios (other's median latency / Aikido's; >1: Aikido faster) ==")
    print(f"{'np':>3} {'size':>6} " + " ".join(f"{r[0]:>23}" for r in RATIOS))
    for row in summary:
        cells = [f"{row[r[0]]:>23.2f}" if r[0] in row else f"{'n/a':>23}" for r in RATIOS]
        print(f"{row['np']:>3} {row['size']:>6} " + " ".join(cells))

    if failures:
        print("\nfailures:")
        for (key, np), whys in failures.items():
            for why in whys:
                print(f"  {key} np={np} {why}")
    if skipped:
        print("\nskipped:")
        for key, why in skipped.items():
            print(f"  {key}: skipped: {why}")
    print(f"\ntotal time {time.monotonic() - start:.1f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes": sizes, "np": nps, "repeats": repeats, "results": summary,
                       "skipped": skipped, "failures": {f"{k}/np{n}": v for (k, n), v in failures.items()}}, f,
                      indent=1)
    # Non-zero when a configuration that could run failed, so CI notices.
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
