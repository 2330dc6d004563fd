#!/usr/bin/python3
"""Elastic resize and recovery latency of Aikido on this host.

Runs elastic_worker (tests/integration/elastic_worker.cpp: a float-vector model, allreduce-averaged gradients,
global-position data sharding, commits every few steps) under `aikido-run --elastic` and measures, from the decision
(the moment the new cluster version is proposed in the store) to the first training step completed at the new size:

  scale-up   2 -> 4 workers   (aikido-ctl resize 4: includes starting two processes and sending them the state)
  scale-down 4 -> 2 workers   (aikido-ctl resize 2)
  recovery   kill -9 of a worker of 3, with --restart   (from the kill to the first step of the survivors with the
             replacement), and without --restart (survivors go on with 2)

split into phases, as rank 0 (a survivor) and the new workers report them:
  agree      decision -> every survivor agreed at a step boundary (an 8-byte allreduce of the newest version seen)
  start      decision -> the last new process entered main()   (runs while the survivors agree and wait)
  connect    agreement -> new connections of the new version established (includes waiting for new processes)
  state      connected -> state restored: header exchange, rollback (recovery), broadcast to new workers, commit
  total      decision -> first step completed at the new size (recovery: from the kill)

Each scenario is repeated R times (default 5); the table shows the median and the maximum. Standard library only.

  bench/elastic_resize.py --build build [--repeats 5] [--dim 1048576] [--step-ms 2] [--json]
"""

import argparse
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

LINE = re.compile(r"^\[(\d+)\] (\{.*\})$")


class Job:
    """aikido-run --elastic running elastic_worker; its JSON lines arrive in a queue."""

    def __init__(self, build, np, run_flags, worker_flags):
        self.control = tempfile.mktemp(prefix="aikido-bench-ctl-")
        self.build = build
        argv = [os.path.join(build, "bin", "aikido-run"), "-np", str(np), "--elastic", "--control-file",
                self.control] + run_flags + [os.path.join(build, "bin", "elastic_worker")] + worker_flags
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        self.events = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            m = LINE.match(line.strip())
            if m:
                event = json.loads(m.group(2))
                event["received"] = time.time() * 1000.0
                self.events.put(event)

    def wait_for(self, predicate, timeout=60.0):
        """Returns every event up to and including the first for which predicate holds."""
        seen = []
        deadline = time.time() + timeout
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise RuntimeError("timed out; aikido-run said:\n" + "".join(self.stderr[-20:]))
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            seen.append(event)
            if event.get("event") == "error":
                raise RuntimeError("worker error: " + event.get("what", ""))
            if predicate(event):
                return seen

    def ctl(self, *args):
        subprocess.run([os.path.join(self.build, "bin", "aikido-ctl"), "--control-file", self.control] + list(args),
                       check=True, stdout=subprocess.DEVNULL)

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def first_step(size):
    return lambda e: e.get("event") == "step" and e.get("first_after_change") and e["workers"] == size \
        and e["rank"] == 0


def phases(events, size, decided_ms=None):
    """Phases of the change to `size` workers from the events up to rank 0's first step at that size."""
    step = events[-1]
    version = step["cluster_version"]
    change = [e for e in events if e.get("event") in ("changed", "recovered") and e["cluster_version"] == version
              and e["rank"] == 0][-1]
    proposed = change["proposed_unix_ms"]
    starts = [e["process_start_unix_ms"] for e in events if e.get("event") == "start"
              and e["cluster_version"] == version]
    result = {
        "agree_ms": change["agree_ms"],
        "start_ms": (max(starts) - proposed) if starts else None,
        "connect_ms": change["connect_ms"],
        "state_ms": change["restore_ms"],
        "total_ms": proposed + step["since_proposal_ms"] - (decided_ms if decided_ms is not None else proposed),
    }
    if decided_ms is not None:
        result["detect_ms"] = proposed - decided_ms  # kill -> new version proposed
    return result


def resize_runs(args):
    worker = ["--epochs", "1000000", "--step-ms", str(args.step_ms), "--dim", str(args.dim), "--print-every",
              "1000000000"]
    job = Job(args.build, 2, ["--max-np", "4"], worker)
    up, down = [], []
    try:
        job.wait_for(lambda e: e.get("event") == "start" and e["rank"] == 0)
        time.sleep(0.5)  # let training settle
        for _ in range(args.repeats):
            job.ctl("resize", "4")
            up.append(phases(job.wait_for(first_step(4)), 4))
            time.sleep(0.3)
            job.ctl("resize", "2")
            down.append(phases(job.wait_for(first_step(2)), 2))
            time.sleep(0.3)
    finally:
        job.stop()
    return up, down


def recovery_runs(args, restart):
    worker = ["--epochs", "1000000", "--step-ms", str(args.step_ms), "--dim", str(args.dim), "--print-every",
              "1000000000"]
    runs = []
    for _ in range(args.repeats):
        job = Job(args.build, 3, ["--max-np", "3"] + (["--restart"] if restart else []), worker)
        try:
            starts = job.wait_for(lambda e: e.get("event") == "start" and e["rank"] == 1)
            time.sleep(0.5)
            victim = [e for e in starts if e["rank"] == 1][-1]["pid"]
            killed = time.time() * 1000.0
            os.kill(victim, signal.SIGKILL)
            size = 3 if restart else 2
            runs.append(phases(job.wait_for(first_step(size)), size, decided_ms=killed))
        finally:
            job.stop()
    return runs


def summary(name, runs, target_ms):
    keys = ["detect_ms", "agree_ms", "start_ms", "connect_ms", "state_ms", "total_ms"]
    cells = []
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None and r[key] >= 0]
        cells.append(f"{statistics.median(values):8.1f} {max(values):8.1f}" if values else f"{'-':>8} {'-':>8}")
    total = statistics.median([r["total_ms"] for r in runs])
    verdict = "ok" if total <= target_ms else "MISSED"
    return f"{name:<26}" + " ".join(cells) + f"   {target_ms:>6.0f} {verdict}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build", help="build directory with bin/aikido-run, aikido-ctl, "
                        "elastic_worker (default: build)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1 << 20, help="model size in floats (default 1048576: 4 MiB)")
    parser.add_argument("--step-ms", type=int, default=2, help="simulated compute per step (default 2)")
    parser.add_argument("--json", action="store_true", help="print every run as JSON instead of the table")
    args = parser.parse_args()
    for tool in ("aikido-run", "aikido-ctl", "elastic_worker"):
        if not os.access(os.path.join(args.build, "bin", tool), os.X_OK):
            sys.exit(f"elastic_resize.py: {args.build}/bin/{tool} is missing; build with tests enabled")

    up, down = resize_runs(args)
    restart = recovery_runs(args, restart=True)
    survivors = recovery_runs(args, restart=False)
    if args.json:
        print(json.dumps({"scale_up_2_to_4": up, "scale_down_4_to_2": down, "recovery_restart": restart,
                          "recovery_no_restart": survivors}, indent=1))
        return
    print(f"model {args.dim} floats ({args.dim * 4 / 2**20:.1f} MiB), {args.step_ms} ms compute per step, "
          f"{args.repeats} repeats; median and max in ms")
    header = ["detect", "agree", "start", "connect", "state", "total"]
    print(f"{'':<26}" + " ".join(f"{h:>17}" for h in header) + "   target")
    print(summary("scale-up 2->4", up, 2000))
    print(summary("scale-down 4->2", down, 100))
    print(summary("kill -9, --restart (3)", restart, 2000))
    print(summary("kill -9, survivors (2)", survivors, 2000))


if __name__ == "__main__":
    main()
