"""Faults on the "aikido" backend: mismatched calls, a rank killed while training, Ctrl-C in a wait."""
import json
import os
import signal
import time

from conftest import Ranks, describe, free_port, json_lines


def run(scenario, size, timeout_s=20, stdin=False):
    return Ranks("faults.py", size, args=(scenario, f"tcp://127.0.0.1:{free_port()}"),
                 env={"AIKIDO_TIMEOUT": timeout_s}, stdin=stdin)


def test_mismatched_calls_raise_mismatch_error_naming_ranks_and_calls():
    results = run("mismatch", 2).wait()
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, describe(results)
        events = {e["case"]: e for e in json_lines(out)}
        sizes, operations = events["sizes"], events["operations"]
        assert sizes["type"] == "MismatchError" and sizes["aikido"], describe(results)
        assert "rank 0 called allreduce(SUM) of 4 float32" in sizes["message"], sizes
        assert "rank 1 called allreduce(SUM) of 5 float32" in sizes["message"], sizes
        assert operations["type"] == "MismatchError", describe(results)
        assert "rank 0 called allreduce(SUM) of 3 float32" in operations["message"], operations
        assert "rank 1 called broadcast(root 0) of 3 float32" in operations["message"], operations
        # Found by the signature check, not by waiting for the timeout (20 s).
        assert sizes["seconds"] < 10 and operations["seconds"] < 10, describe(results)


def test_a_killed_rank_makes_the_others_raise_within_the_timeout():
    results = run("kill", 3, timeout_s=20).wait()
    assert results[2][0] == -signal.SIGKILL, describe(results)
    for rank in (0, 1):
        code, out, err = results[rank]
        assert code == 0, describe(results)
        [event] = json_lines(out)
        # Inside DDP's backward the error reaches Python through autograd, as a RuntimeError with Aikido's message.
        assert event["type"] in ("PeerLostError", "RuntimeError"), describe(results)
        assert "rank 2 is lost" in event["message"], describe(results)
        assert event["seconds"] < 20, describe(results)


def test_ctrl_c_interrupts_a_wait():
    ranks = run("interrupt", 2, timeout_s=60, stdin=True)
    rank0 = ranks.procs[0]
    events = []
    try:
        for case in ("torch.distributed", "aikido.Peer"):
            line = rank0.stdout.readline()
            waiting = json.loads(line)
            assert waiting["case"] == "waiting", line
            # The wait has begun when the process sleeps in it; a signal sent earlier would also raise
            # KeyboardInterrupt, but before the wait.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with open(f"/proc/{rank0.pid}/stat") as f:
                    if f.read().split(") ")[1].split()[0] == "S":
                        break
                time.sleep(0.01)
            os.kill(rank0.pid, signal.SIGINT)
            event = json.loads(rank0.stdout.readline())
            events.append(event)
            assert event["case"] == case, event
            assert event["type"] == "KeyboardInterrupt", event
            assert event["seconds"] < 30, event  # the collective's own deadline is 60 s
    finally:
        ranks.procs[1].stdin.write("done\n")
        ranks.procs[1].stdin.flush()
        results = ranks.wait()
    assert len(events) == 2, describe(results)
