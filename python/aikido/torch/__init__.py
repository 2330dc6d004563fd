"""aikido.torch: PyTorch on Aikido.

Importing it registers the ``torch.distributed`` backend ``"aikido"``::

    import aikido.torch
    torch.distributed.init_process_group(backend="aikido")      # env://, tcp://, file://; aikido-run or torchrun
    model = torch.nn.parallel.DistributedDataParallel(model)    # unchanged

and offers Aikido's own training API for ``torch.optim`` optimizers::

    opt = aikido.torch.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model.named_parameters(),
                                            strategy="ssgd")      # sma, pair, local_sgd, fedavg, diloco
    aikido.torch.broadcast_parameters(model.named_parameters())
    sampler = aikido.torch.DistributedSampler(len(dataset), seed=1, batch_size=64)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for indices in sampler:
            opt.zero_grad(); loss(indices).backward(); opt.step(len(indices))

Under ``aikido-run`` (not elastic), importing it also fills in torch's env:// variables (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, ...) when the program did not set them.
"""

from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as _dist
from torch.utils.data import default_collate as _default_collate

from .. import _C, Compression, ConfigError, Peer, Policy, Strategy, default_peer
from . import _backend

__all__ = [
    "DistributedOptimizer", "DistributedSampler", "PolicyRunner", "PrivacyOptions", "average_parameters",
    "broadcast_optimizer_state", "broadcast_parameters", "check_same_parameters", "collate", "dirichlet_partition",
    "register_state",
]

PrivacyOptions = _C.PrivacyOptions

if "AIKIDO" not in _dist.Backend._plugins:  # a second import of the package (another path) registers nothing
    _dist.Backend.register_backend("aikido", _backend.create_process_group)
_backend.prepare_env()

NamedParameters = Union[Iterable[Tuple[str, torch.Tensor]], dict]


def _strategy(strategy):
    return Strategy(strategy) if isinstance(strategy, str) else strategy


