// The live page of an aikido-run job: one server-sent-event stream (/events) of records, each a worker's metrics
// ({time, rank, ...}) or one of aikido-run's events ({time, event, ...}); see tools/aikido-run/dashboard.hpp.
'use strict';

const colors = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f'];
let t0 = null;               // time of the first record: the time axes count seconds from it
const latest = new Map();    // rank -> its latest metrics
const annotations = [];      // {t, step, kind, text}
const clusterVersions = [];  // {t, version, size, reason, by}: the cluster events, in order
let lastStep = 0;
let lastTime = 0;            // seconds since t0 of the latest record
let jobState = { state: 'connecting', detail: '', status: null, job: '' };
const received = { records: 0, metrics: 0, events: 0 };

// Vertical lines at the annotations' times (or steps, on step axes), labelled with their kind.
const annotationLines = {
  id: 'annotationLines',
  afterDatasetsDraw(chart) {
    const axis = chart.options.annotate;
    if (!axis) return;
    const x = chart.scales.x, area = chart.chartArea, ctx = chart.ctx;
    ctx.save();
    let lastPx = -Infinity, row = 0;
    for (const a of annotations) {
      const v = axis === 'step' ? a.step : a.t;
      if (v == null || v < x.min || v > x.max) continue;
      const px = x.getPixelForValue(v);
      // Labels of lines close together go on separate rows.
      row = px - lastPx < 60 ? (row + 1) % 4 : 0;
      lastPx = px;
      ctx.strokeStyle = a.kind === 'failure' ? '#b00' : a.kind === 'policy' ? '#0a0' : '#036';
      ctx.setLineDash([4, 3]);
      ctx.beginPath(); ctx.moveTo(px, area.top); ctx.lineTo(px, area.bottom); ctx.stroke();
      ctx.fillStyle = ctx.strokeStyle;
      ctx.font = '10px sans-serif';
      ctx.fillText(a.kind, px + 2, area.top + 10 + 11 * row);
    }
    ctx.restore();
  },
};
Chart.register(annotationLines);

function lineChart(id, xTitle, annotate, axes) {
  const scales = { x: { type: 'linear', title: { display: true, text: xTitle } } };
  for (const [name, title, position, type] of axes) {
    scales[name] = { type: type || 'linear', position, title: { display: true, text: title } };
  }
  return new Chart(document.querySelector(`#${id} canvas`), {
    type: 'line',
    data: { datasets: [] },
    options: { animation: false, parsing: false, normalized: true, annotate, scales,
               elements: { point: { radius: 0 } }, plugins: { legend: { position: 'bottom' } } },
  });
}

const charts = {
  throughput: lineChart('throughput', 'seconds', 'time', [['y', 'samples/s', 'left']]),
  lossStep: lineChart('loss-step', 'step', 'step', [['y', 'train loss', 'left'], ['y1', 'test accuracy', 'right']]),
  lossTime: lineChart('loss-time', 'seconds', 'time', [['y', 'train loss', 'left'], ['y1', 'test accuracy', 'right']]),
  cluster: lineChart('cluster', 'seconds', 'time', [['y', 'workers / version', 'left']]),
  gradients: lineChart('gradients', 'seconds', 'time',
                       [['y', 'noise scale, batch', 'left', 'logarithmic'], ['y1', 'variance, SNR, lr, epsilon', 'right',
                                                                             'logarithmic']]),
  steptime: new Chart(document.querySelector('#steptime canvas'), {
    type: 'bar',
    data: { labels: [], datasets: [
      { label: 'compute', data: [], backgroundColor: '#1f77b4' },
      { label: 'communication', data: [], backgroundColor: '#ff7f0e' },
      { label: 'wait', data: [], backgroundColor: '#d62728' }] },
    options: { animation: false, scales: { x: { stacked: false }, y: { title: { display: true, text: 'ms' } } },
               plugins: { legend: { position: 'bottom' } } },
  }),
};

function series(chart, label, yAxisID, color) {
  let d = chart.data.datasets.find(s => s.label === label);
  if (!d) {
    d = { label, yAxisID, data: [], borderColor: color, backgroundColor: color, borderWidth: 1.5, stepped: false };
    chart.data.datasets.push(d);
  }
  return d;
}

