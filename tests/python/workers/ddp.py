"""DistributedDataParallel on the "aikido" backend against DDP on Gloo: the same model, data and optimizer on both,
trained side by side in one job; prints the largest parameter difference as JSON.

Started by test_ddp.py under torchrun (its environment, env://). argv[1]: steps; argv[2]: bucket_cap_mb of the aikido
model (small: several buckets, whose allreduces overlap the backward pass).
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import aikido.torch  # noqa: F401  (registers the backend)


def model():
    torch.manual_seed(3)
    # 1.3 MB of parameters: DDP's first bucket takes 1 MiB, so a small bucket_cap_mb gives several buckets.
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 1024),
                         nn.ReLU(), nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10))


def main():
    steps, bucket_mb = int(sys.argv[1]), float(sys.argv[2])
    dist.init_process_group("aikido")
    rank = dist.get_rank()
    gloo = dist.new_group(backend="gloo")
    # Different initial models per rank: DDP broadcasts rank 0's on both.
    a_model, b_model = model(), model()
    if rank != 0:
        for p in list(a_model.parameters()) + list(b_model.parameters()):
            p.data.add_(1.0)
    a = nn.parallel.DistributedDataParallel(a_model, bucket_cap_mb=bucket_mb)
    b = nn.parallel.DistributedDataParallel(b_model, process_group=gloo)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(10 + rank)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    difference = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    moved = max((pa - pi).abs().max().item() for pa, pi in zip(a.parameters(), model().parameters()))
    # The ranks hold equal models.
    flat = torch.cat([p.detach().reshape(-1) for p in a.parameters()])
    others = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(others, flat)
    across = max((o - flat).abs().max().item() for o in others)
    buckets = len(a.reducer._get_zeros_like_grad_buckets())
    print(json.dumps({"rank": rank, "difference": difference, "moved": moved, "across_ranks": across,
                      "buckets": buckets}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
