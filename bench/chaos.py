#!/usr/bin/python3
"""Chaos runs: elastic training of the Fashion-MNIST example while random workers are killed, stopped, resized and
(across emulated hosts) cut off, then checks that nothing was lost and nothing was left behind.

Each run starts build/bin/train_fashion_mnist (--count-samples --all-ranks) under
`aikido-run --elastic --restart` with 3 or 4 workers (--max-np 4) and, from the first training step until the job
ends, injects one fault every --interval seconds (uniform between half and one and a half times it), drawn from:

  kill     SIGKILL to a random worker (aikido-run starts a replacement)
  stop     SIGSTOP to a random worker; half of the time SIGCONT after 0.3 to 2 s (below the heartbeat timeout), the
           other half it is left stopped for aikido-run's heartbeat to find (it kills and replaces it)
  resize   aikido-ctl resize N, N from 2 to 4 and not the current size
  cut      (--hosts only: two hosts of 2 workers, launchers joined through etcd) a whole emulated host's link taken
           down (ip link set ... down) and healed after 2 to 9 s, below or above --host-timeout (5 s); a host that
           was removed meanwhile (its launcher exits with status 1) gets a fresh launcher, which joins again

At least one worker that has trained for 3 s is never touched at a time, so that the job's state survives (Aikido
keeps it in the workers' memory: losing every worker at once loses the job, by design); resizes go on while a host
is cut off (a shrink keeps a worker on every host). A worker stopped once the training may have finished is always
continued (killed there, it would not print the finished line the params check counts; see bench/README.md).

At the end of each run:
  status     aikido-run exited with status 0 (with --hosts: every launcher, but 1 for one removed while cut off)
  samples    every epoch printed, and every epoch line says global_samples == 60000, trained_samples == 60000 and
             samples_once (the example counts the samples trained step by step, with a fingerprint of their indices,
             rolled back with the model: each index exactly once)
  params     every worker of the final cluster printed the same digest of its parameters
             ("train_fashion_mnist: finished: ... parameters D"), and as many did as the final cluster has workers,
             but for a worker lost once a member had finished the training (aikido-run: "not replacing it: worker N
             has finished the training"), which may have been stopped or killed before it printed the line
  leftovers  within 10 s of the end: no process of the job (its AIKIDO_JOB_ID), no /dev/shm entry and no socket
             (path or abstract) naming the job, no file left in the run's folder but the logs, no etcd key of the
             job (--hosts)

Standard library only, run with /usr/bin/python3. A failed run's folder (logs of every worker, aikido-run's events)
is kept and named.

  bench/chaos.py [--build build] [--runs 20] [--hog] [--seed S] [--epochs 2] [--interval 3] [--max-faults N]
                 [--quick] [--hosts] [--json]
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOSTS = os.path.join(ROOT, "scripts", "hosts.sh")
BRIDGE = "198.18.0.1"
ETCD_PORT = 23795
SAMPLES = 60000
EPOCH_LINE = re.compile(r"^\[[^\]]*\] (\{\"epoch\".*\})\s*$")
FINISHED = re.compile(r"train_fashion_mnist: finished: rank (\d+) of (\d+), epoch (\d+), step (\d+), "
                      r"cluster version (\d+), parameters ([0-9a-f]+)")
# A worker lost after some member finished the training: its training was complete, but it may not have printed
# its finished line (stopped or killed while it printed it).
LOST_AFTER_FINISH = re.compile(r"aikido-run: worker \d+ \(rank (\d+)\) .*; not replacing it: worker \d+ has finished "
                               r"the training")


def alive(pid):
    """True while pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def processes_of_job(job):
    """Pids of live processes whose environment names the job."""
    found = []
    needle = f"AIKIDO_JOB_ID={job}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if any(v.startswith(needle) for v in env.split(b"\0")) and alive(int(name)):
            found.append(int(name))
    return found