function push(chart, label, yAxisID, color, x, y) {
  if (y == null || !isFinite(y)) return;
  if (chart.options.scales[yAxisID] && chart.options.scales[yAxisID].type === 'logarithmic' && !(y > 0)) return;
  const d = series(chart, label, yAxisID, color);
  if (d.data.length && d.data[d.data.length - 1].x === x) d.data[d.data.length - 1].y = y;
  else d.data.push({ x, y });
}

function points(chart) { return chart.data.datasets.reduce((n, d) => n + d.data.length, 0); }

function onMetrics(m) {
  const t = m.time - t0;
  latest.set(m.rank, m);
  const color = colors[m.rank % colors.length];
  push(charts.throughput, `worker rank ${m.rank}`, 'y', color, t, m.local_samples_per_second);
  if (m.rank !== 0) return;
  // Reduced across workers: rank 0's values stand for the job.
  if (m.step != null) lastStep = m.step;
  push(charts.throughput, 'job', 'y', '#000', t, m.samples_per_second);
  push(charts.lossStep, 'train loss', 'y', '#1f77b4', m.step, m.train_loss);
  push(charts.lossStep, 'test accuracy', 'y1', '#2ca02c', m.step, m.test_accuracy);
  push(charts.lossTime, 'train loss', 'y', '#1f77b4', t, m.train_loss);
  push(charts.lossTime, 'test accuracy', 'y1', '#2ca02c', t, m.test_accuracy);
  push(charts.cluster, 'workers training (rank 0)', 'y', '#2ca02c', t, m.workers);
  push(charts.gradients, 'noise scale', 'y', '#9467bd', t, m.noise_scale);
  push(charts.gradients, 'batch size (per worker)', 'y', '#8c564b', t, m.batch_size);
  push(charts.gradients, 'gradient variance', 'y1', '#d62728', t, m.gradient_variance);
  push(charts.gradients, 'SNR', 'y1', '#e377c2', t, m.snr);
  push(charts.gradients, 'learning rate', 'y1', '#7f7f7f', t, m.lr);
  // Differential privacy spent so far (DP-SGD or client-level DP; absent without it).
  push(charts.gradients, 'epsilon (privacy spent)', 'y1', '#17becf', t, m.epsilon);
}

// Ranks beyond the cluster's size left: their last values no longer describe a worker.
function currentRanks() {
  const size = latest.has(0) ? latest.get(0).workers : latest.size;
  return [...latest.keys()].filter(r => r < size).sort((a, b) => a - b);
}

function drawStepTimes() {
  const ranks = currentRanks().filter(r => latest.get(r).local_compute_seconds != null);
  const c = charts.steptime;
  c.data.labels = ranks.map(r => `rank ${r}`);
  const ms = key => ranks.map(r => 1e3 * (latest.get(r)[key] || 0));
  c.data.datasets[0].data = ms('local_compute_seconds');
  c.data.datasets[1].data = ms('local_communication_seconds');
  c.data.datasets[2].data = ms('local_wait_seconds');
  const compute = ranks.map(r => latest.get(r).local_compute_seconds).sort((a, b) => a - b);
  const median = compute.length ? compute[Math.floor((compute.length - 1) / 2)] : 0;
  const list = document.getElementById('stragglers');
  list.innerHTML = '';
  for (const r of ranks) {
    const v = latest.get(r).local_compute_seconds;
    if (ranks.length > 1 && median > 0 && v >= 1.2 * median) {
      const li = document.createElement('li');
      li.className = 'straggler';
      li.dataset.rank = r;
      li.textContent = `straggler: rank ${r} computes ${(v / median).toFixed(2)}x the median`;
      list.appendChild(li);
    }
  }
  c.data.datasets[0].backgroundColor = ranks.map(r => list.querySelector(`[data-rank="${r}"]`) ? '#b00' : '#1f77b4');
  return { ranks, compute_ms: ms('local_compute_seconds'), communication_ms: ms('local_communication_seconds'),
           wait_ms: ms('local_wait_seconds'), median_compute_ms: 1e3 * median,
           stragglers: [...list.children].map(li => Number(li.dataset.rank)),
           steps: ranks.map(r => latest.get(r).step) };
}

