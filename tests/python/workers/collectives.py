"""Every torch.distributed collective on the "aikido" backend against Gloo's results, in one job.

Started by test_backend.py (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; env:// unless an init method is given).
Every rank's inputs are a function of (rank, case), so each rank can also compute any result itself: where Gloo lacks an
operation or element type, the result is checked against that reference instead. Prints "checked N" at the end; any
difference raises (exit status 1, with the case in the traceback).
"""
import os
import sys

import torch
import torch.distributed as dist

import aikido
import aikido.torch  # noqa: F401  (registers the backend)

R = dist.ReduceOp
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int32, torch.int64, torch.uint8, torch.int8, torch.int16]
checked = 0


def data(rank, case, shape=(7,), dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * case + rank)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(1, 4, shape, generator=g).to(dtype)  # small: products of a few ranks stay in range


def same(actual, expected, what):
    global checked
    if actual.dtype.is_floating_point or actual.dtype.is_complex:
        ok = torch.allclose(actual.to(expected.dtype), expected, rtol=1e-2 if actual.element_size() == 2 else 1e-6,
                            atol=1e-2 if actual.element_size() == 2 else 1e-6)
    else:
        ok = torch.equal(actual, expected.to(actual.dtype))
    if not ok:
        raise AssertionError(f"{what}: aikido gave {actual}, expected {expected}")
    checked += 1


def reference(op, tensors):
    acc = tensors[0].clone()
    wide = acc.to(torch.float64) if acc.dtype.is_floating_point else acc
    wide = wide.clone()
    for t in tensors[1:]:
        t = t.to(wide.dtype)
        if op in (R.SUM, R.AVG):
            wide = wide + t
        elif op == R.PRODUCT:
            wide = wide * t
        elif op == R.MIN:
            wide = torch.minimum(wide, t)
        elif op == R.MAX:
            wide = torch.maximum(wide, t)
        elif op == R.BAND:
            wide = wide & t
        elif op == R.BOR:
            wide = wide | t
        elif op == R.BXOR:
            wide = wide ^ t
    if op == R.AVG:
        if wide.dtype.is_floating_point or wide.dtype.is_complex:
            wide = wide / len(tensors)
        else:
            wide = torch.div(wide, len(tensors), rounding_mode="trunc")
    return wide


