#!/usr/bin/python3
"""PyTorch DDP (Gloo) training steps under torchrun's elastic agent, for bench/multihost_elastic.py.

Trains the Fashion-MNIST MLP of examples/train_fashion_mnist (784-512-256-10, SGD, batch 64 per worker) on random
data of the same shape (the benchmark measures membership changes, not accuracy) and prints one JSON line per step:
{"event": "step", "rank", "workers", "step", "unix_ms", "restart"} (restart: torchrun's TORCHELASTIC_RESTART_COUNT).
After a change of membership torchrun restarts every worker; each one starts again from step 0, as a DDP program
without checkpoints does. Runs until --seconds have passed since the first start (the file --stop-file appears, or
the process is stopped). The Gloo timeout is --timeout seconds, so that a peer that vanished without closing its
connections fails the step instead of hanging for Gloo's default 30 minutes.
"""
import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--step-ms", type=float, default=20.0, help="extra time per step, like elastic_worker --step-ms")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--stop-file", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    step = 0
    deadline = time.time() + args.seconds
    while time.time() < deadline and not (args.stop_file and os.path.exists(args.stop_file)):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if args.step_ms > 0:
            time.sleep(args.step_ms / 1000.0)
        step += 1
        print(json.dumps({"event": "step", "rank": rank, "workers": size, "step": step,
                          "unix_ms": time.time() * 1000.0, "restart": restart}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
