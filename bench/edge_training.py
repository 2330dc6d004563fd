#!/usr/bin/python3
"""Edge training on shaped links: synchronous SGD (plain and compressed) against the round strategies, in one run.

    sudo python3 bench/edge_training.py BUILD_DIR [--rates 100mbit,10mbit] [--models mlp,cnn] [--target 0.85]
                 [--configs ssgd,ssgd+fp16,...] [--budget SECONDS] [--steps-per-line N] [--local-steps K]
                 [--monitor off|on] [--privacy] [--secure]

Four emulated hosts (scripts/hosts.sh: network namespaces on a bridge), one worker each, every host's link shaped
with tbf to the rate (both ways). The job is a static one across hosts (aikido-run --nnodes 4 --node-rank I, node 0
serving the tcp:// store). Each configuration trains the Fashion-MNIST example (batch 64 per worker, lr 0.05,
momentum 0.9; --monitor off by default: the link probes of monitoring, 1 MiB to every peer every 5 s, would take
about half of a 10 Mbit/s link) until the test accuracy reaches --target, scored every --steps-per-line steps (the
example's --max-steps: each "epoch" line covers that many steps), or until --budget seconds of training passed.
Reported per configuration: time to the target (training time only, tests excluded; ">B" when the budget ran out
first), bytes sent per worker up to then, bytes per step, the last accuracy, and the ratios against plain ssgd at
the same rate and model: bytes_vs_ssgd (ssgd's bytes per step / this one's) and time_vs_ssgd (ssgd's time to the
target / this one's; a lower bound when ssgd did not reach it).

--privacy adds, at the first rate and model, DP-SGD (clip 1) with the noise multiplier that spends epsilon = 8 at
delta = 1e-5 over a fixed number of steps (from aikido.RdpAccountant, with the sampling rate 256 / 60000 the
example accounts), against the same steps without DP. --secure adds FedAvg with and without --secure-aggregation
for a fixed number of rounds at the first rate and model: the overhead per round.

Needs root (network namespaces). Standard library, plus the build's Python package for --privacy.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = os.path.join(ROOT, "scripts", "hosts.sh")
WORKERS = 4
BATCH = 64
STORE_PORT = 29477

CONFIGS = {
    "ssgd": ["--strategy", "ssgd"],
    "ssgd+fp16": ["--strategy", "ssgd", "--compression", "fp16"],
    "ssgd+topk": ["--strategy", "ssgd", "--compression", "topk:0.01"],
    "ssgd+powersgd": ["--strategy", "ssgd", "--compression", "powersgd:4"],
    "local_sgd": ["--strategy", "local_sgd"],
    "fedavg": ["--strategy", "fedavg"],
    "diloco": ["--strategy", "diloco"],
}


def hosts(*args):
    subprocess.run([HOSTS, *args], check=True, stdout=subprocess.DEVNULL)


def run_job(build, secret, example_args, budget):
    """Runs the example on the 4 hosts; returns rank 0's JSON lines. The job is stopped once its lines add up to
    `budget` seconds of training."""
    store = "tcp://198.18.0.10:%d" % STORE_PORT
    procs = []
    for h in range(WORKERS):
        argv = [HOSTS, "exec", "h%d" % h, os.path.join(build, "bin", "aikido-run"), "--nnodes", str(WORKERS),
                "--nproc-per-node", "1", "--node-rank", str(h), "--store", store, "--secret-file", secret,
                os.path.join(build, "bin", "train_fashion_mnist"), *example_args]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE if h == 0 else subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, text=True, start_new_session=True))
    lines, seconds = [], 0.0
    for line in procs[0].stdout:
        if "{" in line and line.startswith("[0]"):
            lines.append(json.loads(line[line.index("{"):]))
            seconds += lines[-1]["seconds"]
            if seconds >= budget:
                break
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 15)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
    if not lines:
        raise RuntimeError("no epoch line from: " + " ".join(example_args))
    # The launchers' store port is free again once they are gone.
    time.sleep(1)
    return lines


def summarize(lines, target, budget):
    seconds = sent = steps = 0
    accuracy = 0.0
    reached = False
    for j in lines:
        if seconds >= budget:
            break
        seconds += j["seconds"]
        sent += j["bytes_sent"]
        steps = j["steps"]
        accuracy = j["test_accuracy"]
        if accuracy >= target:
            reached = True
            break
    return {"seconds": seconds, "reached": reached, "bytes": sent, "steps": steps, "accuracy": accuracy,
            "bytes_per_step": sent / steps if steps else math.nan,
            "epsilon": lines[-1].get("epsilon") if lines else None}


def example(model, config, args, extra=()):
    return ["--model", model, "--batch-size", str(BATCH), "--lr", "0.05", "--momentum", "0.9", "--seed", "1",
            "--threads", "1", "--local-steps", str(args.local_steps), "--monitor", args.monitor,
            *CONFIGS.get(config, []), *extra]


def noise_for_epsilon(build, epsilon, delta, rate, steps):
    sys.path.insert(0, os.path.join(build, "python"))
    import aikido  # noqa: E402  (the build's package)

    def eps(sigma):
        a = aikido.RdpAccountant()
        a.step(rate, sigma, steps)
        return a.epsilon(delta)

    lo, hi = 0.3, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > epsilon else (lo, mid)
    return hi


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build")
    p.add_argument("--rates", default="100mbit,10mbit")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--budget", type=float, default=600, help="training seconds per run")
    p.add_argument("--steps-per-line", type=int, default=40)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--monitor", choices=["on", "off"], default="off",
                   help="the example's monitoring; on, its link probes (1 MiB per peer every 5 s) share the links")
    p.add_argument("--privacy", action="store_true")
    p.add_argument("--privacy-steps", type=int, default=1200)
    p.add_argument("--secure", action="store_true")
    p.add_argument("--secure-rounds", type=int, default=20)
    args = p.parse_args()
    build = os.path.abspath(args.build)
    rates, models = args.rates.split(","), args.models.split(",")
    configs = [c for c in args.configs.split(",") if c]  # empty: only --privacy and --secure
    for c in configs:
        if c not in CONFIGS:
            p.error("unknown configuration %s: use %s" % (c, ", ".join(CONFIGS)))
    secret = "/tmp/aikido-edge-bench-%d.secret" % os.getpid()
    with open(secret, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    os.chmod(secret, 0o600)
    hosts("up", str(WORKERS), "--owner", str(os.getpid()))
    results = []
    try:
        for rate in rates:
            for h in range(WORKERS):
                hosts("shape", str(h), rate)
            for model in models:
                base = None
                for config in configs:
                    epochs = 10000
                    lines = run_job(build, secret, example(model, config, args, [
                        "--epochs", str(epochs), "--max-steps", str(args.steps_per_line),
                        "--target-accuracy", str(args.target)]), args.budget)
                    r = summarize(lines, args.target, args.budget)
                    r.update(rate=rate, model=model, config=config)
                    if config == "ssgd":
                        base = r
                    if base:
                        r["bytes_vs_ssgd"] = base["bytes_per_step"] / r["bytes_per_step"]
                        r["time_vs_ssgd"] = base["seconds"] / r["seconds"] if r["reached"] else math.nan
                        r["time_vs_ssgd_lower_bound"] = r["reached"] and not base["reached"]
                    results.append(r)
                    print(json.dumps(r), flush=True)
        rate, model = rates[0], models[0]
        for h in range(WORKERS):
            hosts("shape", str(h), rate)
        if args.privacy:
            steps = args.privacy_steps
            sigma = noise_for_epsilon(build, 8.0, 1e-5, WORKERS * BATCH / 60000, steps)
            line_steps = args.steps_per_line
            common = ["--epochs", str(steps // line_steps), "--max-steps", str(line_steps)]
            for name, extra in (("ssgd", []), ("ssgd+dp", ["--dp-clip", "1", "--dp-noise", "%.4f" % sigma,
                                                          "--dp-delta", "1e-5"])):
                lines = run_job(build, secret, example(model, "ssgd", args, common + extra), 1e9)
                r = {"rate": rate, "model": model, "config": name, "steps": lines[-1]["steps"],
                     "accuracy": lines[-1]["test_accuracy"], "epsilon": lines[-1]["epsilon"],
                     "noise_multiplier": sigma if extra else 0}
                results.append(r)
                print(json.dumps(r), flush=True)
        if args.secure:
            steps = args.secure_rounds * args.local_steps
            per_round = {}
            for name, extra in (("fedavg", []), ("fedavg+secure", ["--secure-aggregation"])):
                lines = run_job(build, secret, example(model, "fedavg", args,
                                                       ["--epochs", "1", "--max-steps", str(steps)] + extra), 1e9)
                per_round[name] = sum(j["seconds"] for j in lines) / args.secure_rounds
                r = {"rate": rate, "model": model, "config": name, "seconds_per_round": per_round[name],
                     "bytes_sent": sum(j["bytes_sent"] for j in lines), "accuracy": lines[-1]["test_accuracy"]}
                results.append(r)
                print(json.dumps(r), flush=True)
            print(json.dumps({"secure_aggregation_overhead_per_round_seconds":
                              per_round["fedavg+secure"] - per_round["fedavg"],
                              "ratio": per_round["fedavg+secure"] / per_round["fedavg"]}), flush=True)
    finally:
        subprocess.run([HOSTS, "down", "--owner", str(os.getpid())], check=False)
        os.unlink(secret)

    print("\n%-8s %-4s %-14s %10s %8s %12s %10s %9s %9s" % ("rate", "mdl", "config", "time_s", "acc", "MB/worker",
                                                           "KB/step", "bytes_x", "time_x"))
    for r in results:
        if "bytes_per_step" not in r:
            continue
        t = ("%.1f" % r["seconds"]) if r["reached"] else (">%.0f" % r["seconds"])
        tx = r.get("time_vs_ssgd", math.nan)
        tx = ("%.2f" % tx) + ("+" if r.get("time_vs_ssgd_lower_bound") else "") if not math.isnan(tx) else "-"
        print("%-8s %-4s %-14s %10s %8.3f %12.1f %10.1f %9.2f %9s" % (
            r["rate"], r["model"], r["config"], t, r["accuracy"], r["bytes"] / 1e6, r["bytes_per_step"] / 1e3,
            r.get("bytes_vs_ssgd", math.nan), tx))


if __name__ == "__main__":
    main()