def sockets_of_job(job):
    """Unix sockets (abstract or paths) whose name contains the job id."""
    try:
        with open("/proc/net/unix") as f:
            return sorted({line.split()[-1] for line in f if job in line and len(line.split()) >= 8})
    except OSError:
        return []


def shm_of_job(job):
    try:
        return sorted(n for n in os.listdir("/dev/shm") if job in n)
    except OSError:
        return []


class Hog:
    """One busy-looping process per CPU, niced like the workers (not at all)."""

    def __init__(self):
        self.procs = [subprocess.Popen(["/usr/bin/python3", "-c", "while True: pass"]) for _ in range(os.cpu_count())]

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


class Run:
    """One chaos run of the example; `faults` lists what was injected, `problems` what the checks found."""

    def __init__(self, args, index, rng):
        self.args = args
        self.index = index
        self.rng = rng
        self.dir = tempfile.mkdtemp(prefix=f"aikido-chaos-{index}-")
        self.control = os.path.join(self.dir, "job.ctl")
        self.logs = os.path.join(self.dir, "logs")
        self.workers = rng.choice([3, 4])
        self.faults = []
        self.problems = []
        self.stopped = {}  # pid -> time it was stopped (SIGSTOP, not yet continued)
        self.touched = set()  # pids a fault was aimed at
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.job = None

    # --- what aikido-run says -------------------------------------------------------------------------------------
    def events(self, log_dir=None):
        out = []
        folder = log_dir or self.logs
        try:
            names = [n for n in os.listdir(folder) if n.startswith("events") and n.endswith(".jsonl")]
        except OSError:
            names = []  # not written yet
        for name in names:  # events.jsonl; across hosts events-HOST.jsonl
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass  # a line being written
        return out

    def live_workers(self, events):
        """pid -> (worker id, started time) of workers started and not exited, children of a launcher."""
        started, exited = {}, set()
        for e in events:
            if e.get("event") == "worker_started":
                started[e["pid"]] = (e["id"], e["time"])
            elif e.get("event") == "worker_exited":
                exited.add(e["pid"])
        return {pid: v for pid, v in started.items() if pid not in exited and alive(pid)}

    def ctl(self, *argv):
        return subprocess.run([os.path.join(self.args.build, "bin", "aikido-ctl"), "--control-file", self.control]
                              + list(argv), capture_output=True, text=True, timeout=30)

    # --- faults ---------------------------------------------------------------------------------------------------
    def note(self, kind, text):
        self.faults.append({"kind": kind, "at": round(time.monotonic() - self.t0, 1), "what": text})

    def pick_victim(self, live):
        """A worker to hit, keeping at least one worker that trained for 3 s and is untouched (the job's state)."""
        now = time.time()
        with self.lock:
            healthy = [pid for pid, (_, t) in live.items() if pid not in self.touched and now - t > 3.0]
            candidates = [pid for pid in live if pid not in self.stopped]
        if not healthy:
            return None
        keep = self.rng.choice(healthy)
        candidates = [pid for pid in candidates if pid != keep]
        return self.rng.choice(candidates) if candidates else None

    def inject(self, kind, live):
        if kind == "resize":
            status = self.ctl("status")
            m = re.search(r"(\d+) workers", status.stdout)
            current = int(m.group(1)) if m else self.workers
            target = self.rng.choice([n for n in (2, 3, 4) if n != current])
            r = self.ctl("resize", str(target))
            self.note("resize", f"resize {current} -> {target}" + ("" if r.returncode == 0 else
                                                                   f" (refused: {r.stderr.strip()[:120]})"))
            return
        victim = self.pick_victim(live)
        if victim is None:
            return
        wid = live[victim][0]
        with self.lock:
            self.touched.add(victim)
        if kind == "kill":
            os.kill(victim, signal.SIGKILL)
            self.note("kill", f"SIGKILL worker {wid}")
        else:
            os.kill(victim, signal.SIGSTOP)
            with self.lock:
                self.stopped[victim] = time.monotonic()
            # A worker stopped for good once the training has finished is killed by aikido-run (by its heartbeat, or
            # after it left its session for being stopped), so it never prints its finished line, which the params
            # check counts. Such a worker is always continued (see bench/README.md).
            if self.rng.random() < 0.5 or self.finished(wid):
                pause = self.rng.uniform(0.3, 2.0)
                self.note("stop", f"SIGSTOP worker {wid}, SIGCONT after {pause:.1f} s")
                threading.Timer(pause, self.resume, args=(victim,)).start()
            else:
                self.note("stop", f"SIGSTOP worker {wid}, left to the heartbeat")

    def finished(self, wid):
        """True once the training has finished somewhere, or worker `wid` said it finished."""
        if any("has finished the training" in line for line in self.stderr_lines[-200:]):
            return True
        for folder in self.log_dirs():
            try:
                with open(os.path.join(folder, f"rank-{wid}.log"), errors="replace") as f:
                    if "train_fashion_mnist: finished:" in f.read():
                        return True
            except OSError:
                pass
        return False

    def log_dirs(self):
        return [self.logs]

    def resume(self, pid):
        with self.lock:
            self.stopped.pop(pid, None)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def chaos(self):
        """Injects faults from the first step until the job ends."""
        while not self.done.is_set() and not any(
                "starting:" in line for line in self.stderr_lines[-50:]):
            time.sleep(0.1)
        kinds = ["kill", "stop", "resize"] + (["cut"] if self.args.hosts else [])
        while not self.done.wait(self.rng.uniform(0.5, 1.5) * self.args.interval):
            if self.args.max_faults and len(self.faults) >= self.args.max_faults:
                break
            live = self.live_workers(self.events())
            if not live:
                continue
            try:
                self.inject(self.rng.choice(kinds), live)
            except (OSError, subprocess.SubprocessError) as e:
                self.note("error", f"injecting failed: {e}")

    # --- the run ----------------------------------------------------------------------------------------------------
    def example_argv(self):
        return [os.path.join(self.args.build, "bin", "train_fashion_mnist"), "--epochs", str(self.args.epochs),
                "--batch-size", str(self.args.batch_size), "--all-ranks", "--output", "json", "--count-samples",
                "--commit-every", "10", "--seed", str(self.rng.randrange(1, 1 << 30))]

    def run(self):
        argv = [os.path.join(self.args.build, "bin", "aikido-run"), "-np", str(self.workers), "--elastic",
                "--max-np", "4", "--restart", "--max-restarts", "1000", "--timeout", str(self.args.timeout),
                "--control-file", self.control, "--log-dir", self.logs] + self.example_argv()
        self.t0 = time.monotonic()
        self.stderr_lines = []
        self.job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True, cwd=self.dir)
        out = []
        readers = [threading.Thread(target=lambda: out.extend(self.job.stdout), daemon=True),
                   threading.Thread(target=lambda: self.stderr_lines.extend(self.job.stderr), daemon=True)]
        for t in readers:
            t.start()
        injector = threading.Thread(target=self.chaos, daemon=True)
        injector.start()
        try:
            self.job.wait(timeout=self.args.max_seconds)
        except subprocess.TimeoutExpired:
            self.problems.append(f"status: still running after {self.args.max_seconds} s (a hang?)")
            os.killpg(self.job.pid, signal.SIGKILL)
            self.job.wait()
        self.done.set()
        injector.join()
        for pid in list(self.stopped):
            self.resume(pid)
        for t in readers:
            t.join(timeout=5)
        self.seconds = time.monotonic() - self.t0
        if self.job.returncode != 0:
            self.problems.append(f"status: aikido-run exited with status {self.job.returncode}")
        events = self.events()
        job_id = next((e["job"] for e in events if e.get("event") == "job_started"), None)
        self.check_output(out, self.stderr_lines)
        self.check_leftovers(job_id, events)
        return self.report(job_id)

    # --- the checks ---------------------------------------------------------------------------------------------------
    def check_output(self, out, err):
        epochs = {}
        for line in out:
            m = EPOCH_LINE.match(line)
            if not m:
                continue
            e = json.loads(m.group(1))
            epochs.setdefault(e["epoch"], []).append(e)
            if e.get("global_samples") != SAMPLES or e.get("trained_samples") != SAMPLES or not e.get("samples_once"):
                self.problems.append(
                    f"samples: epoch {e['epoch']} rank {e['rank']}: global_samples {e.get('global_samples')}, "
                    f"trained_samples {e.get('trained_samples')}, samples_once {e.get('samples_once')}")
        missing = [k for k in range(self.args.epochs) if k not in epochs]
        if missing:
            self.problems.append(f"samples: no line for epoch(s) {missing}")
        finished = [FINISHED.search(line) for line in err]
        finished = [m for m in finished if m]
        if not finished:
            self.problems.append("params: no worker said it finished")
            return
        sizes = {int(m.group(2)) for m in finished}
        digests = {m.group(6) for m in finished}
        ranks = sorted(int(m.group(1)) for m in finished)
        self.final = {"workers": sorted(sizes), "ranks": ranks, "digests": sorted(digests),
                      "version": max(int(m.group(5)) for m in finished)}
        if len(digests) != 1:
            self.problems.append(f"params: the workers' parameters differ: {sorted(digests)}")
        late = sorted({int(m.group(1)) for m in (LOST_AFTER_FINISH.search(line) for line in err) if m})
        if late:
            self.final["lost_after_finish"] = late
        if len(sizes) != 1 or not set(ranks) <= set(range(next(iter(sizes)))) or \
                set(range(next(iter(sizes)))) - set(ranks) - set(late):
            self.problems.append(f"params: finished ranks {ranks} of cluster sizes {sorted(sizes)}"
                                 + (f" (lost after the training finished: ranks {late})" if late else ""))

    def check_leftovers(self, job_id, events):
        if job_id is None:
            self.problems.append("leftovers: aikido-run's events name no job")
            return
        pids = {e["pid"] for e in events if e.get("event") == "worker_started"}
        deadline = time.monotonic() + 10
        while True:
            procs = sorted(set(processes_of_job(job_id)) | {p for p in pids if alive(p) and
                                                            parent_of(p) in (1, self.job.pid)})
            shm, socks = shm_of_job(job_id), sockets_of_job(job_id)
            files = [n for n in os.listdir(self.dir) if not n.startswith("logs")]
            if not (procs or shm or socks or files) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for what, items in (("process", procs), ("/dev/shm entry", shm), ("socket", socks), ("file", files)):
            if items:
                self.problems.append(f"leftovers: {what}(s) of job {job_id}: {items}")
        for pid in procs:  # leave nothing behind ourselves either
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def report(self, job_id):
        result = {"run": self.index, "job": job_id, "workers": self.workers, "seconds": round(self.seconds, 1),
                  "faults": self.faults, "final": getattr(self, "final", None), "ok": not self.problems,
                  "problems": self.problems}
        if self.problems:
            result["folder"] = self.dir
            with open(os.path.join(self.dir, "stderr.txt"), "w") as f:
                f.writelines(self.stderr_lines)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return result


