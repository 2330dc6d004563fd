"""Edge training from Python, under aikido-run: the round strategies, compression, client-level differential privacy
and secure aggregation through aikido.torch.DistributedOptimizer. Every check raises on a difference (exit 1); prints
"ok CHECKS" at the end.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import aikido
import aikido.torch
import checks
from checks import check, raises

peer = aikido.default_peer()
rank, size = peer.rank, peer.size


def same_everywhere(model, name):
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    all_ = peer.allgather(flat.contiguous(), name)
    return bool((all_ == all_[0]).all())


# A linear regression every worker can solve: y = x w* + b*, each worker with its own samples.
torch.manual_seed(0)
W_TRUE = torch.randn(8, 1)
generator = torch.Generator().manual_seed(100 + rank)
X = torch.randn(256, 8, generator=generator)
Y = X @ W_TRUE + 0.5


def loss_of(model):
    with torch.no_grad():
        return F.mse_loss(model(X), Y).item()


def train(strategy, steps, **options):
    torch.manual_seed(1)
    model = nn.Linear(8, 1)
    opt = aikido.torch.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model.named_parameters(),
                                            strategy, **options)
    first = loss_of(model)
    for s in range(steps):
        batch = slice((s * 16) % 256, (s * 16) % 256 + 16)
        opt.zero_grad()
        F.mse_loss(model(X[batch]), Y[batch]).backward()
        opt.step(16)
    return model, opt, first


# Every round strategy learns and ends each round with equal models; compression travels with them.
for strategy, compression in (("local_sgd", "none"), ("fedavg", "fp16"), ("diloco", "int8"),
                              ("ssgd", "topk:0.25"), ("ssgd", "powersgd:1")):
    model, opt, first = train(strategy, 64, local_steps=4, compression=compression, outer_lr=0.5)
    check(opt.strategy == aikido.Strategy(strategy), f"strategy {opt.strategy}")
    check(opt.compression == aikido.Compression(compression), f"compression {opt.compression}")
    check(opt.metrics.compression == compression, f"metrics.compression {opt.metrics.compression}")
    check(opt.metrics.bytes_sent > 0, "bytes_sent counted")
    check(loss_of(model) < first / 4, f"{strategy}+{compression} learns: {first} -> {loss_of(model)}")
    check(same_everywhere(model, f"same/{strategy}/{compression}"), f"{strategy}: equal models after 16 rounds")
    check(math.isnan(opt.metrics.epsilon) and opt.accountant is None, "no privacy, no epsilon")

# A switch of compression during training is collective and takes effect at once.
model, opt, _ = train("ssgd", 4)
opt.set_compression("bf16")
check(opt.compression.name == "bf16", "set_compression")


class CompressAtStep(aikido.Policy):
    """A policy written in Python that switches the compression, as the built-in adaptive-compression does."""

    def after_step(self, context):
        if context.metrics.step == 3:
            context.set_compression("topk:0.5")


torch.manual_seed(1)
net = nn.Linear(8, 1)
opt = aikido.torch.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), net.named_parameters(), "fedavg",
                                        local_steps=2)
runner = aikido.torch.PolicyRunner(opt, 16, [CompressAtStep()])
runner.before_train()
runner.before_epoch(0)
for s in range(6):
    opt.zero_grad()
    F.mse_loss(net(X[s * 16:(s + 1) * 16]), Y[s * 16:(s + 1) * 16]).backward()
    opt.step(16)
    runner.after_step()
runner.after_epoch()
runner.after_train()
check(opt.compression == aikido.Compression.topk(0.5), f"the policy's compression: {opt.compression}")
check(same_everywhere(net, "same/policy"), "equal models after the policy's switch")
raises(aikido.ConfigError, lambda: aikido.Compression("zip"), "topk:FRACTION")

# Secure aggregation: the masked sum is the plain one up to the fixed point's rounding.
plain, _, _ = train("local_sgd", 16, local_steps=4)
secure, opt, _ = train("local_sgd", 16, local_steps=4, secure_aggregation=True)
for p, q in zip(plain.parameters(), secure.parameters()):
    check(torch.allclose(p, q, atol=1e-4), f"secure aggregation changes the result: {p} {q}")
check(same_everywhere(secure, "same/secure"), "secure aggregation: equal models")
raises(aikido.ConfigError, lambda: train("fedavg", 1, secure_aggregation=True, compression="fp16"), "choose one")

# Client-level DP: one Gaussian step per round (sampling rate 1), epsilon as the accountant computes it.
privacy = aikido.torch.PrivacyOptions(clip=1.0, noise_multiplier=2.0, delta=1e-5)
model, opt, first = train("fedavg", 32, local_steps=4, privacy=privacy)
reference = aikido.RdpAccountant()
reference.step(1.0, 2.0, 8)
check(opt.accountant.steps == 8, f"8 rounds accounted, not {opt.accountant.steps}")
check(abs(opt.metrics.epsilon - reference.epsilon(1e-5)) < 1e-9, f"epsilon {opt.metrics.epsilon}")
check(same_everywhere(model, "same/dp"), "client-level DP: equal models")
raises(aikido.ConfigError, lambda: train("ssgd", 1, privacy=privacy), "client-level", "PerSampleGradients")

# A label-skewed split: disjoint, complete, the same on every worker.
labels = torch.arange(100) % 10
parts = aikido.torch.dirichlet_partition(labels, size, 0.3, seed=5)
check(sorted(i for part in parts for i in part) == list(range(100)), "every sample in exactly one part")
raises(aikido.ConfigError, lambda: aikido.torch.dirichlet_partition(labels, size, 0.0), "alpha")

print(f"ok {checks.count}", flush=True)
