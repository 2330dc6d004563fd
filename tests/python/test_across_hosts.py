"""The torch.distributed backend "aikido" across two emulated hosts (network namespaces, scripts/hosts.sh), two
ranks on each, started with torch's env:// variables by hand as a cluster scheduler would: every collective against
Gloo's results, and DDP on "aikido" against DDP on Gloo. Needs root; otherwise skipped with the reason."""
import json
import os
import subprocess

import pytest

from conftest import BOUND, PYTHON, ROOT, base_env, worker

HOSTS = os.path.join(ROOT, "scripts", "hosts.sh")


@pytest.fixture(scope="module")
def hosts():
    check = subprocess.run([HOSTS, "check"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip("emulated hosts cannot be made here: " + (check.stdout or check.stderr).strip())
    subprocess.run([HOSTS, "up", "2", "--owner", str(os.getpid())], check=True)
    yield
    subprocess.run([HOSTS, "down", "--owner", str(os.getpid())], check=False)


def four_ranks(script, args, port):
    """Ranks 0-1 on host h0, 2-3 on h1; rank 0's host serves the store (MASTER_ADDR)."""
    procs = []
    for rank in range(4):
        env = base_env(RANK=rank, WORLD_SIZE=4, LOCAL_RANK=rank % 2, LOCAL_WORLD_SIZE=2, GROUP_RANK=rank // 2,
                       MASTER_ADDR="198.18.0.10", MASTER_PORT=port, AIKIDO_TIMEOUT=60)
        procs.append(subprocess.Popen([HOSTS, "exec", "h%d" % (rank // 2), PYTHON, worker(script), *args], env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=BOUND)
        results.append((p.returncode, out, err))
    return results


def test_every_collective_across_hosts(hosts):
    for rank, (code, out, err) in enumerate(four_ranks("collectives.py", [], 29611)):
        assert code == 0, f"rank {rank}:\n{out}\n{err}"
        assert "checked" in out, out


def test_ddp_across_hosts_matches_ddp_on_gloo(hosts):
    for rank, (code, out, err) in enumerate(four_ranks("ddp.py", ["20", "0.25"], 29612)):
        assert code == 0, f"rank {rank}:\n{out}\n{err}"
        line = json.loads(out.strip().splitlines()[-1])
        assert line["difference"] <= 1e-6, line
        assert line["across_ranks"] == 0, line
        assert line["moved"] > 1e-3, line
