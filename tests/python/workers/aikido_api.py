"""Aikido's own API from Python, under aikido-run: the Peer on tensors and numpy arrays, DistributedOptimizer with
every strategy, samplers with DataLoader, policies written in Python. Every check raises on a difference (exit 1);
prints "ok CHECKS" and one JSON line with this worker's sampled indices at the end.
"""
import copy
import json
import pickle

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import aikido
import aikido.torch
import checks
from checks import check, raises

peer = aikido.default_peer()
rank, size = peer.rank, peer.size


def same_everywhere(tensor, name):
    """True when every rank holds the same values."""
    all_ = peer.allgather(tensor.detach().reshape(-1).double().contiguous(), name)
    return bool((all_ == all_[0]).all())


def peer_api():
    a = np.arange(4, dtype=np.float32) + rank
    check(peer.allreduce(a, "np/sum") is a, "in place returns the array")
    check(np.array_equal(a, sum(np.arange(4, dtype=np.float32) + r for r in range(size))), f"numpy allreduce {a}")
    out = np.zeros(4, np.float32)
    peer.allreduce(np.full(4, rank, np.float32), "np/max", op=aikido.ReduceOp.max, out=out)
    check((out == size - 1).all(), "numpy allreduce max out of place")
    raises(TypeError, lambda: peer.allreduce(np.zeros(4), "np/bad", out=np.zeros(4, np.float32)), "float32")
    raises(TypeError, lambda: peer.allreduce([1, 2], "np/list"), "numpy.ndarray")
    raises(ValueError, lambda: peer.allreduce(torch.zeros(4, 4).t(), "np/strided"), "contiguous")
    work = peer.allgather_async(torch.tensor([rank, 10 * rank]), "gather/all")
    check(torch.equal(work.result(), torch.tensor([[r, 10 * r] for r in range(size)])), "allgather_async result")
    check(work.done(), "done after result()")
    g = peer.gather(torch.tensor([float(rank)]), 1, "gather/one")
    check(g is None if rank != 1 else torch.equal(g, torch.arange(float(size)).view(size, 1)), f"gather {g}")
    rs = peer.reduce_scatter(torch.arange(2.0 * size), "rs", op="sum")
    check(torch.equal(rs, size * torch.arange(2.0 * rank, 2.0 * rank + 2)), f"reduce_scatter {rs}")
    b = torch.full((3,), float(rank), dtype=torch.bfloat16)
    peer.broadcast(b, 1, "bcast")
    check(torch.equal(b, torch.ones(3, dtype=torch.bfloat16)), "bfloat16 broadcast")
    check(peer.consensus(b"same", "agree"), "consensus on equal bytes")
    check(not peer.consensus(f"rank {rank}", "disagree"), "consensus on different strings")
    peer.barrier()
    peer.save("model", torch.full((5,), float(rank + 1)))
    peer.barrier("saved")
    got = peer.request((rank + 1) % size, "model", torch.zeros(5))
    check(torch.equal(got, torch.full((5,), float((rank + 1) % size + 1))), "save/request")
    raises(aikido.MismatchError, lambda: peer.allreduce(torch.zeros(3 + rank), "sizes differ"), "differently")
    peer.set_topology("tree")
    check(peer.topology == aikido.Topology.tree, "set_topology")
    check(torch.equal(peer.allreduce(torch.ones(9), "on the tree"), torch.full((9,), float(size))), "tree allreduce")
    raises(aikido.MismatchError, lambda: peer.set_topology("star" if rank == 0 else "ring"), "topolog")
    peer.set_topology(aikido.Topology.ring)
    check(issubclass(aikido.MismatchError, RuntimeError) and issubclass(aikido.TimeoutError, aikido.Error), "errors")