// The cluster's size and version as steps: each holds from its event until the next one, the last up to the latest
// record.
function drawCluster() {
  const c = charts.cluster;
  for (const [label, key, color] of [['cluster size', 'size', '#1f77b4'], ['cluster version', 'version', '#ff7f0e']]) {
    const d = series(c, label, 'y', color);
    d.stepped = 'before';
    d.data = clusterVersions.map(v => ({ x: v.t, y: v[key] }));
    if (clusterVersions.length) d.data.push({ x: Math.max(lastTime, clusterVersions.at(-1).t), y: clusterVersions.at(-1)[key] });
    d.data.forEach((p, i) => { if (i) p.x = Math.max(p.x, d.data[i - 1].x); });
  }
}

// Each worker measures its own links: row r is what rank r measured to each peer. A cell shows what is known
// (latency, bandwidth or both); its red deepens with the latency, relative to the slowest link.
function drawLinks() {
  const ranks = currentRanks();
  const table = document.getElementById('link-matrix');
  const measured = [];
  let html = '<tr><th>from \\ to</th>' + ranks.map(r => `<th>${r}</th>`).join('') + '</tr>';
  let slowest = 0;
  for (const r of ranks) for (const l of latest.get(r).links || []) slowest = Math.max(slowest, l.latency_seconds || 0);
  for (const r of ranks) {
    html += `<tr><th>${r}</th>`;
    for (const p of ranks) {
      const l = (latest.get(r).links || []).find(x => x.peer === p);
      const latency = l ? l.latency_seconds : null, bandwidth = l ? l.bandwidth_bytes_per_second : null;
      if (p === r) { html += '<td class="self"></td>'; continue; }
      if (latency == null && bandwidth == null) { html += '<td class="unmeasured">not yet</td>'; continue; }
      measured.push({ from: r, to: p, latency_seconds: latency, bandwidth_bytes_per_second: bandwidth,
                      probes: l.probes || 0 });
      const heat = slowest > 0 && latency != null ? Math.round(255 * (1 - latency / slowest)) : 255;
      html += `<td style="background: rgb(255, ${heat}, ${heat})">` +
              `${latency != null ? (latency * 1e6).toFixed(0) : '?'} &micro;s<br>` +
              `${bandwidth != null ? (bandwidth / 1e9).toFixed(2) : '?'} GB/s</td>`;
    }
    html += '</tr>';
  }
  table.innerHTML = html;
  const panel = document.getElementById('links');
  panel.dataset.cells = String(measured.length);
  panel.dataset.points = String(measured.reduce((n, m) => n + m.probes, 0));
  return { ranks, cells: measured.length, measured, probes: measured.reduce((n, m) => n + m.probes, 0) };
}

function annotate(t, step, kind, text) {
  annotations.push({ t, step, kind, text });
  const li = document.createElement('li');
  li.dataset.kind = kind;
  li.dataset.time = t.toFixed(3);
  li.textContent = `${t.toFixed(1)} s, step ${step}: ${kind}: ${text}`;
  document.getElementById('event-list').appendChild(li);
  document.getElementById('annotations').dataset.points = String(annotations.length);
}

function setState(state, detail, status) {
  jobState = { ...jobState, state, detail: detail || '', status: status === undefined ? jobState.status : status };
  const b = document.getElementById('state-text');
  b.textContent = state + (detail ? ` (${detail})` : '');
  b.className = state;
  const panel = document.getElementById('state');
  panel.dataset.state = state;
  panel.dataset.points = String(Number(panel.dataset.points) + 1);
}

