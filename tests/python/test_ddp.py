"""DistributedDataParallel on "aikido" ends with the same parameters as DDP on Gloo."""
import json
import os
import subprocess

from conftest import BOUND, PYTHON, base_env, free_port, json_lines, worker


def test_ddp_on_aikido_matches_ddp_on_gloo_under_torchrun(tmp_path):
    # Debian's torchrun (PyTorch 1.13 on Python 3.11) fails on its default --redirects/--tee values 0 (enum flags
    # with value 0 are not iterated any more); 1 (stdout, teed to the console) works.
    r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "--redirects", "1", "--tee", "1", "--log_dir", str(tmp_path),
                        worker("ddp.py"), "30", "0.25"],
                       env=base_env(), text=True, capture_output=True, timeout=BOUND)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(line.split(":", 1)[1]) for line in r.stdout.splitlines() if ":{" in line]
    assert sorted(l["rank"] for l in lines) == [0, 1], r.stdout + r.stderr
    for line in lines:
        assert line["difference"] <= 1e-6, line   # against DDP on Gloo, after 30 steps
        assert line["across_ranks"] == 0, line    # the ranks agree exactly
        assert line["moved"] > 1e-3, line         # training changed the model: the comparison shows something
        assert line["buckets"] > 1, line          # several buckets: allreduces overlap the backward pass