def main():
    if len(sys.argv) > 1:  # another init method than env://: rank and size from the environment
        dist.init_process_group("aikido", init_method=sys.argv[1], rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group("aikido")
    rank, size = dist.get_rank(), dist.get_world_size()
    assert dist.get_backend() == "aikido", dist.get_backend()
    gloo = dist.new_group(backend="gloo")
    case = 0

    def gloo_or_reference(op, x, all_inputs, group=gloo):
        try:
            g = x.clone()
            dist.all_reduce(g, op, group=group)
            return g, "gloo"
        except RuntimeError:
            return reference(op, all_inputs), "reference"

    # all_reduce: every operation on every element type.
    for dtype in FLOATS + INTS + [torch.bool, torch.complex64]:
        for op_name in ("SUM", "PRODUCT", "MIN", "MAX", "AVG", "BAND", "BOR", "BXOR"):
            op = getattr(R, op_name)
            floating = dtype.is_floating_point or dtype.is_complex
            if floating and op in (R.BAND, R.BOR, R.BXOR):
                continue
            if dtype.is_complex and op in (R.MIN, R.MAX, R.PRODUCT):
                continue
            if dtype == torch.bool and op in (R.AVG, R.PRODUCT, R.SUM):
                continue
            case += 1
            x = data(rank, case, dtype=dtype)
            a = x.clone()
            dist.all_reduce(a, op)
            expected, source = gloo_or_reference(op, x, [data(r, case, dtype=dtype) for r in range(size)])
            same(a, expected, f"all_reduce {op_name} {dtype} (against {source})")

    # PREMUL_SUM (NCCL's, which the aikido backend also takes): the sum of 2.5 * x.
    case += 1
    x = data(rank, case)
    dist.all_reduce(x, op=dist._make_nccl_premul_sum(2.5))
    same(x, 2.5 * sum(data(r, case).double() for r in range(size)), "all_reduce PREMUL_SUM")

    # broadcast from every root, several element types and shapes.
    for root in range(size):
        for dtype in (torch.float32, torch.int64, torch.bool, torch.int8):
            case += 1
            a = data(rank, case, (3, 5), dtype)
            g = a.clone()
            dist.broadcast(a, root)
            if dtype == torch.bool:  # Gloo does not take bool
                g = data(root, case, (3, 5), dtype)
            else:
                dist.broadcast(g, root, group=gloo)
            same(a, g, f"broadcast root {root} {dtype}")

    # reduce to every root (the other ranks' tensors stay as they were).
    for root in range(size):
        case += 1
        x = data(rank, case)
        a, g = x.clone(), x.clone()
        dist.reduce(a, root, R.MAX)
        dist.reduce(g, root, R.MAX, group=gloo)
        same(a, g if rank == root else x, f"reduce root {root}")

    # all_gather (separate tensors and one tensor), all_gather_into_tensor.
    case += 1
    x = data(rank, case, (2, 3))
    a = [torch.zeros(2, 3) for _ in range(size)]
    g = [torch.zeros(2, 3) for _ in range(size)]
    dist.all_gather(a, x)
    dist.all_gather(g, x, group=gloo)
    for r in range(size):
        same(a[r], g[r], f"all_gather block {r}")
    flat = torch.zeros(size * 6)
    dist.all_gather(list(flat.view(size, 6)), x.view(-1))  # the blocks lie one after the other: written in place
    same(flat, torch.cat(g).view(-1), "all_gather into consecutive blocks")
    out = torch.zeros(size * 2, 3)
    dist.all_gather_into_tensor(out, x)
    same(out, torch.cat([data(r, case, (2, 3)) for r in range(size)]), "all_gather_into_tensor")

    # gather and scatter to/from every root.
    for root in range(size):
        case += 1
        x = data(rank, case, (4,), torch.int64)
        a = [torch.zeros(4, dtype=torch.int64) for _ in range(size)] if rank == root else None
        g = [torch.zeros(4, dtype=torch.int64) for _ in range(size)] if rank == root else None
        dist.gather(x, a, dst=root)
        dist.gather(x, g, dst=root, group=gloo)
        if rank == root:
            for r in range(size):
                same(a[r], g[r], f"gather root {root} block {r}")
        blocks = [data(r, case + 500, (4,)) for r in range(size)]
        a, g = torch.zeros(4), torch.zeros(4)
        dist.scatter(a, blocks if rank == root else None, src=root)
        dist.scatter(g, blocks if rank == root else None, src=root, group=gloo)
        same(a, g, f"scatter root {root}")

    # reduce_scatter (Gloo has none: against the reference).
    for op_name in ("SUM", "MAX", "BOR"):
        op = getattr(R, op_name)
        case += 1
        dtype = torch.int32 if op == R.BOR else torch.float32
        inputs = [data(rank, case * 10 + r, (3,), dtype) for r in range(size)]
        out = torch.zeros(3, dtype=dtype)
        dist.reduce_scatter(out, inputs, op)
        same(out, reference(op, [data(q, case * 10 + rank, (3,), dtype) for q in range(size)]),
             f"reduce_scatter {op_name}")
        flat = torch.cat(inputs)
        out = torch.zeros(3, dtype=dtype)
        dist.reduce_scatter_tensor(out, flat, op)
        same(out, reference(op, [data(q, case * 10 + rank, (3,), dtype) for q in range(size)]),
             f"reduce_scatter_tensor {op_name}")

    # all_to_all_single, even and uneven splits; all_to_all of tensor lists.
    case += 1
    x = torch.arange(size * 2, dtype=torch.float32) + 100 * rank
    a, g = torch.zeros(size * 2), torch.zeros(size * 2)
    dist.all_to_all_single(a, x)
    dist.all_to_all_single(g, x, group=gloo)
    same(a, g, "all_to_all_single even")
    in_splits = [(rank + r) % 3 + 1 for r in range(size)]          # rows this rank sends to r
    out_splits = [(q + rank) % 3 + 1 for q in range(size)]         # rows q sends to this rank
    x = torch.arange(sum(in_splits) * 2, dtype=torch.float64).view(-1, 2) + 1000 * rank
    a, g = torch.zeros(sum(out_splits), 2, dtype=torch.float64), torch.zeros(sum(out_splits), 2, dtype=torch.float64)
    dist.all_to_all_single(a, x, out_splits, in_splits)
    dist.all_to_all_single(g, x, out_splits, in_splits, group=gloo)
    same(a, g, "all_to_all_single uneven")
    inputs = [torch.full((r + 1,), float(rank * 10 + r)) for r in range(size)]
    outputs = [torch.zeros(rank + 1) for _ in range(size)]
    dist.all_to_all(outputs, inputs)
    for q in range(size):
        same(outputs[q], torch.full((rank + 1,), float(q * 10 + rank)), f"all_to_all from {q}")

    # barrier, point to point (a ring of isend/irecv, then blocking send/recv with tags), object collectives.
    dist.barrier()
    right, left = (rank + 1) % size, (rank - 1) % size
    incoming = torch.zeros(5)
    works = [dist.isend(torch.full((5,), float(rank)), right), dist.irecv(incoming, left)]
    for w in works:
        w.wait()
    same(incoming, torch.full((5,), float(left)), "isend/irecv ring")
    if rank == 0:
        # A send completes once its recv was posted (as with NCCL): two sends in flight, received in another order.
        sends = [dist.isend(torch.tensor([7, 8], dtype=torch.int64), 1, tag=3),
                 dist.isend(torch.tensor([9], dtype=torch.int64), 1, tag=4)]
        for w in sends:
            w.wait()
        dist.send(torch.tensor([5.0]), 1)
    elif rank == 1:
        t4, t3 = torch.zeros(1, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        dist.recv(t4, 0, tag=4)  # tags are matched, not the order of posting
        dist.recv(t3, 0, tag=3)
        same(t3, torch.tensor([7, 8]), "send/recv tag 3")
        same(t4, torch.tensor([9]), "send/recv tag 4")
        t = torch.zeros(1)
        dist.recv(t, 0)
        same(t, torch.tensor([5.0]), "blocking send/recv")
    objects = [None] * size
    dist.all_gather_object(objects, {"rank": rank, "text": "x" * rank})
    assert objects == [{"rank": r, "text": "x" * r} for r in range(size)], objects
    lst = [f"from {rank}", rank] if rank == 1 else [None, None]
    dist.broadcast_object_list(lst, src=1)
    assert lst == ["from 1", 1], lst
    gathered = [None] * size if rank == 0 else None
    dist.gather_object(("g", rank), gathered, dst=0)
    if rank == 0:
        assert gathered == [("g", r) for r in range(size)], gathered
    received = [None]
    dist.scatter_object_list(received, [{"to": r} for r in range(size)] if rank == 0 else None, src=0)
    assert received == [{"to": rank}], received

    # async_op: several in flight, their futures carry the tensors.
    xs = [data(rank, case + 700 + i) for i in range(4)]
    works = [dist.all_reduce(x, async_op=True) for x in xs]
    for i, w in enumerate(works):
        w.wait()
        same(w.get_future().value()[0], sum(data(r, case + 700 + i).double() for r in range(size)),
             f"async all_reduce {i} future")
    assert works[0].is_completed()

    # A subgroup of the even ranks, against Gloo's subgroup.
    members = list(range(0, size, 2))
    sub = dist.new_group(members)
    sub_gloo = dist.new_group(members, backend="gloo")
    if rank in members:
        case += 1
        x = data(rank, case)
        a, g = x.clone(), x.clone()
        dist.all_reduce(a, group=sub)
        dist.all_reduce(g, group=sub_gloo)
        same(a, g, "subgroup all_reduce")
        assert dist.get_world_size(sub) == len(members)

    # The group's own aikido.Peer, for Aikido's API next to torch.distributed.
    peer = dist.distributed_c10d._get_default_group().peer
    assert (peer.rank, peer.size) == (rank, size)
    same(peer.allreduce(torch.ones(3), "direct"), torch.full((3,), float(size)), "the group's Peer")

    dist.destroy_process_group()
    print(f"checked {checked}", flush=True)


if __name__ == "__main__":
    main()