class DistributedOptimizer(_C.DistributedOptimizer):
    """Wraps a ``torch.optim`` optimizer so that ``step()`` keeps the workers' models together.

    Strategies (``aikido.Strategy`` or its names, short ones too):

    - ``synchronous_sgd`` ("ssgd"): gradients are averaged before every step; they are fused into buckets of about
      ``bucket_bytes`` in reverse parameter order and each bucket's allreduce starts during ``backward()`` as soon as
      its gradients are ready. ``bucket_bytes=0`` (the default) sizes them for the links: 1 MiB on one host, larger
      across fast links between hosts (re-planned when links are measured; ``bucket_bytes`` tells the size now).
      After ``step()`` the averaged gradients are in ``.grad``; ``zero_grad()`` sets them to None.
    - ``synchronous_averaging`` ("sma"): a local step, then the models are averaged.
    - ``pair_averaging`` ("pair"): a local step, then averaging with a random other worker's model pulled in the
      background (AD-PSGD); no worker waits for all others.

    Round strategies communicate once per round of ``local_steps`` (K) local steps of the wrapped optimizer, from a
    model equal on every worker, and average every worker's update:

    - ``local_sgd``: the new model is the start plus the mean update (K = 1 equals synchronous SGD).
    - ``federated_averaging`` ("fedavg"): the updates are weighted by the samples each worker trained on in the round
      (the ``samples`` given to ``step``); with ``round_deadline`` (seconds) the workers that finished wait that long
      for the others and go on without them in an elastic job.
    - ``diloco``: the wrapped optimizer is the inner one; an outer SGD with Nesterov momentum (``outer_lr``,
      ``outer_momentum``) steps on the mean update's negative.

    ``compression`` (an ``aikido.Compression`` or its name: "none", "fp16", "bf16", "int8", "topk:0.01",
    "powersgd:4") encodes synchronous SGD's gradients and the round strategies' updates; ``set_compression`` changes
    it during training. ``privacy`` (``PrivacyOptions(clip, noise_multiplier, delta)``) is client-level differential
    privacy under the round strategies: each worker's update is clipped to ``clip``, Gaussian noise from each
    worker's own secret seed is added to the sum, and ``metrics.epsilon`` reports epsilon at ``delta``. DP-SGD
    (per-sample clipping under synchronous SGD) is in the C++ API only (``PerSampleGradients``).
    ``secure_aggregation=True`` masks every worker's update with pairwise masks (X25519) so that the sum is all the
    others see; not combinable with compression.

    The constructor is collective: it checks that every worker holds the same parameters (``MismatchError`` naming
    the parameter and the ranks otherwise). It does not copy them: call ``broadcast_parameters`` first. One backward
    pass per step with synchronous SGD. ``step(samples)`` takes this worker's batch size of the step (for the
    metrics; default the one given to ``set_batch_size``). ``metrics`` (an ``aikido.TrainingMetrics``) holds the
    gradient noise scale, variance, SNR, throughput and the split of the step's time, identical on every worker.
    ``peer`` defaults to ``aikido.default_peer()``. Not thread safe: use it from the training thread.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: NamedParameters,
                 strategy: Union[Strategy, str] = Strategy.synchronous_sgd, *, peer: Optional[Peer] = None,
                 bucket_bytes: int = 0, seed: int = 0, monitor: bool = True,
                 gradient_sample_interval: int = 16, noise_smoothing: float = 0.05,
                 link_probe_interval: float = 5.0, link_probe_bytes: int = 1 << 20, collective_setup: bool = True,
                 local_steps: int = 8, round_deadline: float = 0.0, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, compression: Union[Compression, str] = "none",
                 privacy: Optional[PrivacyOptions] = None, secure_aggregation: bool = False):
        named = named_parameters if isinstance(named_parameters, dict) else list(named_parameters)
        strategy = _strategy(strategy)
        if privacy is not None and strategy == Strategy.synchronous_sgd:
            raise ConfigError("DistributedOptimizer: from Python, differential privacy is client-level: use it with "
                              "local_sgd, federated_averaging or diloco (DP-SGD's per-sample gradients are in the "
                              "C++ API, aikido::torch::PerSampleGradients)")
        super().__init__(optimizer, named, strategy, peer if peer is not None else default_peer(),
                         bucket_bytes, seed, monitor, gradient_sample_interval, noise_smoothing, link_probe_interval,
                         link_probe_bytes, collective_setup, local_steps, round_deadline, outer_lr, outer_momentum,
                         Compression(compression) if isinstance(compression, str) else compression, privacy,
                         secure_aggregation)

    def set_strategy(self, strategy: Union[Strategy, str]) -> None:
        """Switches strategy at a step boundary; collective (every worker, after the same number of steps)."""
        super().set_strategy(_strategy(strategy))

    def set_compression(self, compression: Union[Compression, str]) -> None:
        """Switches compression at a step boundary; collective like ``set_strategy`` (error-feedback residuals and
        PowerSGD's warm start begin anew)."""
        super().set_compression(Compression(compression) if isinstance(compression, str) else compression)

    def set_bucket_bytes(self, bucket_bytes: int) -> None:
        """Sets the bucket size at a step boundary (0: sized for the links); collective like ``set_strategy``."""
        super().set_bucket_bytes(bucket_bytes)

    @property
    def param_groups(self):
        """The wrapped optimizer's param groups (what learning-rate schedulers change)."""
        return self.optimizer.param_groups

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)


class DistributedSampler(_C.DistributedSampler):
    """Shards the indices ``0..dataset_size-1`` among the workers without overlap, reshuffled every epoch from a seed
    all workers share; every index is used exactly once per epoch, and the split stays exact when the number of
    workers changes between steps.

    ``next_batch(batch_size)`` gives this worker's next batch (possibly empty near the end of the epoch, so that every
    worker takes the same number of steps) or None at the end of the epoch. Given ``batch_size``, the sampler is also a
    ``torch.utils.data.DataLoader`` batch sampler: iterating yields this worker's batches of the current epoch
    (call ``set_epoch`` before each epoch)::

        sampler = aikido.torch.DistributedSampler(len(dataset), seed=1, batch_size=64)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=aikido.torch.collate)

    Rank and size come from ``peer`` (default ``aikido.default_peer()``) at every batch, or are fixed with
    ``rank=`` and ``size=``.
    """

    def __init__(self, dataset_size: int, peer: Optional[Peer] = None, seed: int = 0, shuffle: bool = True,
                 batch_size: Optional[int] = None, *, rank: Optional[int] = None, size: Optional[int] = None):
        if rank is not None or size is not None:
            if rank is None or size is None:
                raise ValueError("DistributedSampler: give both rank and size, or a peer")
            super().__init__(dataset_size, rank, size, seed, shuffle)
        else:
            super().__init__(dataset_size, peer if peer is not None else default_peer(), seed, shuffle)
        self.batch_size = batch_size

    def _batch_size(self):
        if self.batch_size is None:
            raise TypeError("DistributedSampler: give batch_size to iterate it (or call next_batch(batch_size))")
        return self.batch_size

    def __iter__(self):
        batch_size = self._batch_size()
        while True:
            batch = self.next_batch(batch_size)
            if batch is None:
                return
            yield batch

    def __len__(self):
        return self.steps_per_epoch(self._batch_size())


