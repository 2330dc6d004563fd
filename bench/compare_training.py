#!/usr/bin/python3
"""Side-by-side training throughput: Aikido's Fashion-MNIST example against PyTorch DistributedDataParallel.

    python3 bench/compare_training.py BUILD_DIR [--quick] [--repeats R] [--models mlp,cnn] [--batches 64,256]
                                                [--workers 1,2,4]

For each model, per-worker batch size and number of workers it runs, in one go:
  aikido     aikido-run -np N BUILD_DIR/bin/train_fashion_mnist --strategy ssgd   (synchronous SGD)
  ddp        N processes of bench/ddp_fashion_mnist.py: torch.nn.parallel.DistributedDataParallel, Gloo backend
  ceiling    (N = 2 only) the Aikido run with --skip-communication: every worker trains alone, the throughput
             that communication can at best leave untouched
Both sides get the same threads and malloc settings: what aikido-run gives its workers (this host's cores divided
among the workers for OMP_NUM_THREADS, OPENBLAS_NUM_THREADS=1 and its GLIBC_TUNABLES); the DDP processes get them
explicitly (they are not bound to CPUs, as torchrun does not bind them). Each run trains 2 epochs of at most S steps and the second epoch is measured (the first warms up);
throughput = samples of all workers / time of the slowest. Each configuration runs R times; medians are shown with
  aikido/ddp     Aikido throughput / DDP throughput (target: >= 1.3 at 2 and 4 workers)
  aikido/ceil    Aikido throughput / ceiling (target: >= 0.8 at 2 workers)

Standard library only; DDP runs under /usr/bin/python3 (Debian's python3-torch).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
HERE = os.path.dirname(os.path.abspath(__file__))


def worker_env(np):
    """The environment aikido-run gives its workers by default (tools/aikido-run/main.cpp: worker_defaults)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // np)))
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    return env


def last_epoch_throughput(output, what):
    lines = [json.loads(line[line.index("{"):]) for line in output.splitlines() if "{" in line]
    lines = [l for l in lines if l.get("epoch") == 1 and l.get("rank") == 0]
    if not lines:
        raise RuntimeError(f"{what}: no measured epoch in its output:\n{output}")
    return lines[0]["global_samples_per_second"]


def run_aikido(build, model, batch, np, steps, extra):
    cmd = [f"{build}/bin/aikido-run", "-np", str(np), f"{build}/bin/train_fashion_mnist", "--model", model,
           "--batch-size", str(batch), "--epochs", "2", "--max-steps", str(steps)] + extra
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return last_epoch_throughput(r.stdout, "aikido")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(model, batch, np, steps, tries=3):
    # Gloo's TCP pairs on loopback now and then fail to connect ("Connection reset by peer") on this 2-core machine:
    # such a run of the reference is tried again rather than ending the comparison.
    for attempt in range(tries):
        try:
            return run_ddp_once(model, batch, np, steps)
        except RuntimeError as e:
            if attempt + 1 == tries or "Connection reset by peer" not in str(e):
                raise
            print(f"# ddp {model} batch {batch} np {np}: Gloo connection reset, trying again", flush=True)


def run_ddp_once(model, batch, np, steps):
    env = worker_env(np)
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(np)})
    procs = []
    for rank in range(np):
        e = dict(env, RANK=str(rank))
        procs.append(subprocess.Popen(["/usr/bin/python3", f"{HERE}/ddp_fashion_mnist.py", "--model", model,
                                       "--batch-size", str(batch), "--epochs", "2", "--max-steps", str(steps)],
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"ddp_fashion_mnist.py failed ({p.returncode}):\n{out}\n{err}")
    return last_epoch_throughput(outputs[0][0], "ddp")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build")
    p.add_argument("--quick", action="store_true", help="one repeat, fewer steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--samples", type=int, default=0,
                   help="samples per worker in the measured epoch (default 16384, --quick 4096)")
    args = p.parse_args()
    if not os.path.exists(f"{args.build}/bin/train_fashion_mnist"):
        sys.exit(f"{args.build}/bin/train_fashion_mnist not found: build with LibTorch (scripts/setup.sh, cmake)")
    repeats = 1 if args.quick else args.repeats
    samples = args.samples or (4096 if args.quick else 16384)

    print(f"# training throughput, samples/s of all workers; medians of {repeats}; "
          f"{len(os.sched_getaffinity(0))} cores; {samples} samples per worker measured", flush=True)
    header = f"{'model':5} {'batch':>5} {'np':>3} {'aikido':>9} {'ddp':>9} {'ceiling':>9} {'aikido/ddp':>10} {'aikido/ceil':>11}"
    print(header, flush=True)
    rows = []
    for model in args.models.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            for np in [int(n) for n in args.workers.split(",")]:
                # At most the full batches of one worker's share of an epoch (60000 training images): a measured
                # epoch that ran out of data would end early, and DDP's workers would fall out of step.
                steps = max(8, min(samples, 60000 // np) // batch)
                a, d, c = [], [], []
                for _ in range(repeats):
                    a.append(run_aikido(args.build, model, batch, np, steps, []))
                    d.append(run_ddp(model, batch, np, steps))
                    if np == 2:
                        c.append(run_aikido(args.build, model, batch, np, steps, ["--skip-communication"]))
                am, dm = statistics.median(a), statistics.median(d)
                cm = statistics.median(c) if c else None
                row = {"model": model, "batch": batch, "np": np, "aikido": am, "ddp": dm, "ceiling": cm,
                       "aikido/ddp": am / dm, "aikido/ceiling": am / cm if cm else None}
                rows.append(row)
                ceiling = f"{cm:9.0f}" if cm else f"{'-':>9}"
                ratio = f"{am / cm:11.2f}" if cm else f"{'-':>11}"
                print(f"{model:5} {batch:5d} {np:3d} {am:9.0f} {dm:9.0f} {ceiling} {am / dm:10.2f} {ratio}",
                      flush=True)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