function onEvent(e) {
  const t = e.time - t0;
  switch (e.event) {
    case 'job_started':
      document.getElementById('job').textContent = `${e.job} (${e.program.split('/').pop()})`;
      jobState.job = e.job;
      setState('running', `${e.workers} workers`);
      break;
    case 'cluster':
      clusterVersions.push({ t, version: e.version, size: e.size, reason: e.reason, by: e.by || '' });
      if (e.reason !== 'initial') {
        const kind = e.reason === 'restart' ? 'restart' : 'resize';
        const why = e.reason === 'lost' ? `a lost worker, removed by ${e.by || 'the survivors'}`
                                        : `${e.reason}, asked by ${e.by || 'unknown'}`;
        annotate(t, lastStep, kind, `cluster version ${e.version}: ${e.size} workers (${why})`);
      }
      break;
    case 'failure':
      annotate(t, lastStep, 'failure', `worker ${e.id} (rank ${e.rank}) ${e.what}`);
      break;
    case 'recovery':
      annotate(t, lastStep, 'recovery', `recovered at cluster version ${e.version} in ${e.seconds.toFixed(2)} s`);
      break;
    case 'checkpoint':
      annotate(t, lastStep, 'checkpoint', e.text || e.path);
      break;
    case 'policy': {
      const on = Object.entries(e.metrics || {}).filter(([, v]) => v != null)
                   .map(([k, v]) => `${k} ${Number(v).toPrecision(3)}`).join(', ');
      annotate(t, e.step, 'policy', `${e.policy} changed ${e.setting} from ${e.from} to ${e.to} in ${e.hook} ` +
                                    `at step ${e.step}${on ? ' on ' + on : ''}`);
      break;
    }
    case 'job_finished':
      setState(e.state, `exit status ${e.status}`, e.status);
      break;
    case 'replay':
      setState(document.getElementById('state').dataset.state || 'finished', `replay of ${e.file}`);
      break;
  }
}

// What the page shows, in numbers, for scripts and tests that read the page (window.aikidoState): per panel the
// points drawn and the largest x, per series its points, and the step-time bars, links and events as shown.
window.aikidoState = { received: { ...received }, state: { ...jobState }, panels: {}, annotations: [] };

let dirty = false;
function redraw() {
  dirty = false;
  const steptime = drawStepTimes();
  const links = drawLinks();
  drawCluster();
  const panels = {};
  for (const [name, id] of [['throughput', 'throughput'], ['lossStep', 'loss-step'], ['lossTime', 'loss-time'],
                            ['cluster', 'cluster'], ['gradients', 'gradients']]) {
    charts[name].update('none');
    const panel = document.getElementById(id);
    const xs = charts[name].data.datasets.flatMap(d => d.data.map(p => p.x));
    const last = xs.length ? Math.max(...xs) : null;
    panel.dataset.points = String(points(charts[name]));
    panel.dataset.last = last == null ? '' : String(last);
    panels[id] = { points: points(charts[name]), last,
                   series: Object.fromEntries(charts[name].data.datasets.map(d => [d.label, d.data.length])) };
  }
  charts.steptime.update('none');
  const st = document.getElementById('steptime');
  st.dataset.updates = String(Number(st.dataset.updates || 0) + 1);
  st.dataset.points = String(steptime.ranks.length);
  st.dataset.last = String(lastStep);
  panels.steptime = { ...steptime, points: steptime.ranks.length, last: lastStep };
  panels.links = { ...links, points: links.cells, last: links.probes };
  const cluster = clusterVersions.at(-1) || {};
  window.aikidoState = {
    received: { ...received }, time: lastTime, step: lastStep, state: { ...jobState },
    cluster: { version: cluster.version, size: cluster.size, versions: clusterVersions.length },
    panels, annotations: annotations.map(a => ({ ...a })),
  };
  document.body.dataset.records = String(received.records);
}

const source = new EventSource('events');
source.onmessage = message => {
  const record = JSON.parse(message.data);
  if (t0 === null) t0 = record.time;
  // The replay's own record is stamped when the replay began, not during the run.
  if (record.event !== 'replay') lastTime = Math.max(lastTime, record.time - t0);
  received.records++;
  if (record.event !== undefined) {
    received.events++;
    onEvent(record);
  } else if (record.rank !== undefined) {
    received.metrics++;
    onMetrics(record);
  }
  if (!dirty) { dirty = true; setTimeout(redraw, 250); }
};
source.onerror = () => {
  const state = document.getElementById('state').dataset.state;
  if (state === 'running' || !state) setState('disconnected', 'aikido-run is gone or unreachable');
};