def model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def batch(step, r, n=8):
    g = torch.Generator().manual_seed(100 * step + r)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def optimizer_matches_one_process():
    """Synchronous SGD on `size` workers equals one process training on all workers' batches together."""
    net = model()
    if rank == 1:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1)  # broadcast_parameters must undo this
    aikido.torch.broadcast_parameters(net.named_parameters())
    reference = model()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = aikido.torch.DistributedOptimizer(sgd, net.named_parameters(), "ssgd", bucket_bytes=256)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    check(opt.bucket_bytes == 256, f"bucket_bytes {opt.bucket_bytes}")
    for step in range(12):
        if step == 6:
            opt.set_bucket_bytes(0)  # sized for the links: 1 MiB on one host, the whole model in one bucket
            check(opt.bucket_bytes == 1 << 20, f"bucket_bytes after set_bucket_bytes(0): {opt.bucket_bytes}")
        x, y = batch(step, rank)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step(len(y))
        xs, ys = zip(*(batch(step, r) for r in range(size)))
        ref_opt.zero_grad()
        F.cross_entropy(reference(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()
    worst = max((a - b).abs().max().item() for a, b in zip(net.parameters(), reference.parameters()))
    check(worst < 1e-5, f"synchronous SGD differs from one process by {worst}")
    m = opt.metrics
    check(m.step == 12 and m.workers == size and m.strategy == "synchronous_sgd", f"metrics {m.step} {m.strategy}")
    check(aikido.TrainingMetrics.known(m.gradient_variance) and m.samples_per_second > 0,
          f"gradient statistics measured: variance {m.gradient_variance}, {m.samples_per_second} samples/s")
    check(same_everywhere(torch.tensor([m.gradient_variance, m.lr, m.global_batch_size]), "metrics/equal"),
          "metrics equal on every worker")

    # The other strategies, switched at a step boundary; the models stay together where the strategy says so.
    for strategy, equal in (("sma", True), ("pair", False), (aikido.Strategy.synchronous_sgd, True)):
        opt.set_strategy(strategy)
        check(same_everywhere(torch.cat([p.reshape(-1) for p in net.parameters()]), f"switch/{strategy}"),
              f"set_strategy({strategy}) leaves equal models")
        for step in range(5):
            x, y = batch(50 + step, rank)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        if equal:
            check(same_everywhere(torch.cat([p.reshape(-1) for p in net.parameters()]), f"after/{strategy}"),
                  f"{strategy} keeps equal models")
    raises(aikido.MismatchError, lambda: opt.set_strategy("sma" if rank == 0 else "pair"), "different strategies")
    return net, opt


def optimizer_state_broadcast():
    net = model()
    adam = torch.optim.Adam(net.parameters(), lr=0.01 * (rank + 1))
    x, y = batch(7, rank)
    F.cross_entropy(net(x), y).backward()
    adam.step()
    aikido.torch.broadcast_optimizer_state(adam, root=0)
    check(adam.param_groups[0]["lr"] == 0.01, "broadcast_optimizer_state: options")
    moments = torch.cat([adam.state[p]["exp_avg"].reshape(-1) for p in net.parameters()])
    check(same_everywhere(moments, "adam/moments"), "broadcast_optimizer_state: moments")


class HalveAtStep(aikido.Policy):
    """Decides from the metrics only: every worker halves the learning rate at the same step."""

    def __init__(self, step=3):
        self.step, self.seen = int(step), 0

    def after_step(self, context):
        self.seen += 1
        if context.metrics.step == self.step:
            context.set_lr(context.metrics.lr / 2)

    def save_state(self):
        return pickle.dumps(self.seen)

    def load_state(self, state):
        self.seen = pickle.loads(state)


class ByRank(aikido.Policy):
    def after_step(self, context):
        context.set_batch_size(32 + rank)  # wrong on purpose: a decision from the rank


class Boom(aikido.Policy):
    def after_step(self, context):
        raise ValueError("no such metric")


def policies():
    net = model()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = aikido.torch.DistributedOptimizer(sgd, net.named_parameters())
    aikido.register_policy("halve-at", lambda options: HalveAtStep(**options))
    check("halve-at" in aikido.policy_names() and "adaptive-batch" in aikido.policy_names(), "registered names")
    policy = HalveAtStep(3)
    runner = aikido.torch.PolicyRunner(opt, 8, [policy, "halve-at:step=5", "schedule:batch@step6=16"])
    runner.before_train()
    runner.before_epoch(0)
    lrs = []
    for step in range(8):
        x, y = batch(200 + step, rank, runner.batch_size)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step(len(y))
        runner.after_step()
        lrs.append(opt.lr)
    runner.after_epoch()
    runner.after_train()
    check(lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.025, 0.025], f"learning rates {lrs}")
    check(sgd.param_groups[0]["lr"] == 0.025, "the torch optimizer's own lr follows")
    check(runner.batch_size == 16 and policy.seen == 8, f"batch {runner.batch_size}, seen {policy.seen}")
    check(same_everywhere(torch.tensor(lrs), "policy/lrs"), "workers decided identically")

    bad = aikido.torch.PolicyRunner(opt, 8, [ByRank()])
    opt.zero_grad()
    F.cross_entropy(net(batch(300, rank)[0]), batch(300, rank)[1]).backward()
    opt.step()
    raises(aikido.MismatchError, bad.after_step, "policies decided differently", "after_step")
    boom = aikido.torch.PolicyRunner(opt, 8, [Boom()])
    raises(aikido.Error, boom.after_step, "policy 'Boom' failed in after_step", "no such metric")
    raises(TypeError, lambda: aikido.torch.PolicyRunner(opt, 8, [object()]), "aikido.Policy")
    raises(aikido.ConfigError, lambda: aikido.torch.PolicyRunner(opt, 8, ["no-such-policy"]), "no-such-policy")


def samplers():
    dataset = TensorDataset(torch.arange(103), torch.arange(103) * 2)
    sampler = aikido.torch.DistributedSampler(len(dataset), seed=3, batch_size=8)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=aikido.torch.collate)
    seen = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen[epoch] = []
        steps = 0
        for b in loader:
            steps += 1
            if b is not None:
                seen[epoch] += b[0].tolist()
                check(torch.equal(b[1], b[0] * 2), "DataLoader pairs")
        check(steps == len(sampler) == sampler.steps_per_epoch(8), f"steps {steps} vs {len(sampler)}")
    elastic = aikido.ElasticSampler(50, seed=4)
    seen["elastic"] = []
    for indices in elastic.batches(peer, 6):
        seen["elastic"] += indices
    check(elastic.epoch == 1 and elastic.position == 0, "one elastic epoch")
    return seen


def main():
    peer_api()
    optimizer_matches_one_process()
    optimizer_state_broadcast()
    policies()
    seen = samplers()
    print(f"ok {checks.count}", flush=True)
    print(json.dumps({"rank": rank, "seen": seen}), flush=True)


if __name__ == "__main__":
    main()
