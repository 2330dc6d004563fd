#!/usr/bin/python3
"""Membership changes of a job across hosts: Aikido against torchrun's elastic agent, side by side in one run.

Three emulated hosts (scripts/hosts.sh: network namespaces on a bridge), one worker each, etcd on the bridge. Aikido
runs `aikido-run --nnodes 1:3 --store etcd://...` on every host with tests/integration/elastic_worker (allreduce of a
4096-float model per step, --step-ms of compute per step, commits every 4 steps); torchrun runs
`torchrun --nnodes 1:3 --rdzv_backend c10d` (rendezvous hosted by host 0's agent, --monitor_interval 0.5,
--max_restarts 10) with bench/ddp_elastic_steps.py (the example's MLP under DDP with Gloo, the same --step-ms). Both
print one line per step with its wall-clock time. Measured, from the event to the first step completed by a worker
of the new membership (median and maximum of --repeats runs):

  join        a third host's launcher starts while two train -> its worker's first step
  crash       SIGKILL to every process of host 2 (launcher and worker) -> the survivors' first step without it
  crash-rank0 the same for host 0, whose worker has rank 0 (Aikido only: torchrun's c10d rendezvous lives there)
  partition   host 2's link is cut (ip link down) -> the survivors' first step without it (Aikido: --host-timeout 2)

Targets (the many-hosts issue): crash within 1 s, partition within --host-timeout + 1 s, join within 2 s. torchrun
restarts every worker on each change (a new process that loads PyTorch and rendezvous again). Needs root.

  sudo bench/multihost_elastic.py --build build [--repeats 3] [--step-ms 20] [--skip-torchrun] [--json]
"""

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOSTS = os.path.join(ROOT, "scripts", "hosts.sh")
BRIDGE = "198.18.0.1"
ETCD_PORT = 23791


def host_address(i):
    return "198.18.0.%d" % (10 + i)


