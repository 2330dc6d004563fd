#!/usr/bin/python3
"""Time to a test accuracy: the adaptive-batch policy against fixed per-worker batch sizes, in one run.

    python3 bench/time_to_accuracy.py BUILD_DIR [--model mlp|cnn] [--target A] [--seeds 1,2,3]
                                                [--batches 32,64,256,1024] [--lrs 0.02,0.05,0.1,0.2]
                                                [--scales 1,2,4] [--start B] [--eval-every N]

Two workers (aikido-run -np 2) train the Fashion-MNIST example with synchronous SGD until the test accuracy reaches the
target (default 0.87 for the MLP, 0.90 for the CNN) or --max-epochs pass. The test set is scored every --eval-every
samples of all workers (default 6000, a tenth of an epoch; 0: at the end of each epoch only). Time to accuracy is the
training time up to the first test at or above the target, tests excluded.
  1. Sweep: for each fixed batch size, every learning rate with the first seed; the best (shortest time; runs that
     never reach the target count as infinite) is kept. Likewise adaptive-batch, which starts from --start (default: the
     smallest batch) and grows toward `scale` times the measured noise scale: its two knobs, the starting learning
     rate (every one of --lrs) and the scale (every one of --scales), are swept together with the first seed and the
     best pair kept.
  2. Measure: each fixed batch size at its best learning rate, and adaptive-batch at its best learning rate and
     scale, over all seeds (seed-major: all settings with one seed, then the next); medians.
  adaptive/best   adaptive's median time / the best fixed setting's median time (target: <= 0.7)
Standard library only.
"""
import argparse
import json
import math
import statistics
import subprocess


def run(build, model, batch, lr, seed, target, max_epochs, eval_every, policy=None):
    cmd = [f"{build}/bin/aikido-run", "-np", "2", f"{build}/bin/train_fashion_mnist", "--model", model,
           "--batch-size", str(batch), "--lr", str(lr), "--seed", str(seed), "--epochs", str(max_epochs),
           "--target-accuracy", str(target), "--eval-every", str(eval_every)]
    if policy:
        cmd += ["--policy", policy]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    elapsed, epochs = 0.0, []
    for line in r.stdout.splitlines():
        if "{" not in line:
            continue
        j = json.loads(line[line.index("{"):])
        if j["rank"] != 0:
            continue
        elapsed += j["seconds"]
        epochs.append(j)
        if j["test_accuracy"] >= target:
            return elapsed, epochs
    return math.inf, epochs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--target", type=float, default=0)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--batches", default="32,64,256,1024")
    p.add_argument("--lrs", default="0.02,0.05,0.1,0.2")
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--scales", default="1,2,4", help="adaptive-batch scales swept (default %(default)s)")
    p.add_argument("--policy", default="adaptive-batch:max=1024,rule=sqrt",
                   help="the adaptive policy's spec, without scale (default %(default)s)")
    p.add_argument("--start", type=int, default=0,
                   help="adaptive-batch's first per-worker batch, one of --batches (default: the smallest)")
    p.add_argument("--eval-every", type=int, default=6000,
                   help="score the test set every this many samples (default %(default)s; 0: once per epoch)")
    args = p.parse_args()
    target = args.target or (0.87 if args.model == "mlp" else 0.90)
    seeds = [int(s) for s in args.seeds.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    start = args.start or min(batches)
    if start not in batches:  # checked before any run
        p.error(f"--start {start} is not one of --batches {args.batches}")
    if args.eval_every < 0:
        p.error("--eval-every must be 0 or more")

    def go(batch, lr, seed, policy=None):
        return run(args.build, args.model, batch, lr, seed, target, args.max_epochs, args.eval_every, policy)

    print(f"# time to test accuracy {target} ({args.model}, 2 workers, seeds {seeds}, at most {args.max_epochs} "
          f"epochs, tested " + (f"every {args.eval_every} samples)" if args.eval_every else "after each epoch)"), flush=True)

    best_lr = {}
    for b in batches:
        times = {lr: go(b, lr, seeds[0])[0] for lr in lrs}
        best_lr[b] = min(times, key=lambda lr: times[lr])
        print(f"sweep batch {b:5d}: " + ", ".join(f"lr {lr}: {t:.1f} s" for lr, t in times.items()) +
              f" -> lr {best_lr[b]}", flush=True)

    scales = [float(x) for x in args.scales.split(",")]
    policy = {sc: f"{args.policy},scale={sc:g}" for sc in scales}
    times = {}
    for lr in lrs:
        for sc in scales:
            times[(lr, sc)] = go(start, lr, seeds[0], policy[sc])[0]
        print(f"sweep adaptive from {start}, lr {lr}: " +
              ", ".join(f"scale {sc:g}: {times[(lr, sc)]:.1f} s" for sc in scales), flush=True)
    adaptive_lr, best_scale = min(times, key=lambda k: times[k])
    print(f"  -> adaptive lr {adaptive_lr}, scale {best_scale:g}", flush=True)

    # Seed-major order: every setting runs once per seed before the next seed, so that a slow spell of the machine
    # falls on all settings alike rather than on whichever setting happens to run then.
    settings = [(f"fixed {b}", b, best_lr[b], None) for b in batches]
    settings.append((f"adaptive from {start} scale {best_scale:g}", start, adaptive_lr, policy[best_scale]))
    runs = {name: [] for name, *_ in settings}
    for s in seeds:
        for name, b, lr, pol in settings:
            runs[name].append(go(b, lr, s, pol))
    print(f"{'setting':>28} {'lr':>6} {'median s':>9} {'runs (s)':>30}", flush=True)
    results = {}
    for name, b, lr, pol in settings:
        t = [x[0] for x in runs[name]]
        key = "adaptive" if pol else name
        results[key] = statistics.median(t)
        extra = ""
        if pol:
            extra = f"  final per-worker batch {[x[1][-1]['batch_size'] if x[1] else None for x in runs[name]]}"
        print(f"{name:>28} {lr:6} {results[key]:9.2f} {', '.join(f'{x:.1f}' for x in t):>30}{extra}", flush=True)
    best_fixed = min(v for k, v in results.items() if k != "adaptive")
    ratio = results["adaptive"] / best_fixed if best_fixed not in (0, math.inf) else math.nan
    print(f"adaptive/best fixed: {ratio:.2f} (target <= 0.7)", flush=True)
    print(json.dumps({"target": target, "results": results, "best_lr": best_lr, "adaptive_lr": adaptive_lr,
                      "best_scale": best_scale,
                      "adaptive/best": ratio}))


if __name__ == "__main__":
    main()
