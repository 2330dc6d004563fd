"""Faults on the "aikido" backend, one scenario per run (argv[1]); prints one JSON line per observed event.

  mismatch   rank 0 and rank 1 call collectives that differ (sizes, then operations): both must raise MismatchError
             naming the ranks and both calls.
  kill       3 ranks train a DDP model; rank 2 kills itself with SIGKILL at step 5; the others must raise within the
             timeout instead of hanging.
  interrupt  rank 0 waits in an all_reduce that rank 1 never posts (rank 1 waits for a line on stdin); the test sends
             rank 0 SIGINT, which must end the wait with KeyboardInterrupt; then the same for an aikido.Peer
             collective.
Started by test_faults.py with torch's env:// variables (tcp:// init method).
"""
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import aikido
import aikido.torch  # noqa: F401  (registers the backend)


def report(**event):
    print(json.dumps(event), flush=True)


def caught(fn):
    start = time.monotonic()
    try:
        fn()
    except BaseException as e:  # noqa: B902 (KeyboardInterrupt is what some scenarios wait for)
        return {"type": type(e).__name__, "aikido": isinstance(e, aikido.Error), "message": str(e),
                "seconds": time.monotonic() - start}
    return {"type": None, "seconds": time.monotonic() - start}


def mismatch(rank):
    report(case="sizes", **caught(lambda: dist.all_reduce(torch.zeros(4 if rank == 0 else 5))))
    if rank == 0:
        report(case="operations", **caught(lambda: dist.all_reduce(torch.zeros(3))))
    else:
        report(case="operations", **caught(lambda: dist.broadcast(torch.zeros(3), 0)))


def kill(rank):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)

    def train():
        for step in range(1000):
            if step == 5 and rank == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(8, 32, generator=g)), torch.randint(0, 4, (8,), generator=g)).backward()
            opt.step()

    report(case="kill", **caught(train))


def interrupt(rank):
    if rank == 1:
        sys.stdin.readline()  # until the test is done with rank 0
        return
    report(case="waiting", pid=os.getpid())
    report(case="torch.distributed", **caught(lambda: dist.all_reduce(torch.zeros(3))))
    peer = dist.distributed_c10d._get_default_group().peer
    report(case="waiting", pid=os.getpid())
    report(case="aikido.Peer", **caught(lambda: peer.allreduce(torch.zeros(3), "never")))


def main():
    scenario, init = sys.argv[1], sys.argv[2]
    dist.init_process_group("aikido", init_method=init, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    {"mismatch": mismatch, "kill": kill, "interrupt": interrupt}[scenario](dist.get_rank())
    # Leave without destroy_process_group: after these failures the ranks are not in step.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