class HostsRun(Run):
    """A run across two emulated hosts (2 workers each), launchers joined through etcd; adds the `cut` fault."""

    def __init__(self, args, index, rng, secret):
        super().__init__(args, index, rng)
        self.workers = 4
        self.secret = secret
        self.launchers = []  # dicts: host, process, log dir, stdout and stderr lines, cut (bool)
        self.rejoin_lock = threading.Lock()
        self.job_id = f"chaos-{os.getpid()}-{index}"

    def start_launcher(self, host):
        log_dir = os.path.join(self.dir, f"logs-h{host}-{len(self.launchers)}")
        argv = [HOSTS, "exec", str(host), os.path.join(self.args.build, "bin", "aikido-run"), "--nnodes", "1:2",
                "--nproc-per-node", "2", "--store", f"etcd://{BRIDGE}:{ETCD_PORT}", "--job-id", self.job_id,
                "--secret-file", self.secret, "--restart", "--max-restarts", "1000",
                "--timeout", str(self.args.timeout), "--log-dir", log_dir] + self.example_argv_fixed
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=self.dir)
        launcher = {"host": host, "process": proc, "logs": log_dir, "out": [], "err": [], "cut": False,
                    "cut_now": False}
        launcher["readers"] = [threading.Thread(target=lambda: launcher["out"].extend(proc.stdout), daemon=True),
                               threading.Thread(target=lambda: launcher["err"].extend(proc.stderr), daemon=True)]
        for t in launcher["readers"]:
            t.start()
        with self.lock:
            self.launchers.append(launcher)
        return launcher

    def log_dirs(self):
        with self.lock:
            return [launcher["logs"] for launcher in self.launchers]

    def events(self, log_dir=None):
        if log_dir:
            return super().events(log_dir)
        with self.lock:
            dirs = [launcher["logs"] for launcher in self.launchers]
        return [e for d in dirs for e in Run.events(self, d)]

    @property
    def stderr_lines(self):
        with self.lock:
            return [line for launcher in self.launchers for line in launcher["err"]]

    @stderr_lines.setter
    def stderr_lines(self, value):
        pass

    def ctl(self, *argv):
        return subprocess.run([os.path.join(self.args.build, "bin", "aikido-ctl"), "--store",
                               f"etcd://{BRIDGE}:{ETCD_PORT}", "--job-id", self.job_id, "--secret-file", self.secret]
                              + list(argv), capture_output=True, text=True, timeout=30)

    def inject(self, kind, live):
        # Resizes go on while a host is cut off: a shrink keeps a worker on each host (2 to 4 workers on 2 hosts),
        # so the job's state never goes with the cut-off host alone.
        if kind != "cut":
            return super().inject(kind, live)
        with self.lock:
            running = [launcher for launcher in self.launchers if launcher["process"].poll() is None]
            cut = any(launcher["cut_now"] for launcher in self.launchers)
        hosts = sorted({launcher["host"] for launcher in running})
        if cut or len(hosts) < 2:
            return  # one host at a time: the other keeps the job's state
        host = self.rng.choice(hosts)
        launcher = next(launcher for launcher in running if launcher["host"] == host)
        mine = set(self.live_workers(Run.events(self, launcher["logs"])))
        now = time.time()
        with self.lock:
            if not any(pid not in mine and pid not in self.touched and now - t > 3.0 for pid, (_, t) in live.items()):
                return  # no worker elsewhere holds the job's state for sure
            self.touched |= mine
        launcher["cut"] = launcher["cut_now"] = True
        pause = self.rng.uniform(2.0, 9.0)  # below and above the launchers' --host-timeout (5 s)
        subprocess.run([HOSTS, "cut", str(host)], check=True)
        self.note("cut", f"cut host h{host} for {pause:.1f} s")
        threading.Thread(target=self.heal, args=(host, launcher, pause), daemon=True).start()

    def heal(self, host, launcher, pause):
        time.sleep(pause)
        subprocess.run([HOSTS, "heal", str(host)], check=False)
        launcher["cut_now"] = False
        # Cut for longer than --host-timeout, the host's launcher finds itself removed from the job and stops (status
        # 1): a fresh one joins again. Cut for less, the host stays and its workers go on.
        while not self.done.is_set():
            if launcher["process"].poll() is not None:
                # Two cuts of one launcher's host have two of these threads waiting for it: one fresh launcher.
                with self.rejoin_lock:
                    with self.lock:
                        running = any(other["host"] == host and other["process"].poll() is None
                                      for other in self.launchers)
                    if self.training_left() and not running:
                        self.start_launcher(host)
                        self.note("rejoin", f"fresh launcher on h{host}")
                break
            time.sleep(0.2)

    def training_left(self):
        return not any("has finished the training" in line for line in self.stderr_lines)

    def run(self):
        self.example_argv_fixed = self.example_argv()
        self.t0 = time.monotonic()
        self.start_launcher(0)
        self.start_launcher(1)
        injector = threading.Thread(target=self.chaos, daemon=True)
        injector.start()
        deadline = time.monotonic() + self.args.max_seconds
        while time.monotonic() < deadline:
            with self.lock:
                first = [launcher for launcher in self.launchers if not launcher["cut"]]
            if all(launcher["process"].poll() is not None for launcher in first):
                break
            time.sleep(0.2)
        else:
            self.problems.append(f"status: still running after {self.args.max_seconds} s (a hang?)")
        self.done.set()
        injector.join()
        for pid in list(self.stopped):
            self.resume(pid)
        time.sleep(0.5)
        with self.lock:
            launchers = list(self.launchers)
        for launcher in launchers:
            try:
                launcher["process"].wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(launcher["process"].pid, signal.SIGKILL)
                launcher["process"].wait()
            for t in launcher["readers"]:
                t.join(timeout=5)
            code = launcher["process"].returncode
            if code != 0 and not (launcher["cut"] and code == 1):  # 1: a cut host that was removed
                self.problems.append(f"status: the launcher of h{launcher['host']} ({os.path.basename(launcher['logs'])})"
                                     f" exited with status {code}")
        self.seconds = time.monotonic() - self.t0
        self.check_output([line for launcher in launchers for line in launcher["out"]], self.stderr_lines)
        self.check_leftovers(self.job_id, self.events())
        keys = subprocess.run(["/usr/bin/etcdctl", "--endpoints", f"http://{BRIDGE}:{ETCD_PORT}", "get", "--prefix",
                               "--keys-only", ""], capture_output=True, text=True, timeout=30).stdout.split()
        keys = [k for k in keys if self.job_id in k]
        if keys:
            self.problems.append(f"leftovers: etcd keys of job {self.job_id}: {keys[:10]}")
        if self.problems:
            with open(os.path.join(self.dir, "stdout.txt"), "w") as f:
                f.writelines(line for launcher in launchers for line in launcher["out"])
        return self.report(self.job_id)

    def check_leftovers(self, job_id, events):
        super().check_leftovers(job_id, events)
        for host in range(2):  # abstract sockets live in their network namespace
            unix = subprocess.run(["ip", "netns", "exec", f"aikido-h{host}", "cat", "/proc/net/unix"],
                                  capture_output=True, text=True).stdout
            socks = [line.split()[-1] for line in unix.splitlines() if job_id in line]
            if socks:
                self.problems.append(f"leftovers: sockets of job {job_id} on h{host}: {socks}")


