#!/usr/bin/python3
"""Training from Python, side by side: PyTorch DDP on the backend "aikido" against DDP on Gloo, and the Python
aikido.torch.DistributedOptimizer (examples/train_fashion_mnist.py) against the C++ example (build/bin/
train_fashion_mnist), on Fashion-MNIST.

    python3 bench/compare_python.py BUILD_DIR [--quick] [--repeats R] [--samples N] [--models mlp,cnn]
                                              [--batches 64,256] [--workers 2,4]

For each model, per-worker batch size and number of workers, in one go, every run under aikido-run (so all four get
the same threads per worker, CPU binding and malloc settings):
  ddp-aikido  torch.nn.parallel.DistributedDataParallel, init_process_group("aikido")   (this script, --worker)
  ddp-gloo    the same program with init_process_group("gloo")
  py          examples/train_fashion_mnist.py --strategy ssgd  (Python, aikido.torch.DistributedOptimizer)
  cpp         BUILD_DIR/bin/train_fashion_mnist --strategy ssgd (C++, aikido::torch::DistributedOptimizer)
Each run trains 2 epochs of at most S steps (the same S for all four) and the second epoch is measured; throughput =
samples of all workers / time of the slowest. Medians of R runs, and the ratios
  aikido/gloo  DDP on aikido / DDP on Gloo          (target >= 1.3)
  py/cpp       Python optimizer / C++ example       (target >= 0.9: within 10%)
Needs PYTHONPATH to reach the aikido package (BUILD_DIR/python is added when it is not).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def last_epoch_throughput(output, what):
    lines = []
    for line in output.splitlines():
        if "{" in line:
            try:
                lines.append(json.loads(line[line.index("{"):]))
            except ValueError:
                pass
    lines = [l for l in lines if l.get("epoch") == 1 and l.get("rank") == 0]
    if not lines:
        raise RuntimeError(f"{what}: no measured epoch in its output:\n{output}")
    return lines[0]["global_samples_per_second"]


def run(build, np, program, env, what):
    cmd = [f"{build}/bin/aikido-run", "-np", str(np)] + program
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{what}: {' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return last_epoch_throughput(r.stdout, what)


# ---------------------------------------------------------------------------------------------------------------
# The DDP worker (--worker): the example's model, optimizer and data order, on DistributedDataParallel.

def ddp_worker(args):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import aikido.torch  # noqa: F401  (the backend, and torch's env:// variables under aikido-run)

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from fashion_mnist import load_split, make_model

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    dist.init_process_group(args.backend)
    rank, size = dist.get_rank(), dist.get_world_size()
    train_x, train_y = load_split(args.data, "train")
    torch.manual_seed(args.seed)
    net = torch.nn.parallel.DistributedDataParallel(make_model(args.model))
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    n, b = train_x.shape[0], args.batch_size
    for epoch in range(args.epochs):
        # The scheme of aikido::torch::DistributedSampler: one order per epoch, contiguous blocks of each global batch.
        g = torch.Generator()
        g.manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)
        steps = samples = 0
        start = time.perf_counter()
        for pos in range(0, n, b * size):
            if args.max_steps and steps == args.max_steps:
                break
            index = order[pos + rank * b: pos + (rank + 1) * b]
            steps += 1
            if len(index) == 0:
                continue
            opt.zero_grad()
            F.cross_entropy(net(train_x[index]), train_y[index]).backward()
            opt.step()
            samples += len(index)
        seconds = time.perf_counter() - start
        totals = torch.tensor([float(samples), seconds], dtype=torch.float64)
        slowest = totals[1:].clone()
        dist.all_reduce(totals[:1])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        print(json.dumps({"epoch": epoch, "rank": rank, "workers": size, "samples": samples,
                          "global_samples": int(totals[0]), "seconds": seconds,
                          "global_samples_per_second": float(totals[0] / slowest[0]), "batch_size": b,
                          "strategy": f"ddp-{args.backend}", "model": args.model}), flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build", nargs="?")
    p.add_argument("--quick", action="store_true", help="one repeat, fewer steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=0,
                   help="samples per worker in the measured epoch (default 16384, --quick 4096)")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--workers", default="2,4")
    # The worker's own flags (--worker).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="aikido", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=0.05, help=argparse.SUPPRESS)
    p.add_argument("--momentum", type=float, default=0.9, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return ddp_worker(args)
    if not args.build or not os.path.exists(f"{args.build}/bin/train_fashion_mnist"):
        sys.exit("usage: compare_python.py BUILD_DIR: BUILD_DIR/bin/train_fashion_mnist not found (build with LibTorch)")
    build = os.path.abspath(args.build)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [f"{build}/python", env.get("PYTHONPATH")]))
    repeats = 1 if args.quick else args.repeats
    samples = args.samples or (4096 if args.quick else 16384)
    python = "/usr/bin/python3"
    print(f"# training throughput, samples/s of all workers; medians of {repeats}; "
          f"{len(os.sched_getaffinity(0))} cores; at most {samples} samples per worker measured", flush=True)
    print(f"{'model':5} {'batch':>5} {'np':>3} {'ddp-aikido':>10} {'ddp-gloo':>9} {'aikido/gloo':>11} {'py':>9} "
          f"{'cpp':>9} {'py/cpp':>7}", flush=True)
    rows = []
    for model in args.models.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            for np in [int(n) for n in args.workers.split(",")]:
                steps = max(8, min(samples, 60000 // np) // batch)
                common = ["--model", model, "--batch-size", str(batch), "--epochs", "2", "--max-steps", str(steps)]
                runs = {
                    "ddp-aikido": [python, __file__, "--worker", "--backend", "aikido"] + common,
                    "ddp-gloo": [python, __file__, "--worker", "--backend", "gloo"] + common,
                    "py": [python, f"{ROOT}/examples/train_fashion_mnist.py", "--strategy", "ssgd"] + common,
                    "cpp": [f"{build}/bin/train_fashion_mnist", "--strategy", "ssgd"] + common,
                }
                measured = {name: [] for name in runs}
                for _ in range(repeats):
                    for name, program in runs.items():  # interleaved: a slow minute hits every variant alike
                        measured[name].append(run(build, np, program, env, f"{name} {model} {batch} {np}"))
                m = {name: statistics.median(v) for name, v in measured.items()}
                row = {"model": model, "batch": batch, "np": np, **m,
                       "aikido/gloo": m["ddp-aikido"] / m["ddp-gloo"], "py/cpp": m["py"] / m["cpp"]}
                rows.append(row)
                print(f"{model:5} {batch:5d} {np:3d} {m['ddp-aikido']:10.0f} {m['ddp-gloo']:9.0f} "
                      f"{row['aikido/gloo']:11.2f} {m['py']:9.0f} {m['cpp']:9.0f} {row['py/cpp']:7.2f}", flush=True)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
