"""An elastic Python job (examples/train_fashion_mnist.py --elastic under aikido-run --elastic) survives a resize
and a killed worker, and processes every sample of every epoch exactly once."""
import os
import re
import signal
import subprocess
import time

from conftest import BOUND, BUILD, PYTHON, ROOT, base_env, children_of, json_lines, worker_json_lines

EXAMPLE = os.path.join(ROOT, "examples", "train_fashion_mnist.py")


def ctl(control, *args):
    return subprocess.run([os.path.join(BUILD, "bin", "aikido-ctl"), "--control-file", control, *args],
                          text=True, capture_output=True, timeout=30).stdout


def wait_for_progress(control, workers, step, job):
    """Until aikido-ctl shows `workers` workers, all past `step` (False when the job ended or after BOUND s)."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline and job.poll() is None:
        status = ctl(control, "status")
        steps = [int(s) for s in re.findall(r"step (-?\d+)", status)]
        if f"{workers} workers" in status and len(steps) == workers and all(s > step for s in steps):
            return True
        time.sleep(0.1)
    return False


def test_elastic_python_job_survives_a_resize_and_a_killed_worker(build_dir, tmp_path):
    control = str(tmp_path / "job.ctl")
    job = subprocess.Popen([os.path.join(BUILD, "bin", "aikido-run"), "-np", "2", "--elastic", "--max-np", "3",
                            "--restart", "--control-file", control, "--timeout", "20",
                            PYTHON, EXAMPLE, "--elastic", "--epochs", "2", "--commit-every", "5", "--batch-size", "128",
                            "--policy", "schedule:lr@step30=0.02"],
                           env=base_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for_progress(control, 2, 20, job), ctl(control, "status")
        assert "cluster version 1" in ctl(control, "resize", "3")
        assert wait_for_progress(control, 3, 60, job), ctl(control, "status")
        workers = children_of(job.pid)
        assert len(workers) == 3 and "0" in workers, workers
        os.kill(workers["0"], signal.SIGKILL)  # rank 0's process
        out, err = job.communicate(timeout=BOUND)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, out + err
    assert "worker 0 (rank 0) was killed by signal SIGKILL" in err, out + err
    lines = worker_json_lines(out)
    assert len(lines) >= 2, out + err
    by_epoch = {}
    for line in lines:
        # Every epoch's samples exactly once: the committed history of the model holds 60000 per epoch.
        assert line["global_samples"] == 60000, line
        assert line["workers"] == 3, line
        assert line["test_accuracy"] > 0.8, line
        by_epoch.setdefault(line["epoch"], set()).add((line["test_accuracy"], line["lr"]))
    assert sorted(by_epoch) == [0, 1], out
    for epoch, values in by_epoch.items():
        assert len(values) == 1, f"workers disagree on the model or the learning rate in epoch {epoch}: {values}"
    assert next(iter(by_epoch[1]))[1] == 0.02, "the policy's learning rate reached every worker"


def test_checkpoint_and_resume_of_python_state(build_dir, tmp_path):
    """Module, optimizer state (momentum), a picklable object and the sampler, registered from Python, go into the
    checkpoint that aikido-run asks for when it is stopped; a job resumed from it ends where an uninterrupted one
    ends."""
    run = os.path.join(BUILD, "bin", "aikido-run")
    program = [PYTHON, os.path.join(os.path.dirname(__file__), "workers", "elastic_state.py"), "200"]

    def final(out):
        lines = json_lines(out, "[0] ")
        assert len(lines) == 1, out
        return lines[0]

    through = subprocess.run([run, "-np", "2", "--elastic", *program], env=base_env(), text=True,
                             capture_output=True, timeout=BOUND)
    assert through.returncode == 0, through.stdout + through.stderr
    expected = final(through.stdout)
    assert expected["step"] == 200 and expected["epochs"] == 12, expected  # 32 samples a step, 16 steps an epoch

    checkpoint, mark = str(tmp_path / "job.ck"), str(tmp_path / "half")
    job = subprocess.Popen([run, "-np", "2", "--elastic", "--checkpoint", checkpoint, *program, mark], env=base_env(),
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + BOUND
    while not os.path.exists(mark) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=BOUND)
    assert os.path.exists(mark) and os.path.exists(checkpoint), out + err

    resumed = subprocess.run([run, "-np", "2", "--elastic", "--resume", checkpoint, *program], env=base_env(),
                             text=True, capture_output=True, timeout=BOUND)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert final(resumed.stdout) == expected, resumed.stdout + resumed.stderr
