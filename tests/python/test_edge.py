"""Edge training from Python under aikido-run: round strategies, compression, client-level DP, secure aggregation."""
import re

from conftest import PYTHON, aikido_run, worker


def test_round_strategies_compression_privacy_and_secure_aggregation(build_dir):
    r = aikido_run(["-np", "2", "--timeout", "30", PYTHON, worker("edge.py")])
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        m = re.search(rf"^\[{rank}\] ok (\d+)$", r.stdout, re.M)
        assert m and int(m.group(1)) > 40, r.stdout + r.stderr
