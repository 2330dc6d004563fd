"""A small elastic training loop whose whole state is registered from Python: a module, a torch.optim optimizer
(momentum), a picklable object and an ElasticSampler. Run under aikido-run --elastic; prints the step count and a
digest of the final model as JSON. Deterministic: a job stopped with a checkpoint and resumed ends with the same
model as one that ran through.

argv[1]: steps in all; argv[2] (optional): a file that rank 0 creates once half of the steps are committed; then
every worker waits there until aikido-run stops the job (the test asks for a checkpoint and stops it).
"""
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

import aikido

STEPS = int(sys.argv[1])
MARK = sys.argv[2] if len(sys.argv) > 2 else None


def main():
    torch.set_num_threads(1)
    session = aikido.ElasticSession.from_env()
    peer = session.peer
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data_g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(512, 10, generator=data_g), torch.randint(0, 3, (512,), generator=data_g)
    sampler = aikido.ElasticSampler(512, seed=5)
    progress = types.SimpleNamespace(step=0, epochs_done=0)
    session.register_module("model", model)
    session.register_optimizer("optimizer", opt)
    session.register_object("progress", progress)
    session.register_sampler("data", sampler)
    while progress.step < STEPS:
        if session.sync(progress.step) == aikido.SyncResult.removed:
            return
        indices = sampler.indices(peer.rank, peer.size, 16)
        opt.zero_grad()
        if indices:
            index = torch.tensor(indices)
            F.cross_entropy(model(xs[index]), ys[index], reduction="sum").backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        peer.allreduce(grads, "grads")
        offset = 0
        for p in model.parameters():
            p.grad.copy_(grads[offset:offset + p.numel()].view_as(p) / (16 * peer.size))
            offset += p.numel()
        opt.step()
        if sampler.advance(peer.size, 16):
            progress.epochs_done += 1
        progress.step += 1
        if progress.step % 10 == 0:
            session.commit()
            if MARK and progress.step == STEPS // 2:
                if peer.rank == 0:
                    open(MARK, "w").close()
                while True:  # until aikido-run stops the job (its session's heartbeat thread writes the checkpoint)
                    time.sleep(0.05)
    digest = sum(p.double().sum().item() * (i + 1) for i, p in enumerate(model.parameters()))
    print(json.dumps({"rank": peer.rank, "step": progress.step, "epochs": progress.epochs_done,
                      "epoch": sampler.epoch, "digest": digest}),
          flush=True)


if __name__ == "__main__":
    main()