class Etcd:
    """etcd on the emulated hosts' bridge, for the launchers of --hosts runs."""

    def __init__(self, work):
        self.process = subprocess.Popen(
            ["/usr/bin/etcd", "--name", "chaos", "--data-dir", os.path.join(work, "etcd"), "--listen-client-urls",
             f"http://{BRIDGE}:{ETCD_PORT}", "--advertise-client-urls", f"http://{BRIDGE}:{ETCD_PORT}",
             "--listen-peer-urls", f"http://{BRIDGE}:{ETCD_PORT + 1}", "--initial-advertise-peer-urls",
             f"http://{BRIDGE}:{ETCD_PORT + 1}", "--initial-cluster", f"chaos=http://{BRIDGE}:{ETCD_PORT + 1}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while subprocess.run(["/usr/bin/etcdctl", "--endpoints", f"http://{BRIDGE}:{ETCD_PORT}", "endpoint",
                              "health"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                self.stop()
                sys.exit("chaos.py: etcd did not start on the bridge")
            time.sleep(0.3)

    def stop(self):
        self.process.terminate()
        self.process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--build", default=os.path.join(ROOT, "build"), help="build folder (default: ./build)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hog", action="store_true", help="one busy-looping process per CPU alongside the job")
    parser.add_argument("--seed", type=int, default=None, help="seed of the faults (default: from the clock)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="per worker (default 64)")
    parser.add_argument("--interval", type=float, default=3.0, help="mean seconds between faults (default 3)")
    parser.add_argument("--timeout", type=float, default=20, help="aikido-run --timeout (default 20)")
    parser.add_argument("--max-seconds", type=float, default=300, help="a run still going then fails (default 300)")
    parser.add_argument("--max-faults", type=int, default=0, help="at most this many faults per run (0: no limit)")
    parser.add_argument("--quick", action="store_true",
                        help="1 epoch of batch 128, a fault every 2 s, at most 5; a run fails after 120 s")
    parser.add_argument("--hosts", action="store_true", help="two emulated hosts of 2 workers, launchers joined "
                        "through etcd, with cut links among the faults (needs root; scripts/hosts.sh)")
    parser.add_argument("--json", action="store_true", help="print the runs and the summary as one JSON document")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.batch_size, args.interval, args.max_faults = 1, 128, 2.0, 5
        args.max_seconds = min(args.max_seconds, 120)
    for tool in ("aikido-run", "aikido-ctl", "train_fashion_mnist"):
        if not os.access(os.path.join(args.build, "bin", tool), os.X_OK):
            sys.exit(f"chaos.py: {args.build}/bin/{tool} is missing (configure with -DAIKIDO_WITH_TORCH=ON)")
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    say(f"# chaos: {args.runs} runs, seed {seed}, {args.epochs} epochs, batch {args.batch_size}, a fault every "
        f"~{args.interval:g} s{', CPU hog' if args.hog else ''}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    etcd = None
    work = None
    if args.hosts:
        if os.geteuid() != 0:
            sys.exit("chaos.py: --hosts needs root (network namespaces); run it with sudo")
        subprocess.run([HOSTS, "up", "2", "--owner", str(os.getpid())], check=True)
        work = tempfile.mkdtemp(prefix="aikido-chaos-hosts-")
        secret = os.path.join(work, "secret")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        etcd = Etcd(work)
    hog = Hog() if args.hog else None
    results = []
    try:
        for i in range(args.runs):
            child = random.Random(rng.randrange(1 << 62))
            r = (HostsRun(args, i + 1, child, secret) if args.hosts else Run(args, i + 1, child)).run()
            results.append(r)
            faults = ", ".join(f["what"] for f in r["faults"]) or "none"
            verdict = "PASS" if r["ok"] else "FAIL: " + "; ".join(r["problems"]) + f" (logs: {r['folder']})"
            final = r["final"] or {}
            say(f"run {r['run']}: {r['workers']} workers -> {final.get('workers')} (version {final.get('version')}), "
                f"{r['seconds']:.0f} s, {len(r['faults'])} faults: {faults} -> {verdict}")
    finally:
        if hog:
            hog.stop()
        if etcd:
            etcd.stop()
            subprocess.run([HOSTS, "down", "--owner", str(os.getpid())], check=False)
            shutil.rmtree(work, ignore_errors=True)
    counts = {}
    for r in results:
        for f in r["faults"]:
            counts[f["kind"]] = counts.get(f["kind"], 0) + 1
    summary = {"runs": len(results), "passed": sum(r["ok"] for r in results),
               "failed": sum(not r["ok"] for r in results), "faults": counts, "seed": seed, "hog": args.hog,
               "epochs": args.epochs, "seconds": round(sum(r["seconds"] for r in results), 1)}
    if args.json:
        print(json.dumps({"summary": summary, "runs": results}, indent=1))
    else:
        print(f"# summary: {summary['runs']} runs, {summary['passed']} passed, {summary['failed']} failed; faults: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; {summary['seconds']:.0f} s")
    sys.exit(0 if summary["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
