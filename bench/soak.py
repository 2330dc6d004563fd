#!/usr/bin/python3
"""Soak: a long elastic run with a resize every K steps; resources of every long-lived process must stay flat.

Runs elastic_worker (tests/integration/elastic_worker.cpp) under `aikido-run --elastic --max-np 3` for --steps
training steps (default 100000), all workers calling peer.resize() every --every steps (default 1000), 3 -> 2 -> 3
-> ...: a third worker process leaves and a new one joins 100 times. At every --every steps the script samples, for
aikido-run and the two workers that live through the whole run (worker ids 0 and 1):

  rss_kib      resident memory (VmRSS)
  fds          open file descriptors (/proc/PID/fd)
  threads      threads (/proc/PID/status)
  segments     shared-memory segments mapped (memfd mappings named aikido-* in /proc/PID/maps)

and for the machine: files in /dev/shm and the job's Unix sockets (@aikido-JOB-*, /proc/net/unix). It prints the series (one
line per sample) and a verdict per series and cluster size: flat when the last quarter's median is within the
allowance of the maximum of the middle half (after the first quarter's warm-up): RSS +8 MiB (its growth per 1000
steps is printed too), descriptors/threads/segments/sockets +0. At the end
the job must have finished (exit status 0), every worker must report the same parameters, and nothing of the job may
be left: no process, no socket, no /dev/shm file.

  bench/soak.py --build build [--steps 100000] [--every 1000] [--dim 4096] [--json FILE]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

LINE = re.compile(r"^\[(\d+)\] (\{.*\})$")
RSS_ALLOWANCE_KIB = 8 * 1024


def proc_sample(pid):
    """RSS (KiB), open descriptors, threads and mapped aikido segments of a process; None once it is gone."""
    try:
        status = open(f"/proc/{pid}/status").read()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        # One inode per segment, however many mappings of it.
        segments = {line.split()[4] for line in open(f"/proc/{pid}/maps") if "memfd:aikido" in line}
        return {"rss_kib": rss, "fds": fds, "threads": threads, "segments": len(segments)}
    except (FileNotFoundError, ProcessLookupError, AttributeError):
        return None


def machine_sample(job_prefix):
    sockets = 0
    for line in open("/proc/net/unix"):
        fields = line.split()
        if job_prefix and len(fields) >= 8 and fields[-1].startswith(job_prefix):
            sockets += 1
    return {"unix_sockets": sockets, "dev_shm": len(os.listdir("/dev/shm"))}


def job_socket_prefix(pid):
    """The prefix of the job's socket names, from a worker's AIKIDO_JOB_ID."""
    try:
        for item in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            if item.startswith(b"AIKIDO_JOB_ID="):
                return "@aikido-" + item.split(b"=", 1)[1].decode()[:32] + "-"
    except OSError:
        pass
    return None


def judge(middle, last, prefix, verdicts, failures):
    """Flat when the last quarter's median is within the allowance of the middle half's maximum."""
    for who, keys in [("run", ["rss_kib", "fds", "threads"]), ("w0", ["rss_kib", "fds", "threads", "segments"]),
                      ("w1", ["rss_kib", "fds", "threads", "segments"]), ("", ["unix_sockets", "dev_shm"])]:
        for key in keys:
            def value(row):
                v = row[who] if who else row
                return v[key] if v else None
            a = [value(r) for r in middle if value(r) is not None]
            b = [value(r) for r in last if value(r) is not None]
            name = prefix + (f"{who}.{key}" if who else key)
            if not a or not b:
                verdicts[name] = "no samples"
                failures.append(f"{name}: no samples")
                continue
            allowance = RSS_ALLOWANCE_KIB if key == "rss_kib" else 0
            # The median of the last quarter: a descriptor open for a moment at one sample is no leak.
            flat = statistics.median(b) <= max(a) + allowance
            verdicts[name] = (f"{'flat' if flat else 'GROWS'} (middle max {max(a)}, last quarter median "
                              f"{statistics.median(b):g}, max {max(b)})")
            if key == "rss_kib":
                rows = [r for r in middle + last if (r[who] if who else r)]
                if len(rows) > 1 and rows[-1]["step"] > rows[0]["step"]:
                    per = (value(rows[-1]) - value(rows[0])) / (rows[-1]["step"] - rows[0]["step"]) * 1000
                    verdicts[name] += f", {per:+.1f} KiB per 1000 steps"
            if not flat:
                failures.append(f"{name} grows: {verdicts[name]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--build", default="build")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=1000, help="steps between resizes and samples")
    parser.add_argument("--dim", type=int, default=4096, help="model size in floats")
    parser.add_argument("--step-ms", type=int, default=1, help="simulated compute per step (default 1)")
    parser.add_argument("--json", help="write the series and verdicts to this file")
    args = parser.parse_args()
    if args.steps < 16 * args.every:
        parser.error("--steps must be at least 16 times --every (the verdict compares quarters of each size's samples)")

    bin_dir = os.path.join(args.build, "bin")
    schedule = ",".join(f"{s}:{2 if (s // args.every) % 2 else 3}" for s in range(args.every, args.steps, args.every))
    shm_before = set(os.listdir("/dev/shm"))
    control = tempfile.mktemp(prefix="aikido-soak-ctl-")
    argv = [os.path.join(bin_dir, "aikido-run"), "-np", "3", "--elastic", "--min-np", "2", "--max-np", "3",
            "--control-file", control, os.path.join(bin_dir, "elastic_worker"), "--epochs", "1000000000",
            "--steps", str(args.steps), "--dim", str(args.dim), "--batch", "16", "--print-every", str(args.every // 2),
            "--step-ms", str(args.step_ms),
            "--commit-every", "10", "--schedule", schedule]
    started = time.monotonic()
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stderr = []
    threading.Thread(target=lambda: stderr.extend(job.stderr), daemon=True).start()

    pids = {}  # worker id -> pid
    prefix = None  # of this job's socket names
    done_params = {}
    series = []
    errors = []
    header = (f"{'step':>7} {'size':>4} {'s':>6}  {'run rss':>8} {'fds':>4} {'thr':>3}  "
              f"{'w0 rss':>8} {'fds':>4} {'thr':>3} {'seg':>3}  {'w1 rss':>8} {'fds':>4} {'thr':>3} {'seg':>3}  "
              f"{'socks':>5} {'shm':>4}")
    print(header, flush=True)
    for line in job.stdout:
        m = LINE.match(line.strip())
        if not m:
            continue
        event = json.loads(m.group(2))
        kind = event.get("event")
        if kind == "start":
            pids[event["worker"]] = event["pid"]
            prefix = prefix or job_socket_prefix(event["pid"])
        elif kind == "error":
            errors.append(event.get("what", ""))
        elif kind == "done":
            done_params[event["worker"]] = event["params"]
        elif kind == "step" and event["rank"] == 0 and not event.get("first_after_change") \
                and event["step"] % args.every == args.every // 2:
            row = {"step": event["step"], "workers": event["workers"], "seconds": time.monotonic() - started,
                   "run": proc_sample(job.pid), "w0": proc_sample(pids.get(0)), "w1": proc_sample(pids.get(1)),
                   **machine_sample(prefix)}
            series.append(row)

            def cells(s, segments=True):
                if not s:
                    return f"{'-':>8} {'-':>4} {'-':>3}" + (f" {'-':>3}" if segments else "")
                return f"{s['rss_kib']:>8} {s['fds']:>4} {s['threads']:>3}" + \
                    (f" {s['segments']:>3}" if segments else "")
            print(f"{row['step']:>7} {row['workers']:>4} {row['seconds']:>6.1f}  {cells(row['run'], False)}  "
                  f"{cells(row['w0'])}  {cells(row['w1'])}  {row['unix_sockets']:>5} {row['dev_shm']:>4}", flush=True)
    job.wait()
    time.sleep(0.5)

    failures = []
    if job.returncode != 0:
        failures.append(f"aikido-run exited with status {job.returncode}:\n" + "".join(stderr[-30:]))
    failures += [f"worker error: {e}" for e in errors]
    if len(set(done_params.values())) != 1 or len(done_params) < 2:
        failures.append(f"workers finished with different or missing parameters: {done_params}")
    left = [p for p in [job.pid] + list(pids.values()) if os.path.exists(f"/proc/{p}") and
            open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    if left:
        failures.append(f"processes left: {left}")
    if machine_sample(prefix)["unix_sockets"]:
        failures.append(f"Unix sockets named {prefix}* left behind")
    new_shm = set(os.listdir("/dev/shm")) - shm_before
    if new_shm:
        failures.append(f"/dev/shm files left behind: {sorted(new_shm)}")

    verdicts = {}
    for size in sorted({r["workers"] for r in series}):
        rows = [r for r in series if r["workers"] == size]
        quarter = max(1, len(rows) // 4)
        judge(rows[quarter:len(rows) - quarter], rows[-quarter:], f"{size} workers: ", verdicts, failures)
    print()
    for name, v in verdicts.items():
        print(f"{name:<28} {v}")
    print(f"\n{len(series)} samples, {args.steps} steps, {len(range(args.every, args.steps, args.every))} resizes, "
          f"{time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"series": series, "verdicts": verdicts, "failures": failures}, f, indent=1)
    if failures:
        print("FAILED:\n" + "\n".join(failures))
        return 1
    print("ok: the job finished, every worker has the same parameters, nothing grew, nothing was left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
