#!/usr/bin/python3
"""Cost of aikido-run --timeline: the Fashion-MNIST example's step time with the timeline on against off, in one run.

    python3 bench/timeline_overhead.py BUILD_DIR [--repeats R] [--workers N] [--models mlp,cnn] [--batches 64,256]

Both settings alternate, R times each, under aikido-run with synchronous SGD; each run trains 2 epochs of at most S
steps and measures the second. With the timeline on, every collective, every step phase and every policy decision is
recorded (a formatted line in a buffer, written every 64 KiB) and merged by aikido-run at the end. The table shows
median step times and
  on/off   step time with the timeline / without (target: <= 1.02)
Standard library only.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile


def run(build, model, batch, np, steps, timeline):
    cmd = [f"{build}/bin/aikido-run", "-np", str(np)]
    if timeline:
        cmd += ["--timeline", timeline]
    cmd += [f"{build}/bin/train_fashion_mnist", "--model", model, "--batch-size", str(batch), "--epochs", "2",
            "--max-steps", str(steps), "--output", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    if timeline:
        with open(timeline) as f:
            events = len(json.load(f)["traceEvents"])
        if events < 4 * steps:
            raise RuntimeError(f"the timeline has {events} events for {2 * steps} steps")
    for line in r.stdout.splitlines():
        if "{" not in line:
            continue
        j = json.loads(line[line.index("{"):])
        if j["epoch"] == 1 and j["rank"] == 0:
            return 1e3 * j["seconds"] / steps
    raise RuntimeError(f"no measured epoch:\n{r.stdout}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--samples", type=int, default=28672,
                   help="samples per worker in the measured epoch (at most the 30000 of an epoch)")
    args = p.parse_args()
    trace = os.path.join(tempfile.mkdtemp(prefix="aikido-timeline-bench-"), "trace.json")
    print(f"# step time (ms) with and without --timeline, {args.workers} workers, medians of {args.repeats}",
          flush=True)
    print(f"{'model':5} {'batch':>5} {'off ms':>8} {'on ms':>8} {'on/off':>7}", flush=True)
    rows = []
    for model in args.models.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            steps = max(8, args.samples // batch)
            on, off = [], []
            for _ in range(args.repeats):
                off.append(run(args.build, model, batch, args.workers, steps, None))
                on.append(run(args.build, model, batch, args.workers, steps, trace))
            a, b = statistics.median(off), statistics.median(on)
            rows.append({"model": model, "batch": batch, "off_ms": a, "on_ms": b, "on/off": b / a})
            print(f"{model:5} {batch:5d} {a:8.3f} {b:8.3f} {b / a:7.3f}", flush=True)
    os.remove(trace)
    os.rmdir(os.path.dirname(trace))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