class Process:
    """A command on an emulated host; its JSON lines (after the first '{') arrive in a shared queue."""

    def __init__(self, host, argv, events, tag):
        self.host = host
        self.process = subprocess.Popen([HOSTS, "exec", "h%d" % host] + argv, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []
        threading.Thread(target=self._read, args=(events, tag), daemon=True).start()

    def _read(self, events, tag):
        for line in self.process.stdout:
            self.lines.append(line)
            brace = line.find("{")
            if brace < 0:
                continue
            try:
                event = json.loads(line[brace:])
            except ValueError:
                continue
            event["host"] = self.host
            event["tag"] = tag
            events.put(event)

    def stop(self):
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait()


def kill_host(i):
    subprocess.run(["/bin/sh", "-c", "for p in $(ip netns pids aikido-h%d); do kill -9 $p; done" % i], check=False)


def wait_for(events, predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            e = events.get(timeout=max(0.01, deadline - time.time()))
        except queue.Empty:
            break
        if predicate(e):
            return e
    raise RuntimeError("timed out waiting for " + what)


class Aikido:
    name = "aikido"

    def __init__(self, build, secret, step_ms):
        self.build = build
        self.secret = secret
        self.step_ms = step_ms

    def start(self, host, job, events):
        argv = [os.path.join(self.build, "bin", "aikido-run"), "--nnodes", "1:3", "--nproc-per-node", "1",
                "--store", "etcd://%s:%d" % (BRIDGE, ETCD_PORT), "--job-id", job, "--secret-file", self.secret,
                "--host-timeout", "2", os.path.join(self.build, "bin", "elastic_worker"), "--epochs", "100000",
                "--step-ms", str(self.step_ms), "--print-every", "1"]
        return Process(host, argv, events, job)


class Torchrun:
    name = "torchrun"

    def __init__(self, step_ms):
        self.step_ms = step_ms
        self.stop_file = tempfile.mktemp(prefix="aikido-bench-stop-")

    def start(self, host, job, events):
        argv = ["/usr/bin/python3", "-m", "torch.distributed.run", "--nnodes", "1:3", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", "%s:29400" % host_address(0), "--rdzv_id", job,
                "--max_restarts", "10", "--monitor_interval", "0.5", "--redirects", "1", "--tee", "1",
                os.path.join(HERE, "ddp_elastic_steps.py"), "--seconds", "600", "--step-ms", str(self.step_ms),
                "--stop-file", self.stop_file]
        return Process(host, argv, events, job)


def scenario(system, kind, job):
    """One run: returns seconds from the event to the first step of the new membership."""
    events = queue.Queue()
    procs = []
    try:
        first = [0, 1] if kind == "join" else [0, 1, 2]
        for h in first:
            procs.append(system.start(h, job, events))
            if h == 0:
                time.sleep(1.0 if system.name == "torchrun" else 0.2)  # host 0 hosts torchrun's rendezvous
        size = len(first)
        wait_for(events, lambda e: e.get("event") == "step" and e.get("workers") == size and e["tag"] == job, 120,
                 "%d workers training (%s)" % (size, system.name))
        time.sleep(1.0)  # steady state
        t0 = time.time() * 1000.0
        if kind == "join":
            procs.append(system.start(2, job, events))
            done = wait_for(events, lambda e: e.get("event") == "step" and e["host"] == 2 and e["tag"] == job, 120,
                            "the joining host's first step")
        else:
            victim = 0 if kind == "crash-rank0" else 2
            if kind == "partition":
                subprocess.run([HOSTS, "cut", "h2"], check=True)
            else:
                kill_host(victim)
            done = wait_for(events, lambda e: e.get("event") == "step" and e.get("workers") == 2 and
                            e["unix_ms"] > t0 and e["host"] != victim and e["tag"] == job, 180,
                            "the survivors' first step without host %d" % victim)
        return (done["unix_ms"] - t0) / 1000.0
    finally:
        if system.name == "torchrun":
            open(system.stop_file, "w").close()
        subprocess.run([HOSTS, "heal", "h2"], check=False)
        for p in procs:
            p.stop()
        for h in range(3):
            kill_host(h)
        if system.name == "torchrun" and os.path.exists(system.stop_file):
            os.unlink(system.stop_file)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-ms", type=int, default=20)
    p.add_argument("--skip-torchrun", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("multihost_elastic.py needs root (network namespaces)")
    subprocess.run([HOSTS, "up", "3", "--owner", str(os.getpid())], check=True)
    work = tempfile.mkdtemp(prefix="aikido-bench-hosts-")
    secret = os.path.join(work, "secret")
    with open(secret, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    os.chmod(secret, 0o600)
    etcd = subprocess.Popen(
        ["/usr/bin/etcd", "--name", "n0", "--data-dir", os.path.join(work, "etcd"), "--listen-client-urls",
         "http://%s:%d" % (BRIDGE, ETCD_PORT), "--advertise-client-urls", "http://%s:%d" % (BRIDGE, ETCD_PORT),
         "--listen-peer-urls", "http://%s:%d" % (BRIDGE, ETCD_PORT + 1), "--initial-advertise-peer-urls",
         "http://%s:%d" % (BRIDGE, ETCD_PORT + 1), "--initial-cluster", "n0=http://%s:%d" % (BRIDGE, ETCD_PORT + 1),
         "--heartbeat-interval", "10", "--election-timeout", "100"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    results = {}
    try:
        systems = [Aikido(args.build, secret, args.step_ms)]
        if not args.skip_torchrun:
            systems.append(Torchrun(args.step_ms))
        kinds = ["join", "crash", "crash-rank0", "partition"]
        for kind in kinds:
            for system in systems:
                if system.name == "torchrun" and kind == "crash-rank0":
                    continue
                times = []
                for r in range(args.repeats):
                    job = "bench-%s-%s-%d-%d" % (system.name, kind, r, os.getpid())
                    try:
                        times.append(scenario(system, kind, job))
                    except RuntimeError as e:
                        print("%s %s run %d: %s" % (system.name, kind, r, e), file=sys.stderr)
                results[(system.name, kind)] = times
                print("%-9s %-12s %s" % (system.name, kind, " ".join("%.2f" % t for t in times)), file=sys.stderr,
                      flush=True)
    finally:
        etcd.terminate()
        etcd.wait()
        subprocess.run([HOSTS, "down", "--owner", str(os.getpid())], check=False)
    if args.json:
        print(json.dumps({"%s/%s" % k: v for k, v in results.items()}))
        return
    targets = {"join": 2.0, "crash": 1.0, "crash-rank0": 1.0, "partition": 3.0}
    print("seconds from the event to the first step of the new membership (median / max of %d runs)" % args.repeats)
    print("%-12s %16s %16s %10s %8s" % ("change", "aikido", "torchrun", "torchrun/", "target"))
    print("%-12s %16s %16s %10s %8s" % ("", "", "", "aikido", "(aikido)"))
    for kind in ["join", "crash", "crash-rank0", "partition"]:
        a = results.get(("aikido", kind), [])
        t = results.get(("torchrun", kind), [])

        def cell(v):
            return "%.2f / %.2f" % (statistics.median(v), max(v)) if v else "-"

        ratio = "%.1f" % (statistics.median(t) / statistics.median(a)) if a and t else "-"
        met = "met" if a and statistics.median(a) <= targets[kind] else "missed"
        print("%-12s %16s %16s %10s %8s" % (kind, cell(a), cell(t), ratio, "%s %.0f s" % (met, targets[kind])))


if __name__ == "__main__":
    main()
