"""aikido-run --dashboard, seen by a browser: headless Chromium opens the page while the Fashion-MNIST example trains in
an elastic job that aikido-ctl grows from 2 to 3 workers and whose schedule policy changes the learning rate. The test
reads the page's own summary of what it draws (window.aikidoState, app.js) at intervals and asserts that every panel
has data that advances and that the resize and the policy's decision are annotated; a screenshot of the page is kept.
The same run's --metrics-file is replayed (aikido-run --dashboard 0 --replay F) and its Prometheus text is checked
against the Grafana dashboard in contrib/grafana/aikido.json.

Screenshots: $AIKIDO_TEST_OUTPUT_DIR (default <build>/test-output/dashboard)/live.png and replay.png.
"""
import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

import browser
from conftest import BUILD, ROOT, base_env

RUN = os.path.join(BUILD, "bin", "aikido-run")
CTL = os.path.join(BUILD, "bin", "aikido-ctl")
EXAMPLE = os.path.join(BUILD, "bin", "train_fashion_mnist")
OUTPUT_DIR = os.path.abspath(os.environ.get("AIKIDO_TEST_OUTPUT_DIR", os.path.join(BUILD, "test-output", "dashboard")))
GRAFANA = os.path.join(ROOT, "contrib", "grafana", "aikido.json")
BOUND = 180  # seconds: a job that takes longer has hung (it takes about 25 s alone on 2 cores)
LINE_PANELS = ("throughput", "loss-step", "loss-time", "cluster", "gradients")
POLICY = "schedule:lr@step300=0.02"


