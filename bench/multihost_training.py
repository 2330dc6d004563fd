#!/usr/bin/python3
"""Training throughput across emulated hosts on shaped links: the Fashion-MNIST example against PyTorch DDP (Gloo).

Emulated hosts (scripts/hosts.sh: one network namespace per host on a bridge), every host's link shaped with tbf to
each --rates value in turn, for each --layouts value (HOSTSxWORKERS). Three runs per model, batch, layout and rate,
side by side, started the same way (one process per worker in its host's namespace, with RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = host 0; the same threads and malloc settings as
bench/compare_training.py):

  aikido    build/bin/train_fashion_mnist (synchronous SGD, Topology from AIKIDO_TOPOLOGY, default auto)
  ddp       bench/ddp_fashion_mnist.py: torch.nn.parallel.DistributedDataParallel, Gloo over the host's eth0
  ceiling   the Aikido run with --skip-communication: every worker trains alone, so this is what the same
            processes reach with free communication

Each reports the global samples/s of its second epoch (the first warms up), both cut to the same number of steps.
Ratios: aikido/ddp (target >= 1.3 at 1 Gbit/s and 100 Mbit/s) and aikido/ceiling. All workers of every emulated host
share this machine's cores, so compute is the same for all three and the links are what differs. Needs root.

  sudo bench/multihost_training.py build [--layouts 2x1,2x2] [--rates 1gbit,100mbit] [--models mlp,cnn]
                                         [--batches 64,256] [--steps 60] [--json FILE]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_training import MALLOC_TUNABLES, last_epoch_throughput  # noqa: E402
from multihost_allreduce import HOSTS, SECRET, host_address, parse_layout  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def worker_env(layout, rank, port, secret_file):
    hosts, workers = layout
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "WORLD_SIZE": str(hosts * workers), "LOCAL_RANK": str(rank % workers),
        "LOCAL_WORLD_SIZE": str(workers), "MASTER_ADDR": host_address(0), "MASTER_PORT": str(port),
        # Every emulated host shares this machine's cores: each worker gets its share of all of them.
        "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // (hosts * workers))),
        "OPENBLAS_NUM_THREADS": "1", "GLIBC_TUNABLES": MALLOC_TUNABLES, "GLOO_SOCKET_IFNAME": "eth0",
        "AIKIDO_SECRET_FILE": secret_file, "AIKIDO_TIMEOUT": "300",
    })
    env.setdefault("AIKIDO_TOPOLOGY", "auto")
    return env


def run_workers(layout, argv, port, secret_file, what, timeout):
    """Starts argv once per worker in its host's namespace; returns rank 0's throughput of the second epoch."""
    hosts, workers = layout
    procs = []
    try:
        for rank in range(hosts * workers):
            procs.append(subprocess.Popen([HOSTS, "exec", f"h{rank // workers}"] + argv,
                                          env=worker_env(layout, rank, port, secret_file), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True))
        deadline = time.monotonic() + timeout
        outputs = [p.communicate(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(rank, p.returncode, err) for rank, (p, (_, err)) in enumerate(zip(procs, outputs)) if p.returncode]
    if failed:
        raise RuntimeError(f"{what} failed: " + "\n".join(f"rank {r} (exit status {c}):\n{e[-1500:]}"
                                                        for r, c, e in failed))
    return last_epoch_throughput(outputs[0][0], what)


def main():
    parser = argparse.ArgumentParser(
        description="Training across emulated hosts on shaped links: the example against DDP (Gloo).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("build_dir", nargs="?", default="./build", help="CMake build directory (default ./build)")
    parser.add_argument("--layouts", default="2x1,2x2", help="HOSTSxWORKERS, comma-separated (default 2x1,2x2)")
    parser.add_argument("--rates", default="1gbit,100mbit", help="link rates (tc units; default 1gbit,100mbit)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--batches", default="64,256", help="batch sizes per worker (default 64,256)")
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch, measured in the second")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; medians are reported")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before one run is killed")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results to FILE")
    args = parser.parse_args()
    try:
        layouts = [parse_layout(text) for text in args.layouts.split(",")]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if os.geteuid() != 0:
        sys.exit("multihost_training.py: emulated hosts need root (network namespaces); run it with sudo")
    example = os.path.join(os.path.abspath(args.build_dir), "bin", "train_fashion_mnist")
    if not os.access(example, os.X_OK):
        sys.exit(f"multihost_training.py: {example} is not built (configure with -DAIKIDO_WITH_TORCH=ON)")
    secret = tempfile.NamedTemporaryFile("w", prefix="aikido-bench-secret.", delete=False)
    secret.write(SECRET + "\n")
    secret.close()
    max_hosts = max(h for h, _ in layouts)
    print(f"# training throughput across emulated hosts, global samples/s of the second epoch (at most {args.steps} "
          "steps), "
          f"medians of {args.repeats}; {os.cpu_count()} CPUs shared by every host; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'layout':6} {'rate':>7} {'model':5} {'batch':>5} {'aikido':>8} {'ddp':>8} {'ceiling':>8} "
          f"{'aikido/ddp':>10} {'aikido/ceil':>11}", flush=True)
    rows, port = [], 29700
    subprocess.run([HOSTS, "up", str(max_hosts), "--owner", str(os.getpid())], check=True)
    try:
        for rate in args.rates.split(","):
            for h in range(max_hosts):
                subprocess.run([HOSTS, "shape", f"h{h}", rate], check=True)
            for layout in layouts:
                for model in args.models.split(","):
                    for batch in [int(b) for b in args.batches.split(",")]:
                        # At most the full global batches of an epoch: a measured epoch that ran out of data would
                        # end early, and a DDP worker left without samples would skip its gradient allreduce.
                        steps = min(args.steps, 60000 // (layout[0] * layout[1] * batch))
                        common = ["--model", model, "--batch-size", str(batch), "--epochs", "2", "--max-steps",
                                  str(steps)]
                        runs = {
                            "aikido": [example] + common + ["--monitor", "off"],
                            "ddp": ["/usr/bin/python3", os.path.join(HERE, "ddp_fashion_mnist.py")] + common,
                            "ceiling": [example] + common + ["--monitor", "off", "--skip-communication"],
                        }
                        measured = {k: [] for k in runs}
                        for _ in range(args.repeats):
                            for key, argv in runs.items():
                                for attempt in range(3):
                                    port += 1
                                    try:
                                        measured[key].append(
                                            run_workers(layout, argv, port, secret.name, key, args.timeout))
                                        break
                                    except RuntimeError as e:
                                        # Gloo's TCP pairs now and then fail to connect on this loaded machine
                                        # ("Connection reset by peer"): the reference is tried again.
                                        if attempt == 2 or "Connection reset by peer" not in str(e):
                                            raise
                                        print(f"# {key}: connection reset, trying again", flush=True)
                        a, d, c = (statistics.median(measured[k]) for k in ("aikido", "ddp", "ceiling"))
                        lname = f"{layout[0]}x{layout[1]}"
                        rows.append({"layout": lname, "rate": rate, "model": model, "batch": batch, "aikido": a,
                                     "ddp": d, "ceiling": c, "aikido/ddp": a / d, "aikido/ceiling": a / c})
                        print(f"{lname:6} {rate:>7} {model:5} {batch:5d} {a:8.0f} {d:8.0f} {c:8.0f} {a / d:10.2f} "
                              f"{a / c:11.2f}", flush=True)
    finally:
        for h in range(max_hosts):
            subprocess.run([HOSTS, "unshape", f"h{h}"], check=False)
        subprocess.run([HOSTS, "down", "--owner", str(os.getpid())], check=False)
        os.unlink(secret.name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
