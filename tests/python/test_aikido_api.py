"""Aikido's own Python API under aikido-run: Peer, DistributedOptimizer, samplers and policies written in Python."""
import re

from conftest import PYTHON, aikido_run, json_lines, worker


def test_peer_optimizer_samplers_and_python_policies(build_dir):
    r = aikido_run(["-np", "2", "--timeout", "30", PYTHON, worker("aikido_api.py")])
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        m = re.search(rf"^\[{rank}\] ok (\d+)$", r.stdout, re.M)
        assert m and int(m.group(1)) > 50, r.stdout + r.stderr
    seen = [json_lines(r.stdout, f"[{rank}] ")[0]["seen"] for rank in (0, 1)]
    # The samplers give every index exactly once per epoch, split between the workers.
    for epoch, size in (("0", 103), ("1", 103), ("elastic", 50)):
        a, b = seen[0][epoch], seen[1][epoch]
        assert not set(a) & set(b), epoch
        assert sorted(a + b) == list(range(size)), epoch
    assert seen[0]["0"] != seen[0]["1"], "the order is reshuffled every epoch"
