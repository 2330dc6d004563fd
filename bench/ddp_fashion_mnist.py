#!/usr/bin/python3
"""PyTorch DistributedDataParallel (Gloo) reference for examples/train_fashion_mnist.

Trains the same models (mlp: 784-512-256-10, cnn: two 5x5 conv layers) with the same optimizer, per-worker batch
size and data order scheme, and prints the same JSON line per epoch (the keys compare_training.py reads). One
process per worker, started by compare_training.py with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; run alone,
it trains as one worker. Run it with Debian's /usr/bin/python3, which sees python3-torch.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from fashion_mnist import load_split, make_model  # noqa: E402  (the example's models and data, without Aikido)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args()

    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    rank = int(os.environ.get("RANK", "0"))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = size > 1
    if distributed:
        dist.init_process_group("gloo", rank=rank, world_size=size)

    train_x, train_y = load_split(args.data, "train")
    torch.manual_seed(args.seed)
    model = make_model(args.model)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model  # DDP broadcasts rank 0's model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    n = train_x.shape[0]
    for epoch in range(args.epochs):
        # The same scheme as aikido::torch::DistributedSampler: one order per epoch, contiguous blocks of each
        # global batch per rank (the order itself comes from torch's generator; only the work per step matters here).
        g = torch.Generator()
        g.manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)
        b = args.batch_size
        steps = 0
        samples = 0
        start = time.perf_counter()
        for pos in range(0, n, b * size):
            if args.max_steps and steps == args.max_steps:
                break
            index = order[pos + rank * b: pos + (rank + 1) * b]
            steps += 1
            if len(index) == 0:
                continue
            opt.zero_grad()
            loss = F.cross_entropy(net(train_x[index]), train_y[index])
            loss.backward()
            opt.step()
            samples += len(index)
        seconds = time.perf_counter() - start
        totals = torch.tensor([float(samples), seconds], dtype=torch.float64)
        if distributed:
            slowest = totals[1:].clone()
            dist.all_reduce(totals[:1])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            totals[1] = slowest[0]
        print(json.dumps({"epoch": epoch, "rank": rank, "workers": size, "samples": samples,
                          "global_samples": int(totals[0]), "seconds": seconds,
                          "global_samples_per_second": float(totals[0] / totals[1]),
                          "batch_size": b, "strategy": "ddp", "model": args.model}), flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
