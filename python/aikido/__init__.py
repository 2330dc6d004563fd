"""Aikido: adaptive, elastic distributed training.

The Python API of the C++ library: a ``Peer`` with named, asynchronous collectives on CPU tensors and numpy arrays,
elastic sessions that survive resizes and lost workers, adaptation policies, and (``import aikido.torch``) a
``DistributedOptimizer`` for ``torch.optim`` optimizers and the ``torch.distributed`` backend ``"aikido"``.

Workers are started by ``aikido-run`` (or torchrun, mpirun, ...)::

    import aikido
    peer = aikido.Peer.from_env()          # one rank when run alone
    x = torch.ones(1000) * peer.rank
    peer.allreduce(x, "grad/fc1")           # in place; op=aikido.ReduceOp.sum by default
    work = peer.allgather_async(x, "all")   # every collective has an _async form returning aikido.Work
    print(work.result().shape)

Errors are ``aikido.Error`` and its subclasses (``TimeoutError``, ``PeerLostError``, ``MismatchError``,
``ConfigError``, ``AuthError``, ``ProtocolError``), all ``RuntimeError``s with the library's messages. Every
blocking call releases the GIL, and Ctrl-C interrupts a wait with ``KeyboardInterrupt``.
"""

import atexit as _atexit
import io as _io
import pickle as _pickle
import weakref as _weakref

import torch as _torch  # first: the compiled module links LibTorch and shares torch's pybind11 types

from ._C import (  # noqa: F401  (re-exported)
    AuthError,
    ChangeTimings,
    ClusterSpec,
    ConfigError,
    ElasticConfig,
    ElasticSampler,
    ElasticSession,
    Error,
    LinkStats,
    MembershipStore,
    MismatchError,
    Peer,
    PeerConfig,
    PeerLostError,
    PolicyContext,
    ProtocolError,
    ReduceOp,
    Store,
    Strategy,
    SyncResult,
    TimeoutError,
    Topology,
    TrainingMetrics,
    TransportKind,
    Work,
    WorkerSpec,
    connect_tcp_store,
    make_membership_store,
    make_memory_store,
    policy_names,
    register_policy,
)

__all__ = [
    "AuthError", "ChangeTimings", "ClusterSpec", "ConfigError", "ElasticBatchSampler", "ElasticConfig",
    "ElasticSampler", "ElasticSession", "Error", "LinkStats", "MembershipStore", "MismatchError", "Peer",
    "PeerConfig", "PeerLostError", "Policy", "PolicyContext", "ProtocolError", "ReduceOp", "Store", "Strategy",
    "SyncResult", "TimeoutError", "Topology", "TrainingMetrics", "TransportKind", "Work", "WorkerSpec",
    "connect_tcp_store", "default_peer", "make_membership_store", "make_memory_store", "policy_names",
    "register_policy",
]


class Policy:
    """Base of adaptation policies written in Python, run by ``aikido.torch.PolicyRunner``.

    Override any of the hooks; each receives a ``PolicyContext`` with ``metrics`` (reduced across workers, so the
    same on every worker) and the actions ``set_batch_size``, ``set_lr``, ``set_strategy``, ``set_topology``,
    ``request_resize`` and ``stop``. Decide from the metrics only (never from the rank, the clock or a private random
    source): the runner checks by consensus that every worker asked for the same actions and raises
    ``MismatchError`` otherwise. A policy whose decisions depend on what it remembers overrides ``save_state`` and
    ``load_state`` so that elastic jobs carry that memory to new workers and roll it back after a failure::

        class HalveOnPlateau(aikido.Policy):
            def __init__(self, patience=3):
                self.best, self.waited, self.patience = float("inf"), 0, patience

            def after_epoch(self, context):
                m = context.metrics
                ...
                context.set_lr(m.lr / 2)

            def save_state(self):
                return pickle.dumps((self.best, self.waited))

            def load_state(self, state):
                self.best, self.waited = pickle.loads(state)
    """

    def name(self) -> str:
        """Name used in messages."""
        return type(self).__name__

    def before_train(self, context: PolicyContext) -> None:
        pass

    def before_epoch(self, context: PolicyContext) -> None:
        pass

    def after_step(self, context: PolicyContext) -> None:
        pass

    def after_epoch(self, context: PolicyContext) -> None:
        pass

    def after_train(self, context: PolicyContext) -> None:
        pass

    def save_state(self) -> bytes:
        """The state this policy's decisions depend on (elastic jobs); empty for a stateless policy."""
        return b""

    def load_state(self, state: bytes) -> None:
        """Restores what save_state returned."""


# The job's default Peer: the ElasticSession's when the program made one with ElasticSession.from_env(), otherwise
# Peer.from_env() on first use.
_default_peer = None
_default_session = None

# Everything that holds connections (Peers, sessions, the backend's process groups). Objects that C++ keeps references
# to (a session keeps the optimizer whose state it registered, which keeps the session's Peer) are never collected,
# so at interpreter exit their connections are closed explicitly: the other workers then see this one leave rather
# than get lost.
_connected = _weakref.WeakSet()


