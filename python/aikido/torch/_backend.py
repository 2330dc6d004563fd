"""The torch.distributed backend "aikido": how a process group's Peer is configured, and torch's env:// variables
under aikido-run.

Nothing here assumes one host: each group's ranks publish their host ids through the group's store; when they all
share one, the Peer listens on loopback and uses shared memory and Unix sockets; otherwise it listens on this host's
address towards the store's host (or AIKIDO_BIND_ADDRESS) and ranks on other hosts connect over TCP.
"""

import os
import socket
from datetime import timedelta

import torch.distributed as dist

import aikido
from .. import _C


def _env(name):
    value = os.environ.get(name)
    return value if value else None


def _store_host(store):
    """The host of the TCPStore beneath `store` (PrefixStores unwrapped), or None."""
    while store is not None:
        if isinstance(store, dist.TCPStore):
            return store.host
        store = getattr(store, "underlying_store", None)
    return None


def _address_towards(host):
    """This machine's address on the route to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def _cross_host_address(store):
    """Where this rank listens if its group spans hosts: its address on the route to the store's host (or
    MASTER_ADDR), else its host name's address; "" when only loopback is found."""
    towards = _store_host(store) or _env("MASTER_ADDR")
    candidates = []
    if towards and towards not in ("localhost", "127.0.0.1", "::1"):
        candidates.append(lambda: _address_towards(towards))
    candidates.append(lambda: socket.gethostbyname(socket.gethostname()))
    for candidate in candidates:
        try:
            address = candidate()
        except OSError:
            continue
        if not address.startswith("127."):
            return address
    return ""


def create_process_group(store, rank, size, timeout):
    """The creator torch.distributed calls for backend "aikido" (and for every new_group of it)."""
    settings = {}
    aikido_timeout = _env("AIKIDO_TIMEOUT")
    settings["timeout"] = float(aikido_timeout) if aikido_timeout else timeout.total_seconds()
    host = _env("AIKIDO_HOST") or socket.gethostname()
    settings["host"] = host
    settings["job_id"] = _env("AIKIDO_JOB_ID") or "torch"
    for variable, key in (("AIKIDO_TOPOLOGY", "topology"), ("AIKIDO_TRANSPORT", "transport"),
                          ("AIKIDO_TCP_CONGESTION", "tcp_congestion")):
        if _env(variable):
            settings[key] = os.environ[variable]
    if settings.get("tcp_congestion") == "system":
        settings["tcp_congestion"] = ""
    if _env("AIKIDO_SEGMENT_BYTES"):
        settings["segment_bytes"] = int(os.environ["AIKIDO_SEGMENT_BYTES"])
    # The secret and the listening address are agreed on through the store by the group itself: without
    # AIKIDO_SECRET, rank 0 makes one; without AIKIDO_BIND_ADDRESS, loopback when all ranks share a host.
    for variable, key in (("AIKIDO_SECRET", "secret"), ("AIKIDO_BIND_ADDRESS", "bind_address")):
        if _env(variable):
            settings[key] = os.environ[variable]
    return aikido._track(_C.ProcessGroupAikido(store, rank, size, settings, _cross_host_address(store)))


_agent_store = None  # rank 0's TCPStore server for env:// under aikido-run


def prepare_env():
    """Under aikido-run (not elastic), fills in what torch's env:// rendezvous reads when the program did not: RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, and MASTER_ADDR/MASTER_PORT of a TCPStore that rank 0 serves (its port
    travels through aikido-run's store), so that init_process_group("aikido") works unchanged."""
    global _agent_store
    store_address = _env("AIKIDO_STORE_ADDR")
    if not store_address or _env("AIKIDO_ELASTIC") == "1" or _env("MASTER_ADDR") or _env("MASTER_PORT"):
        return
    rank, size = int(os.environ.get("AIKIDO_RANK", "0")), int(os.environ.get("AIKIDO_SIZE", "1"))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(size))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("AIKIDO_LOCAL_RANK", "0"))
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("AIKIDO_LOCAL_SIZE", str(size)))
    timeout = float(_env("AIKIDO_TIMEOUT") or 60)
    job = _env("AIKIDO_JOB_ID") or "aikido"
    key = f"{job}/torch/master"
    aikido_store = _C.connect_tcp_store(store_address, os.environ.get("AIKIDO_SECRET", ""), timeout)
    if rank == 0:
        address = _env("AIKIDO_BIND_ADDRESS") or "127.0.0.1"
        _agent_store = dist.TCPStore(address, 0, size, True, timedelta(seconds=timeout), wait_for_workers=False)
        aikido_store.set(key, f"{address}:{_agent_store.port}")
    master = aikido_store.wait(key, timeout).decode()
    address, port = master.rsplit(":", 1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, port
    # Every rank, rank 0 included, connects to that server as a client (torch's "agent store" mode).
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    os.environ.setdefault("TORCHELASTIC_RESTART_COUNT", "0")
