// The live page of an aikido-run job: one server-sent-event stream (/events) of records, each a worker's metrics
// ({time, rank, ...}) or one of aikido-run's events ({time, event, ...}); see tools/aikido-run/dashboard.hpp.
'use strict';

const colors = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f'];
let t0 = null;               // time of the first record: the time axes count seconds from it
const latest = new Map();    // rank -> its latest metrics
const annotations = [];      // {t, step, kind, text}
let lastStep = 0;

// Vertical lines at the annotations' times (or steps, on step axes), labelled with their kind.
const annotationLines = {
  id: 'annotationLines',
  afterDatasetsDraw(chart) {
    const axis = chart.options.annotate;
    if (!axis) return;
    const x = chart.scales.x, area = chart.chartArea, ctx = chart.ctx;
    ctx.save();
    for (const a of annotations) {
      const v = axis === 'step' ? a.step : a.t;
      if (v == null || v < x.min || v > x.max) continue;
      const px = x.getPixelForValue(v);
      ctx.strokeStyle = a.kind === 'failure' ? '#b00' : a.kind === 'policy' ? '#0a0' : '#036';
      ctx.setLineDash([4, 3]);
      ctx.beginPath(); ctx.moveTo(px, area.top); ctx.lineTo(px, area.bottom); ctx.stroke();
      ctx.fillStyle = ctx.strokeStyle;
      ctx.font = '10px sans-serif';
      ctx.fillText(a.kind, px + 2, area.top + 10);
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
                       [['y', 'noise scale, batch', 'left', 'logarithmic'], ['y1', 'variance, SNR, lr', 'right',
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
  push(charts.cluster, 'workers', 'y', '#1f77b4', t, m.workers);
  push(charts.gradients, 'noise scale', 'y', '#9467bd', t, m.noise_scale);
  push(charts.gradients, 'batch size (per worker)', 'y', '#8c564b', t, m.batch_size);
  push(charts.gradients, 'gradient variance', 'y1', '#d62728', t, m.gradient_variance);
  push(charts.gradients, 'SNR', 'y1', '#e377c2', t, m.snr);
  push(charts.gradients, 'learning rate', 'y1', '#7f7f7f', t, m.lr);
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
  document.getElementById('steptime').dataset.points = String(c.data.labels.length ? Number(
    document.getElementById('steptime').dataset.updates || 0) : 0);
}

function drawLinks() {
  const ranks = currentRanks();
  const table = document.getElementById('link-matrix');
  let html = '<tr><th>from \\ to</th>' + ranks.map(r => `<th>${r}</th>`).join('') + '</tr>';
  let cells = 0;
  let slowest = 0;
  for (const r of ranks) for (const l of latest.get(r).links || []) slowest = Math.max(slowest, l.latency_seconds || 0);
  for (const r of ranks) {
    html += `<tr><th>${r}</th>`;
    for (const p of ranks) {
      const l = (latest.get(r).links || []).find(x => x.peer === p);
      if (p === r || !l || l.latency_seconds == null) { html += '<td></td>'; continue; }
      cells++;
      const heat = slowest > 0 ? Math.round(255 * (1 - l.latency_seconds / slowest) ) : 255;
      html += `<td style="background: rgb(255, ${heat}, ${heat})">${(l.latency_seconds * 1e6).toFixed(0)} &micro;s` +
              `<br>${l.bandwidth_bytes_per_second != null ? (l.bandwidth_bytes_per_second / 1e9).toFixed(2) : '?'}` +
              ' GB/s</td>';
    }
    html += '</tr>';
  }
  table.innerHTML = html;
  document.getElementById('links').dataset.cells = String(cells);
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

function setState(state, detail) {
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
      setState('running', `${e.workers} workers`);
      break;
    case 'cluster':
      push(charts.cluster, 'cluster version', 'y', '#ff7f0e', t, e.version);
      push(charts.cluster, 'workers', 'y', '#1f77b4', t, e.size);
      if (e.reason !== 'initial') {
        const kind = e.reason === 'restart' ? 'restart' : 'resize';
        const by = e.by ? e.by : e.reason === 'lost' ? 'a lost worker' : 'unknown';
        annotate(t, lastStep, kind, `cluster version ${e.version}: ${e.size} workers (${e.reason}, asked by ${by})`);
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
      setState(e.state, `exit status ${e.status}`);
      break;
    case 'replay':
      setState(document.getElementById('state').dataset.state || 'finished', `replay of ${e.file}`);
      break;
  }
}

let dirty = false;
function redraw() {
  dirty = false;
  drawStepTimes();
  drawLinks();
  for (const [name, id] of [['throughput', 'throughput'], ['lossStep', 'loss-step'], ['lossTime', 'loss-time'],
                            ['cluster', 'cluster'], ['gradients', 'gradients']]) {
    charts[name].update('none');
    const panel = document.getElementById(id);
    panel.dataset.points = String(points(charts[name]));
    const xs = charts[name].data.datasets.flatMap(d => d.data.map(p => p.x));
    panel.dataset.last = xs.length ? String(Math.max(...xs)) : '';
  }
  const c = charts.steptime;
  c.update('none');
  const st = document.getElementById('steptime');
  st.dataset.updates = String(Number(st.dataset.updates || 0) + 1);
  st.dataset.points = String(c.data.labels.length ? Number(st.dataset.updates) : 0);
  st.dataset.last = String(lastStep);
}

const source = new EventSource('events');
source.onmessage = message => {
  const record = JSON.parse(message.data);
  if (t0 === null) t0 = record.time;
  if (record.event !== undefined) onEvent(record); else if (record.rank !== undefined) onMetrics(record);
  if (!dirty) { dirty = true; setTimeout(redraw, 250); }
};
source.onerror = () => {
  const state = document.getElementById('state').dataset.state;
  if (state === 'running' || !state) setState('disconnected', 'aikido-run is gone or unreachable');
};