class Lines:
    """Collects the lines a process writes to one pipe, in a thread; `wait_for(regex)` returns the first match."""

    def __init__(self, pipe):
        self.lines = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe):
        for line in pipe:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)  # the end
            self._cond.notify_all()

    def wait_for(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    m = line is not None and re.search(pattern, line)
                    if m:
                        return m
                if self.lines and self.lines[-1] is None or time.monotonic() > deadline:
                    return None
                self._cond.wait(0.2)

    def text(self):
        self._thread.join(timeout=10)
        return "\n".join(line for line in self.lines if line is not None)


def http_get(port, path, timeout=5):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def metric_names(prometheus_text):
    """The metric names of the samples in a Prometheus text exposition."""
    names = set()
    for line in prometheus_text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{| )", line)
        if m:
            names.add(m.group(1))
    return names


def read_events(port, count, timeout=30, last_event_id=None):
    """The first `count` records of the dashboard's /events stream (server-sent events), read with plain HTTP; with
    `last_event_id`, as a browser that reconnects asks for them."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    records = []
    try:
        connection.request("GET", "/events",
                           headers={} if last_event_id is None else {"Last-Event-ID": str(last_event_id)})
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            line = response.fp.readline().decode()
            if not line:
                break
            if line.startswith("data: "):
                records.append(json.loads(line[len("data: "):]))
    finally:
        connection.close()
    return records


def snapshot_state(page):
    return page.evaluate("window.aikidoState ? JSON.stringify(window.aikidoState) : null")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One elastic training job with the dashboard, watched while it runs: what the browser read (snapshots of
    window.aikidoState, or None without Chromium), what /metrics served, and the files it left."""
    for path in (RUN, CTL, EXAMPLE):
        if not os.path.exists(path):
            pytest.skip(f"{path} is not built (the example needs LibTorch: configure with -DAIKIDO_WITH_TORCH=ON)")
    folder = tmp_path_factory.mktemp("dashboard")
    control, metrics_file, log_dir = folder / "control", folder / "metrics.jsonl", folder / "logs"
    os.makedirs(OUTPUT_DIR, exist_ok=True)
    args = [RUN, "-np", "2", "--elastic", "--max-np", "3", "--control-file", control, "--dashboard", "0",
            "--metrics-port", "0", "--metrics-file", metrics_file, "--metrics-interval", "0.25",
            "--log-dir", log_dir, EXAMPLE, "--epochs", "20", "--max-steps", "60", "--policy", POLICY,
            "--output", "json"]
    job = subprocess.Popen([str(a) for a in args], env=base_env(), text=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = Lines(job.stdout), Lines(job.stderr)
    result = {"folder": folder, "metrics_file": metrics_file, "log_dir": log_dir, "snapshots": [],
              "prometheus": [], "resized": None, "screenshot": None, "browser": None}
    chromium = browser.find_chromium()
    session = None
    try:
        url = err.wait_for(r"aikido-run: dashboard at (http://\S+/)", 60)
        metrics = err.wait_for(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", 60)
        assert url and metrics, "aikido-run printed no dashboard or metrics URL:\n" + err.text()
        result["url"] = url.group(1)
        port = int(metrics.group(1))
        if chromium:
            session = browser.Browser(chromium)
            page = session.open(result["url"])
        deadline = time.monotonic() + BOUND
        while job.poll() is None and time.monotonic() < deadline:
            try:
                status, text = http_get(port, "/metrics")
                if status == 200:
                    result["prometheus"].append(text)
            except OSError:
                text = ""
            # Grow once both workers are past step 20: the third worker joins a job that trains.
            step = re.search(r'^aikido_step\{rank="1"\} (\d+)', text, re.M)
            if result["resized"] is None and step and int(step.group(1)) > 20:
                result["resized"] = subprocess.run([CTL, "--control-file", str(control), "resize", "3"], text=True,
                                                   capture_output=True, timeout=30)
            if session:
                state = snapshot_state(page)
                if state:
                    result["snapshots"].append(json.loads(state))
            time.sleep(0.5)
        if job.poll() is None:
            job.send_signal(signal.SIGABRT)
        job.wait(timeout=60)
        if session:
            # The page takes the last records (job_finished) within a redraw.
            for _ in range(20):
                state = json.loads(snapshot_state(page) or "null")
                if state:
                    result["snapshots"].append(state)
                if state and state["state"]["state"] != "running":
                    break
                time.sleep(0.25)
            result["screenshot"] = page.screenshot(os.path.join(OUTPUT_DIR, "live.png"))
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        if session:
            result["browser"] = session.output()
            session.close()
    result["returncode"] = job.returncode
    result["stdout"], result["stderr"] = out.text(), err.text()
    return result


def describe(run):
    return f"aikido-run exit {run['returncode']}\n--- stderr\n{run['stderr'][-6000:]}"


def test_the_job_ran_and_was_resized(run):
    assert run["returncode"] == 0, describe(run)
    assert run["resized"] is not None, "the job never reached step 20 on rank 1\n" + describe(run)
    assert "cluster version 1" in run["resized"].stdout, run["resized"].stdout + run["resized"].stderr
    # aikido-run's own metrics of the job follow it: the resize and the policy's decision are counted.
    scraped = run["prometheus"]
    assert any(re.search(r"^aikido_job_running 1$", t, re.M) for t in scraped), scraped[-1]
    last = scraped[-1]
    for line in ("aikido_job_cluster_version 1", "aikido_job_cluster_size 3", 'aikido_job_events_total{kind="resize"} 1',
                 'aikido_job_events_total{kind="policy"} 1', 'aikido_job_events_total{kind="failure"} 0'):
        assert re.search("^" + re.escape(line) + "$", last, re.M), f"{line} not in the last /metrics:\n{last}"
    # --log-dir: each worker's output, and aikido-run's events.
    names = sorted(os.listdir(run["log_dir"]))
    assert {"events.jsonl", "rank-0.log", "rank-1.log"} <= set(names), names


def advanced(snapshots, panel, key="points"):
    """Whether two snapshots taken while the job ran show more of `panel` in the later one (points and the largest
    x, or `key`)."""
    running = [s["panels"].get(panel) for s in snapshots if s["state"]["state"] == "running"]
    running = [p for p in running if p and p.get("points")]
    return any(later[key] > earlier[key] and later["last"] > earlier["last"]
               for i, earlier in enumerate(running) for later in running[i + 1:])


def series_advanced(snapshots, panel, label):
    counts = [s["panels"][panel]["series"].get(label, 0) for s in snapshots
              if s["state"]["state"] == "running" and panel in s["panels"]]
    return any(c > 0 for c in counts) and max(counts) > min(c for c in counts if c > 0)


@pytest.mark.skipif(browser.find_chromium() is None,
                    reason="chromium is not installed (scripts/setup.sh installs Debian's chromium): "
                           "the dashboard is not tested in a browser")
def test_live_dashboard_shows_every_panel_advancing_with_annotations(run, capsys):
    assert run["returncode"] == 0, describe(run)
    snaps = run["snapshots"]
    assert len(snaps) >= 4, f"the page was read {len(snaps)} times\n{run['browser']}\n" + describe(run)
    last = snaps[-1]
    context = f"last state of the page: {json.dumps(last, indent=1)[:6000]}"

    # Job state: seen running, then finished with exit status 0.
    states = [s["state"]["state"] for s in snaps]
    assert "running" in states, states
    assert last["state"]["state"] == "finished" and last["state"]["status"] == 0, context

    # Every line chart gained points and moved right while the job ran.
    for panel in LINE_PANELS:
        assert advanced(snaps, panel), f"panel {panel} did not advance\n{context}"
    for label in ("job", "worker rank 0", "worker rank 1", "worker rank 2"):
        assert series_advanced(snaps, "throughput", label), f"samples/s of {label}\n{context}"
    for label in ("train loss", "test accuracy"):
        assert series_advanced(snaps, "loss-step", label), f"{label} against step\n{context}"
        assert series_advanced(snaps, "loss-time", label), f"{label} against time\n{context}"
    for label in ("noise scale", "gradient variance", "SNR", "batch size (per worker)", "learning rate"):
        assert series_advanced(snaps, "gradients", label), f"{label}\n{context}"
    assert series_advanced(snaps, "cluster", "workers training (rank 0)"), context
    assert last["panels"]["cluster"]["series"]["cluster size"] >= 3, context  # initial, resize, up to the end
    assert last["cluster"] == {"version": 1, "size": 3, "versions": 2}, context

    # Step time: a bar per worker of the current cluster, redrawn from later steps; a worker is marked a straggler
    # exactly when its compute time is at least 1.2 times the median.
    assert advanced(snaps, "steptime"), context
    steptime = last["panels"]["steptime"]
    assert steptime["ranks"] == [0, 1, 2], context
    for key in ("compute_ms", "communication_ms", "wait_ms"):
        assert len(steptime[key]) == 3 and all(v >= 0 for v in steptime[key]), context
    assert all(v > 0 for v in steptime["compute_ms"]), context
    for s in snaps:
        st = s["panels"].get("steptime")
        if not st or len(st["ranks"]) < 2:
            continue
        expected = [r for r, c in zip(st["ranks"], st["compute_ms"]) if c >= 1.2 * st["median_compute_ms"] > 0]
        assert st["stragglers"] == expected, json.dumps(st)

    # Links: each worker's measurements of its links reach the heat map, which follows the cluster to 3 workers
    # and takes new probes as they come.
    assert advanced(snaps, "links"), context
    assert any(s["panels"].get("links", {}).get("ranks") == [0, 1, 2] and s["panels"]["links"]["cells"] == 6
               for s in snaps), \
        f"the 3x3 link matrix was never full\n{context}"
    for cell in last["panels"]["links"]["measured"]:
        assert cell["latency_seconds"] is None or 0 < cell["latency_seconds"] < 1, cell
        assert cell["bandwidth_bytes_per_second"] is None or cell["bandwidth_bytes_per_second"] > 0, cell

    # Annotations: the resize (asked by aikido-ctl) and the policy's decision, on the time axes and in the list.
    kinds = {a["kind"]: a for a in last["annotations"]}
    assert "resize" in kinds and "asked by aikido-ctl" in kinds["resize"]["text"], context
    assert "cluster version 1: 3 workers" in kinds["resize"]["text"], context
    assert "policy" in kinds, context
    assert "schedule changed lr from 0.05 to 0.02" in kinds["policy"]["text"], context
    assert kinds["policy"]["step"] == 300, context
    for a in (kinds["resize"], kinds["policy"]):
        assert 0 <= a["t"] <= last["time"], context

    with open(run["screenshot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with capsys.disabled():
        print(f"\nscreenshot of the live dashboard: {run['screenshot']}")


def test_replay_shows_the_finished_run(run, capsys):
    assert run["returncode"] == 0, describe(run)
    with open(run["metrics_file"]) as f:
        recorded = [json.loads(line) for line in f if line.strip()]
    assert any(r.get("event") == "job_finished" for r in recorded)
    assert sum(1 for r in recorded if "rank" in r and "event" not in r) >= 10
    replay = subprocess.Popen([RUN, "--dashboard", "0", "--replay", str(run["metrics_file"])], env=base_env(),
                              text=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = Lines(replay.stderr)
    session = None
    try:
        m = err.wait_for(r"dashboard at (http://127\.0\.0\.1:(\d+)/) shows (\d+) records of ", 30)
        assert m, err.text()
        url, port, count = m.group(1), int(m.group(2)), int(m.group(3))
        assert count == len(recorded)
        # Plain HTTP: the page, its script, the chart library, and every record then the replay's own.
        for path, marker in (("/", "<canvas>"), ("/app.js", "EventSource"), ("/chart.js", "Chart")):
            status, body = http_get(port, path)
            assert status == 200 and marker in body, path
        records = read_events(port, count + 1)
        assert len(records) == count + 1
        assert records[:count] == recorded
        assert records[-1]["event"] == "replay"
        # A browser that reconnects continues after the last record it got.
        assert read_events(port, 2, last_event_id=count - 2) == records[count - 1:]

        chromium = browser.find_chromium()
        if chromium:
            session = browser.Browser(chromium)
            page = session.open(url)
            state = None
            for _ in range(120):
                state = json.loads(snapshot_state(page) or "null")
                if state and state["received"]["records"] == count + 1 and state["state"]["state"] == "finished":
                    break
                time.sleep(0.25)
            context = json.dumps(state, indent=1)[:6000]
            assert state and state["received"]["records"] == count + 1, context
            assert state["state"]["detail"].startswith("replay of "), context
            for panel in LINE_PANELS:
                assert state["panels"][panel]["points"] > 0, f"{panel}\n{context}"
            assert state["panels"]["steptime"]["ranks"] == [0, 1, 2], context
            assert state["panels"]["links"]["cells"] > 0, context
            assert {"resize", "policy"} <= {a["kind"] for a in state["annotations"]}, context
            # The replay's time axis ends with the run, not when the replay began.
            live = run["snapshots"][-1] if run["snapshots"] else None
            if live:
                assert abs(state["time"] - live["time"]) < 1, context
            shot = page.screenshot(os.path.join(OUTPUT_DIR, "replay.png"))
            with capsys.disabled():
                print(f"\nscreenshot of the replayed dashboard: {shot}")
    finally:
        if session:
            session.close()
        if replay.poll() is None:
            replay.send_signal(signal.SIGINT)
        assert replay.wait(timeout=30) == 0


def grafana_metric_names(dashboard):
    """Every metric name the dashboard's queries (targets' and annotations' `expr`) name."""
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    functions = {"sum", "avg", "min", "max", "count", "by", "without", "rate", "irate", "increase", "changes",
                 "delta", "deriv", "quantile", "topk", "bottomk", "on", "ignoring", "group_left", "group_right",
                 "and", "or", "unless", "bool", "offset", "label_replace", "clamp_min", "clamp_max", "abs", "time",
                 "timestamp", "vector", "scalar", "max_over_time", "min_over_time", "avg_over_time", "last_over_time",
                 "resets", "sort", "sort_desc", "histogram_quantile"}
    names = set()
    for expr in exprs:
        # Without label matchers and strings (label values), the identifiers left are functions, keywords and
        # metric names; label names in by (...) are dropped with the grouping clauses.
        text = re.sub(r'"[^"]*"', "", expr)
        text = re.sub(r"\{[^}]*\}", "", text)
        text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
        text = re.sub(r"\[[^\]]*\]", "", text)
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
            if word not in functions and not word.startswith("$"):
                names.add(word)
    return exprs, names


def test_grafana_dashboard_queries_only_exported_metrics(run):
    with open(GRAFANA) as f:
        dashboard = json.load(f)
    exprs, queried = grafana_metric_names(dashboard)
    assert exprs, f"{GRAFANA} has no Prometheus queries"
    exported = set()
    for text in run["prometheus"]:
        exported |= metric_names(text)
    assert run["prometheus"], "/metrics was never read\n" + describe(run)
    missing = sorted(queried - exported)
    assert not missing, (f"{GRAFANA} queries metrics that aikido-run's /metrics did not serve during a training run: "
                         f"{missing}\nserved: {sorted(exported)}")
    # Every panel of the live page has its counterpart.
    titles = " | ".join(p.get("title", "") for p in dashboard["panels"]).lower()
    for words in ("samples", "step time", "loss", "accuracy", "cluster", "noise scale", "link", "job"):
        assert words in titles, f"no panel about {words} in {GRAFANA}: {titles}"
    annotations = [a.get("expr", "") for a in dashboard["annotations"]["list"]]
    assert any("aikido_job_events_total" in a for a in annotations), annotations


def source_metric_names():
    """The metric names the sources export: the workers' (src/monitor/metrics.cpp: aikido_ + each field's name) and
    aikido-run's own (tools/aikido-run/metrics_exporter.cpp)."""
    names = set()
    with open(os.path.join(ROOT, "src", "monitor", "metrics.cpp")) as f:
        text = f.read()
    fields = text[text.index("numeric_fields("):text.index("std::string number(")]
    names |= {"aikido_" + n for n in re.findall(r'\{"([a-z_]+)", "', fields)}
    names |= {"aikido_" + n for n in re.findall(r'\{"(link_[a-z_]+)", "', text)}
    names.add("aikido_info")
    with open(os.path.join(ROOT, "tools", "aikido-run", "metrics_exporter.cpp")) as f:
        names |= set(re.findall(r"# TYPE (aikido_job_[a-z_]+) ", f.read()))
    return names


def test_grafana_dashboard_queries_only_metrics_of_the_sources():
    """The same check without a training run (which needs LibTorch): against the names in the sources."""
    with open(GRAFANA) as f:
        _, queried = grafana_metric_names(json.load(f))
    exported = source_metric_names()
    assert {"aikido_samples_per_second", "aikido_link_latency_seconds", "aikido_job_events_total"} <= exported
    assert not sorted(queried - exported), f"not exported by the sources: {sorted(queried - exported)}"


def synthetic_run(path):
    """A recorded run written by hand: 3 workers of which rank 2 computes twice as long, and one event of every kind
    the page annotates. Returns the number of records."""
    t = 1_800_000_000.0
    events = [
        (0.0, {"event": "job_started", "job": "cafe01", "workers": 3, "elastic": True, "program": "/x/train"}),
        (0.1, {"event": "cluster", "version": 0, "size": 3, "reason": "initial", "by": ""}),
        (2.0, {"event": "cluster", "version": 1, "size": 2, "reason": "resize", "by": "policy schedule"}),
        (3.0, {"event": "failure", "id": 1, "rank": 1, "version": 1, "what": "was killed by signal SIGKILL"}),
        (3.1, {"event": "cluster", "version": 2, "size": 3, "reason": "lost", "by": "aikido-run"}),
        (4.0, {"event": "recovery", "version": 2, "size": 3, "seconds": 0.9}),
        (5.0, {"event": "checkpoint", "path": "/tmp/c", "text": "rank 0: wrote the last commit (step 40) to /tmp/c"}),
        (5.5, {"event": "cluster", "version": 3, "size": 3, "reason": "restart", "by": "aikido-run"}),
        (6.0, {"event": "policy", "policy": "adaptive-batch", "hook": "after_step", "setting": "batch_size",
               "from": "64", "to": "128", "step": 50, "metrics": {"noise_scale": 900.0}}),
        (8.0, {"event": "job_finished", "state": "failed", "status": 1}),
    ]
    records = [dict(e, time=t + dt) for dt, e in events]
    for i in range(1, 8):
        for rank in range(3):
            compute = 0.02 if rank == 2 else 0.01
            records.append({"time": t + i, "rank": rank, "step": 10 * i, "workers": 3, "batch_size": 64,
                            "lr": 0.05, "noise_scale": 100.0 * i, "gradient_variance": 1.0, "snr": 0.5,
                            "epsilon": 0.5 * i,
                            "samples_per_second": 9000.0, "local_samples_per_second": 3000.0,
                            "train_loss": 1.0 / i, "test_accuracy": 0.5 + 0.05 * i,
                            "local_compute_seconds": compute, "local_communication_seconds": 0.004,
                            "local_wait_seconds": 0.003,
                            "links": [{"peer": p, "latency_seconds": 5e-5, "bandwidth_bytes_per_second": 2e9,
                                       "probes": i} for p in range(3) if p != rank]})
    records.sort(key=lambda r: r["time"])
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return len(records)


@pytest.mark.skipif(browser.find_chromium() is None,
                    reason="chromium is not installed (scripts/setup.sh installs Debian's chromium): "
                           "the dashboard is not tested in a browser")
def test_page_marks_stragglers_and_annotates_every_kind_of_event(tmp_path):
    if not os.path.exists(RUN):
        pytest.skip(f"{RUN} is not built")
    path = tmp_path / "recorded.jsonl"
    count = synthetic_run(path)
    replay = subprocess.Popen([RUN, "--dashboard", "0", "--replay", str(path)], env=base_env(), text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = Lines(replay.stderr)
    try:
        m = err.wait_for(r"dashboard at (http://127\.0\.0\.1:\d+/) shows ", 30)
        assert m, err.text()
        with browser.Browser(browser.find_chromium()) as session:
            page = session.open(m.group(1))
            state = None
            for _ in range(120):
                state = json.loads(snapshot_state(page) or "null")
                if state and state["received"]["records"] == count + 1:
                    break
                time.sleep(0.25)
            context = json.dumps(state, indent=1)[:6000]
            assert state and state["received"]["records"] == count + 1, context
            steptime = state["panels"]["steptime"]
            assert steptime["ranks"] == [0, 1, 2] and steptime["stragglers"] == [2], context
            assert page.evaluate("document.querySelector('#stragglers li[data-rank=\"2\"]').textContent") == \
                "straggler: rank 2 computes 2.00x the median"
            texts = {}
            for a in state["annotations"]:
                texts.setdefault(a["kind"], []).append(a["text"])
            assert texts.get("resize") == ["cluster version 1: 2 workers (resize, asked by policy schedule)",
                                           "cluster version 2: 3 workers (a lost worker, removed by aikido-run)"], \
                context
            assert texts.get("failure") == ["worker 1 (rank 1) was killed by signal SIGKILL"], context
            assert texts.get("recovery") == ["recovered at cluster version 2 in 0.90 s"], context
            assert texts.get("checkpoint") == ["rank 0: wrote the last commit (step 40) to /tmp/c"], context
            assert texts.get("restart") == ["cluster version 3: 3 workers (restart, asked by aikido-run)"], context
            assert texts.get("policy") == ["adaptive-batch changed batch_size from 64 to 128 in after_step at step 50 "
                                           "on noise_scale 900"], context
            assert state["state"]["state"] == "failed" and state["state"]["status"] == 1, context
            assert state["cluster"] == {"version": 3, "size": 3, "versions": 4}, context
            assert state["panels"]["links"]["cells"] == 6, context
            # A run with differential privacy shows the epsilon spent (rank 0's, one point per record).
            assert state["panels"]["gradients"]["series"].get("epsilon (privacy spent)") == 7, context
            listed = page.evaluate("[...document.querySelectorAll('#event-list li')].map(li => li.dataset.kind)")
            assert listed == ["resize", "failure", "resize", "recovery", "checkpoint", "restart", "policy"]
    finally:
        if replay.poll() is None:
            replay.send_signal(signal.SIGINT)
        assert replay.wait(timeout=30) == 0