def _track(obj):
    _connected.add(obj)
    return obj


@_atexit.register
def _leave_at_exit():
    for obj in list(_connected):
        peer = obj if isinstance(obj, Peer) else getattr(obj, "peer", None)
        if peer is not None:
            peer._leave()


def default_peer() -> Peer:
    """The Peer that ``aikido.torch`` uses when none is given: the peer of the ``ElasticSession`` made with
    ``ElasticSession.from_env()`` (while it lives), otherwise ``Peer.from_env()``, made on first use."""
    global _default_peer
    session = _default_session() if _default_session is not None else None
    if session is not None:
        return session.peer
    if _default_peer is None:
        _default_peer = Peer.from_env()
    return _default_peer


for _name in ("from_env", "create"):
    def _tracked(original):
        def make(*args, **kwargs):
            return _track(original(*args, **kwargs))
        make.__doc__ = original.__doc__
        return staticmethod(make)
    setattr(Peer, _name, _tracked(getattr(Peer, _name)))


_session_from_env = ElasticSession.from_env


def _from_env():
    global _default_session
    session = _track(_session_from_env())
    _default_session = _weakref.ref(session)
    return session


_from_env.__doc__ = _session_from_env.__doc__
ElasticSession.from_env = staticmethod(_from_env)


# ElasticSession: registrations of Python objects, on top of register_bytes / register_state.

def _register_tensor(self, name, tensor):
    """Registers a tensor's memory (CPU, contiguous): sent to new workers and restored in place."""
    self.register_bytes(name, tensor.detach())


def _register_module(self, name, module):
    """Registers every parameter and buffer of a ``torch.nn.Module`` (in place) under ``name/KEY``."""
    for key, tensor in module.state_dict(keep_vars=True).items():
        if isinstance(tensor, _torch.Tensor):
            self.register_bytes(f"{name}/{key}", tensor.detach())


def _register_optimizer(self, name, optimizer):
    """Registers a ``torch.optim`` optimizer's ``state_dict()`` (state created lazily included); an
    ``aikido.torch.DistributedOptimizer`` registers its wrapped optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)

    def save():
        buffer = _io.BytesIO()
        _torch.save(inner.state_dict(), buffer)
        return buffer.getvalue()

    def load(data):
        inner.load_state_dict(_torch.load(_io.BytesIO(data)))

    self.register_state(name, save, load)


def _register_object(self, name, obj):
    """Registers any picklable Python state kept in a ``dict`` or in an object's attributes (``types.SimpleNamespace``,
    a dataclass, ...): saved with pickle, restored in place."""
    if isinstance(obj, dict):
        def save():
            return _pickle.dumps(dict(obj))

        def load(data):
            obj.clear()
            obj.update(_pickle.loads(data))
    elif hasattr(obj, "__dict__"):
        def save():
            return _pickle.dumps(vars(obj))

        def load(data):
            vars(obj).clear()
            vars(obj).update(_pickle.loads(data))
    else:
        raise TypeError(f"register_object needs a dict or an object with attributes, not {type(obj).__name__}; "
                        "use register_state(name, save, load) for other state")
    self.register_state(name, save, load)


ElasticSession.register_tensor = _register_tensor
ElasticSession.register_module = _register_module
ElasticSession.register_optimizer = _register_optimizer
ElasticSession.register_object = _register_object


class ElasticBatchSampler:
    """This worker's batches of an ``ElasticSampler``, as a ``torch.utils.data.DataLoader`` batch sampler.

    Each batch is the worker's shard of the current step, read with the peer's rank and size at that moment, and the
    sampler's position moves past the whole step as the batch is handed out: a commit after the step includes it, a
    rollback repeats it, and a resize between steps changes who reads what without skipping or repeating a sample.
    Iteration ends with the epoch. A worker may receive an empty batch at the end of an epoch (every worker takes the
    same number of steps): use ``aikido.torch.collate`` or a collate_fn that accepts it. Use ``num_workers=0`` (batches
    are computed when they are taken). ``batch_size`` may be changed between epochs or steps (adaptive batch sizes)::

        loader = DataLoader(dataset, batch_sampler=sampler.batches(session.peer, 64), collate_fn=aikido.torch.collate)
    """

    def __init__(self, sampler: ElasticSampler, peer: Peer, batch_size: int):
        self.sampler, self.peer, self.batch_size = sampler, peer, batch_size

    def __iter__(self):
        while True:
            batch = self.sampler.indices(self.peer.rank, self.peer.size, self.batch_size)
            ended = self.sampler.advance(self.peer.size, self.batch_size)
            yield batch
            if ended:
                return

    def __len__(self):
        step = self.peer.size * self.batch_size
        return -(-(self.sampler.dataset_size - self.sampler.position) // step)


def _batches(self, peer, batch_size):
    """An ``ElasticBatchSampler`` over this sampler for ``peer`` (``DataLoader(batch_sampler=...)``)."""
    return ElasticBatchSampler(self, peer, batch_size)


ElasticSampler.batches = _batches
