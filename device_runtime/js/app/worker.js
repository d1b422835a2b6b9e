// The training Web Worker of the splitexport app (also a complete example of using the runtime in a worker):
// loads A (and C) from the server with sha256 checks, checks the backend's kernels, trains, reports.
// Messages in: {server, token, data: ArrayBuffer (safetensors x_train/y_train/x_test/y_test), epochs,
// batchSize, seed, backend}. Out: {type: 'loaded'|'step'|'epoch'|'done'|'error', ...}.
import { decodeSafetensors, loadSegmentFromServer, RemoteSegment, ServerClient, tf, trainSplit } from './runtime/index.js';

const KEYS = ['x_train', 'y_train', 'x_test', 'y_test'];

/** @param {ArrayBuffer} buffer */
function dataset(buffer) {
  const raw = decodeSafetensors(new Uint8Array(buffer));
  const missing = KEYS.filter((k) => raw[k] == null);
  if (missing.length) throw new Error(`the data file lacks ${missing.join(', ')} (it has ${Object.keys(raw).join(', ')})`);
  const t = (k) => tf.tensor(raw[k].data, raw[k].shape, raw[k].data instanceof Int32Array ? 'int32' : 'float32');
  return { xTrain: t('x_train'), yTrain: t('y_train'), xTest: t('x_test'), yTest: t('y_test') };
}

async function run(msg) {
  await tf.setBackend(msg.backend ?? 'cpu');
  await tf.ready();
  const client = new ServerClient(msg.server, { token: msg.token || null, maxWaitMs: msg.maxWaitMs ?? 60_000 });
  const { manifest } = await client.manifest();
  const a = await loadSegmentFromServer(client, 'A');
  const c = manifest.split === 'double' ? await loadSegmentFromServer(client, 'C') : null;
  const data = dataset(msg.data);
  const epochs = msg.epochs ?? 3;
  const batchSize = msg.batchSize ?? 32;
  const remote = await RemoteSegment.open(client);
  postMessage({ type: 'loaded', backend: tf.getBackend(), sessionId: remote.sessionId, split: manifest.split,
    totalSteps: epochs * Math.ceil(data.xTrain.shape[0] / batchSize) });
  const started = performance.now();
  let steps = 0;
  const reports = []; // sent without blocking training; awaited before 'done' (the page then ends the worker)
  const history = await trainSplit({
    a, c, remote, data, epochs, batchSize, seed: msg.seed ?? 0, loss: manifest.loss?.kind,
    onStep: (s) => { steps += 1; if (steps % 5 === 0) postMessage({ type: 'step', steps, loss: s.loss }); },
    onEpoch: (e) => {
      postMessage({ type: 'epoch', ...e });
      reports.push(client.reportMetrics(remote.sessionId, { epoch: e.epoch, train_loss: e.trainLoss, loss: e.testLoss,
        accuracy: e.testAccuracy }));
    },
  });
  const failed = (await Promise.allSettled(reports)).filter((r) => r.status === 'rejected');
  if (failed.length) console.warn(`${failed.length} metrics reports failed: ${failed[0].reason}`);
  postMessage({ type: 'done', history, steps, seconds: (performance.now() - started) / 1000, sessionId: remote.sessionId });
}

onmessage = (event) => {
  run(event.data).catch((err) => postMessage({ type: 'error', message: err?.message ?? String(err), name: err?.name }));
};
