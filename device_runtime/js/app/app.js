// The page: settings in (URL ?server=, #token=, the form), the worker does the training, progress out.
// window.splitexportRun = {state: 'idle'|'running'|'done'|'error', history, error, ...} for automation.
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const hash = new URLSearchParams(location.hash.slice(1));
$('server').value = params.get('server') ?? location.origin;
$('token').value = hash.get('token') ?? '';
for (const [key, id] of [['epochs', 'epochs'], ['batch', 'batch'], ['backend', 'backend']]) {
  if (params.has(key)) $(id).value = params.get(key);
}
const run = (window.splitexportRun = { state: 'idle', history: [], error: null });
const fmt = (v) => (Number.isFinite(v) ? v.toFixed(4) : '—');

function status(text, state) {
  $('status').textContent = text;
  $('status').dataset.state = state;
  run.state = state;
}

$('form').addEventListener('submit', (event) => {
  event.preventDefault();
  start().catch((err) => { run.error = err.message; status(`error: ${err.message}`, 'error'); });
});

async function start() {
  const file = $('data').files[0];
  if (file == null) { status('choose a data file first', 'error'); run.error = 'no data file'; return; }
  $('start').disabled = true;
  $('history').querySelector('tbody').replaceChildren();
  status('loading the segments…', 'running');
  const worker = new Worker(new URL('worker.js', import.meta.url), { type: 'module' });
  worker.onmessage = ({ data: m }) => {
    if (m.type === 'loaded') {
      $('progress').max = m.totalSteps;
      status(`training (${m.split} split, ${m.backend} backend, session ${m.sessionId})`, 'running');
    } else if (m.type === 'step') {
      $('progress').value = m.steps;
      $('steps').textContent = `${m.steps} / ${$('progress').max} steps, loss ${fmt(m.loss)}`;
    } else if (m.type === 'epoch') {
      run.history.push(m);
      const row = document.createElement('tr');
      row.dataset.epoch = String(m.epoch);
      for (const v of [m.epoch, fmt(m.trainLoss), fmt(m.trainAccuracy), fmt(m.testLoss), fmt(m.testAccuracy)]) {
        row.append(Object.assign(document.createElement('td'), { textContent: String(v) }));
      }
      $('history').querySelector('tbody').append(row);
    } else if (m.type === 'done') {
      Object.assign(run, { history: m.history, steps: m.steps, seconds: m.seconds, sessionId: m.sessionId });
      $('progress').value = m.steps;
      $('final').textContent = fmt(m.history.at(-1).testAccuracy);
      status(`done: ${m.steps} steps in ${m.seconds.toFixed(1)} s`, 'done');
      worker.terminate();
      $('start').disabled = false;
    } else if (m.type === 'error') {
      run.error = m.message;
      status(`error: ${m.message}`, 'error');
      worker.terminate();
      $('start').disabled = false;
    }
  };
  worker.onerror = (e) => { run.error = e.message; status(`worker error: ${e.message}`, 'error'); };
  worker.postMessage({ server: $('server').value, token: $('token').value, data: await file.arrayBuffer(),
    epochs: Number($('epochs').value), batchSize: Number($('batch').value), backend: $('backend').value,
    maxWaitMs: Number(params.get('maxWaitMs') ?? 60000) });
}
