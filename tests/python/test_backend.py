"""The torch.distributed backend "aikido": every collective against Gloo's results, under each way of starting."""
import os
import re

from conftest import PYTHON, Ranks, aikido_run, describe, worker


def checked(out):
    m = re.search(r"^checked (\d+)$", out, re.M)
    return int(m.group(1)) if m else 0


def test_every_collective_matches_gloo_with_three_ranks_started_by_hand():
    results = Ranks("collectives.py", 3).wait()  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    for code, out, err in results:
        assert code == 0, describe(results)
        assert checked(out) > 100, describe(results)


def test_init_process_group_works_unchanged_under_aikido_run(build_dir):
    # aikido-run sets no torch variables: importing aikido.torch fills them in; file:// as the second init method.
    r = aikido_run(["-np", "2", PYTHON, worker("collectives.py")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^\[0\] checked \d+$", r.stdout, re.M) and re.search(r"^\[1\] checked \d+$", r.stdout, re.M), \
        r.stdout + r.stderr


def test_file_init_method(tmp_path):
    results = Ranks("collectives.py", 2, args=(f"file://{tmp_path}/rendezvous",)).wait()  # rank, size: env
    for code, out, err in results:
        assert code == 0, describe(results)
        assert checked(out) > 100, describe(results)
