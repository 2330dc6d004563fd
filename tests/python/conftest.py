"""Shared helpers of the Python tests: start worker processes (by hand with torch's env:// variables, under torchrun, or
under aikido-run) and read what they print.

CTest runs each test_*.py with PYTHONPATH=<build>/python and AIKIDO_BUILD_DIR=<build> (python/CMakeLists.txt). Run
by hand: PYTHONPATH=build/python AIKIDO_BUILD_DIR=build /usr/bin/python3 -m pytest tests/python
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("AIKIDO_BUILD_DIR", os.path.join(ROOT, "build"))
PYTHON = sys.executable
WORKERS = os.path.join(HERE, "workers")
BOUND = 240  # seconds: a job that takes longer has hung


def worker(name):
    return os.path.join(WORKERS, name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Ranks:
    """`size` processes of one worker script, with torch's env:// variables set by hand."""

    def __init__(self, script, size, args=(), env=None, stdin=False):
        port = free_port()
        self.procs = []
        for rank in range(size):
            e = base_env(RANK=rank, WORLD_SIZE=size, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=size,
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(env or {}))
            # faulthandler: a worker that hangs prints every thread's stack when the test aborts it.
            self.procs.append(subprocess.Popen([PYTHON, "-X", "faulthandler", worker(script), *map(str, args)],
                                               env=e, text=True,
                                               stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE))

    def wait(self, timeout=BOUND):
        """(returncode, stdout, stderr) per rank; kills everything after `timeout`."""
        deadline = time.monotonic() + timeout
        results = []
        for p in self.procs:
            try:
                out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    if q.poll() is None:
                        q.send_signal(signal.SIGABRT)
                out, err = p.communicate()
                err += f"\n[test] aborted after {timeout} s"
            results.append((p.returncode, out, err))
        return results

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.communicate()


def describe(results):
    return "\n".join(f"--- rank {r}: exit {code}\n{out}\n{err}" for r, (code, out, err) in enumerate(results))


def json_lines(text, prefix=""):
    """The JSON objects of `text`'s lines that start with prefix + '{'."""
    lines = []
    for line in text.splitlines():
        if line.startswith(prefix + "{"):
            lines.append(json.loads(line[len(prefix):]))
    return lines


def worker_json_lines(text):
    """The JSON objects of every worker's lines: prefixed "[RANK] ", or "[RANK|wID] " in an elastic job once a worker's
    rank and id differ."""
    lines = []
    for line in text.splitlines():
        m = re.match(r"^\[\d+(\|w\d+)?\] (\{.*)$", line)
        if m:
            lines.append(json.loads(m.group(2)))
    return lines


def aikido_run(args, env=None, timeout=BOUND, **popen):
    """Runs build/bin/aikido-run ARGS to the end: a CompletedProcess."""
    return subprocess.run([os.path.join(BUILD, "bin", "aikido-run"), *map(str, args)], env=base_env(**(env or {})),
                          text=True, capture_output=True, timeout=timeout, **popen)


@pytest.fixture
def build_dir():
    if not os.path.exists(os.path.join(BUILD, "bin", "aikido-run")):
        pytest.fail(f"{BUILD}/bin/aikido-run not found: build the project (AIKIDO_BUILD_DIR names the build folder)")
    return BUILD


def children_of(pid):
    """{AIKIDO_RANK: pid} of the workers aikido-run `pid` started."""
    workers = {}
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return workers
    for child in children:
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"AIKIDO_WORKER_ID" in env:
            workers[env[b"AIKIDO_WORKER_ID"].decode()] = child
        elif b"AIKIDO_RANK" in env:
            workers[env[b"AIKIDO_RANK"].decode()] = child
    return workers


def interrupt(pid):
    os.kill(pid, signal.SIGINT)