class PolicyRunner(_C.PolicyRunner):
    """Runs adaptation policies (spec strings such as ``"adaptive-batch:interval=20"`` or ``aikido.Policy`` objects) in
    a training loop built on a ``DistributedOptimizer``; call the hooks on every worker at the same points::

        runner = aikido.torch.PolicyRunner(opt, 64, ["adaptive-batch", MyPolicy()])
        runner.before_train()
        for epoch in range(epochs):
            runner.before_epoch(epoch)
            for indices in batches(runner.batch_size):
                ...; opt.step(len(indices)); runner.after_step()
                if runner.stopped: break
            runner.after_epoch()
        runner.after_train()

    Requested actions are checked by consensus (``MismatchError`` when workers decided differently) and applied on
    every worker at the same step. A policy that raises ends training with ``aikido.Error``
    ("policy 'NAME' failed in HOOK at step N: ...").
    """

    def __init__(self, optimizer: DistributedOptimizer, batch_size: int,
                 policies: Sequence[Union[str, Policy]] = ()):
        super().__init__(optimizer, batch_size, list(policies))


def _named(named_parameters):
    return named_parameters if isinstance(named_parameters, dict) else list(named_parameters)


def broadcast_parameters(named_parameters: NamedParameters, root: int = 0, *, peer: Optional[Peer] = None) -> None:
    """Copies root's parameter values to every worker (fused per dtype); collective. Checks first that all workers
    hold the same parameters (``MismatchError`` otherwise)."""
    _C.broadcast_parameters(peer if peer is not None else default_peer(), _named(named_parameters), root)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root: int = 0, *,
                              peer: Optional[Peer] = None) -> None:
    """Copies root's optimizer state (``state_dict()``: momentum buffers, moments, param-group options) to every
    worker; collective."""
    inner = getattr(optimizer, "optimizer", optimizer)
    _C.broadcast_optimizer_state(peer if peer is not None else default_peer(), inner, root)


def average_parameters(named_parameters: NamedParameters, name: str = "aikido.torch/average", *,
                       peer: Optional[Peer] = None) -> None:
    """Averages the parameters across workers (allreduce, mean); collective."""
    _C.average_parameters(peer if peer is not None else default_peer(), _named(named_parameters), name)


def check_same_parameters(named_parameters: NamedParameters, what: str = "parameters", *,
                          peer: Optional[Peer] = None) -> None:
    """Raises ``MismatchError`` on every worker, naming the first parameter that differs and the ranks, unless all
    workers hold parameters with the same names, shapes and dtypes in the same order; collective."""
    _C.check_same_parameters(peer if peer is not None else default_peer(), _named(named_parameters), what)


def register_state(session, named_parameters: NamedParameters, optimizer, sampler: DistributedSampler) -> None:
    """Registers a training loop's state with an ``aikido.ElasticSession``: the parameters (in place), the
    optimizer's state (``torch.optim`` or ``DistributedOptimizer``) and the sampler's epoch and position. Every
    worker registers the same things in the same order before its first ``sync()``."""
    _C.register_state(session, _named(named_parameters), optimizer, sampler)


def dirichlet_partition(labels: torch.Tensor, workers: int, alpha: float, seed: int = 0):
    """A non-IID split of a labelled data set among ``workers`` (Hsu et al. 2019): for every class, the workers'
    shares are drawn from a Dirichlet distribution with concentration ``alpha`` (small: few classes per worker;
    large: close to an even split). Returns each worker's sorted sample indices, the same on every worker for the
    same arguments."""
    return _C.dirichlet_partition(labels, workers, alpha, seed)


def collate(batch):
    """``torch.utils.data.default_collate``, except that the empty batch a worker may get at the end of an epoch
    gives None (train on nothing that step, but take it: ``opt.step(0)``)."""
    if len(batch) == 0:
        return None
    return _default_collate(batch)
