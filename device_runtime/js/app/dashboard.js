// The operator's dashboard: polls GET /v1/dashboard (token from #token=...) and redraws; no framework.
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.hash.slice(1)).get('token');
const POLL_MS = Number(new URLSearchParams(location.search).get('poll') ?? 1000);
const samples = []; // [time s, steps applied]
window.splitexportDashboard = { polls: 0, last: null };

function rows(tbody, data) {
  $(tbody).querySelector('tbody').replaceChildren(...data.map((cells) => {
    const tr = document.createElement('tr');
    for (const c of cells) tr.append(Object.assign(document.createElement('td'), { textContent: String(c) }));
    return tr;
  }));
}

/** Lines on a canvas; series: [{points: [[x, y]], color, label}], each axis scaled to its data. */
function plot(canvas, series) {
  const ctx = canvas.getContext('2d');
  const { width: w, height: h } = canvas;
  ctx.clearRect(0, 0, w, h);
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return;
  const [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  const [y0, y1] = [Math.min(0, ...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  const sx = (x) => 40 + ((x - x0) / (x1 - x0 || 1)) * (w - 50);
  const sy = (y) => h - 20 - ((y - y0) / (y1 - y0 || 1)) * (h - 30);
  ctx.font = '11px sans-serif';
  ctx.fillStyle = '#666';
  ctx.fillText(y1.toPrecision(3), 2, 12);
  ctx.fillText(y0.toPrecision(3), 2, h - 20);
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color;
    ctx.beginPath();
    s.points.forEach(([x, y], j) => (j ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
    ctx.stroke();
    ctx.fillStyle = s.color;
    ctx.fillText(s.label, 50 + i * 140, h - 4);
  });
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b'];

function render(d) {
  const t = d.time;
  samples.push([t, d.steps_applied]);
  while (samples.length > 600) samples.shift();
  const back = samples.find((s) => s[0] >= t - 5) ?? samples[0];
  const rate = t > back[0] ? (d.steps_applied - back[1]) / (t - back[0]) : 0;
  $('sessions').textContent = d.sessions.length;
  $('steps').textContent = d.steps_applied;
  $('rate').textContent = rate.toFixed(1);
  $('requests').textContent = `${d.counters.requests_total ?? 0} / ${d.counters.errors_total ?? 0}`;
  $('strategy').textContent = d.strategy ? `${d.strategy.strategy}, round ${d.strategy.round}` : 'none (sequential)';
  plot($('steps-plot'), [{ points: samples.map(([s, n]) => [s - samples[0][0], n]), color: COLORS[0], label: 'steps applied' }]);
  const series = [];
  const table = [];
  Object.entries(d.device_metrics).forEach(([sid, ms], i) => {
    const x = (m) => m.epoch ?? m.round ?? 0;
    series.push({ points: ms.filter((m) => m.loss != null).map((m) => [x(m), m.loss]), color: COLORS[(2 * i) % 6], label: `${sid.slice(0, 6)} loss` });
    series.push({ points: ms.filter((m) => m.accuracy != null).map((m) => [x(m), m.accuracy]), color: COLORS[(2 * i + 1) % 6], label: `${sid.slice(0, 6)} accuracy` });
    for (const m of ms) table.push([sid, x(m), m.loss?.toFixed(4) ?? '—', m.accuracy?.toFixed(4) ?? '—']);
  });
  plot($('metrics-plot'), series);
  rows('metrics', table);
  rows('phases', Object.entries(d.phases_ms).map(([k, v]) => [k, v.toFixed(3)]));
  rows('session-table', d.sessions.map((s) => [s.session_id, s.next_step, s.expected, s.idle_s]));
  $('status').textContent = `${d.split} split, server segment ${d.segment}; updated ${new Date(t * 1000).toLocaleTimeString()}`;
  $('status').dataset.state = 'done';
}

async function poll() {
  try {
    const r = await fetch('/v1/dashboard', { headers: token ? { Authorization: `Bearer ${token}` } : {} });
    const body = await r.json();
    if (!r.ok) throw new Error(`${r.status} ${body.error?.code}: ${body.error?.message} (add #token=... to the URL)`);
    window.splitexportDashboard.polls += 1;
    window.splitexportDashboard.last = body;
    render(body);
  } catch (err) {
    $('status').textContent = `error: ${err.message}`;
    $('status').dataset.state = 'error';
  }
  setTimeout(poll, POLL_MS);
}
poll();
