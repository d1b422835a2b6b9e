// Loading segments over HTTP with sha256 checks, the backend kernel check, and the client's fail-fast rule.
// Small models built in JS and served by a loopback node:http server (no Python needed); the real server and a
// real browser are exercised by tests/browser/.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import http from 'node:http';

import { DeviceRuntimeError, DeviceSegment, loadDeployedSegment, loadSegment, loadSegmentFromServer,
  ServerClient, ServerError, sha256Hex, tf } from '../src/index.js';

const hex = (b) => createHash('sha256').update(b).digest('hex');

/** model.json + shard + splitexport.json of a dense-relu-dense segment, as `splitexport export` lays them out. */
async function segmentFiles(isLast) {
  const model = tf.sequential();
  model.add(tf.layers.dense({ units: 5, inputShape: [4], activation: 'relu', name: 'fc1' }));
  model.add(tf.layers.dense({ units: 3, name: 'fc2' }));
  let files;
  await model.save(tf.io.withSaveHandler(async (a) => {
    const modelJson = { modelTopology: a.modelTopology, format: a.format, generatedBy: a.generatedBy,
      convertedBy: a.convertedBy, weightsManifest: [{ paths: ['group1-shard1of1.bin'], weights: a.weightSpecs }] };
    files = {
      'model.json': Buffer.from(JSON.stringify(modelJson)),
      'group1-shard1of1.bin': Buffer.from(a.weightData),
      'splitexport.json': Buffer.from(JSON.stringify({ is_last: isLast, input_shape: [4], output_shape: [3],
        optimizer: { name: 'sgd', lr: 0.1 } })),
    };
    return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
  }));
  return { model, files };
}

/** Serve `routes` (path -> Buffer) on loopback; returns the base URL and a closer. */
async function serve(routes) {
  const server = http.createServer((req, res) => {
    const body = routes[req.url];
    if (body == null) { res.writeHead(404).end('{"error":{"code":"not_found","message":"no"}}'); return; }
    res.writeHead(200).end(body);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => server.close(r)) };
}

const weightsEqual = (seg, model) => model.weights.forEach((w) =>
  assert.deepEqual(Array.from(seg.getWeights()[w.originalName].dataSync()), Array.from(w.read().dataSync())));

test('sha256Hex is the sha256 of the bytes', async () => {
  const b = Buffer.from('splitexport');
  assert.equal(await sha256Hex(b), hex(b));
});

test('loadSegment from a URL checks every file against its sha256', async () => {
  const { model, files } = await segmentFiles(false);
  const routes = Object.fromEntries(Object.entries(files).map(([k, v]) => [`/seg/${k}`, v]));
  const srv = await serve(routes);
  try {
    const sha256 = Object.fromEntries(Object.entries(files).map(([k, v]) => [k, hex(v)]));
    const seg = await loadSegment(`${srv.url}/seg/`, { sha256 });
    weightsEqual(seg, model);
    assert.equal(seg.isLast, false);
    // one flipped bit in the shard: refused, naming the file
    routes['/seg/group1-shard1of1.bin'] = Buffer.from(files['group1-shard1of1.bin']);
    routes['/seg/group1-shard1of1.bin'][0] ^= 1;
    await assert.rejects(loadSegment(`${srv.url}/seg/model.json`, { sha256 }),
      (e) => e instanceof DeviceRuntimeError && /group1-shard1of1\.bin: sha256 .* does not match/.test(e.message));
    const { 'splitexport.json': _, ...partial } = sha256;
    await assert.rejects(loadSegment(`${srv.url}/seg/`, { sha256: partial }), /no expected sha256 for splitexport.json/);
    await assert.rejects(loadSegment(`${srv.url}/nothing/`), /HTTP 404/);
  } finally {
    await srv.close();
  }
});

test('loadDeployedSegment and loadSegmentFromServer resolve model.json paths through the manifest', async () => {
  const { model, files } = await segmentFiles(true);
  const manifestFiles = Object.fromEntries(Object.entries(files).map(([k, v]) => [`tfjs/C/${k}`, hex(v)]));
  const manifest = { segments: [{ name: 'C', artifacts: { tfjs: { model: 'tfjs/C/model.json' } } }], files: manifestFiles };
  const routes = { '/assets/manifest.json': Buffer.from(JSON.stringify(manifest)),
    '/v1/manifest': Buffer.from(JSON.stringify({ manifest, device_files: manifestFiles })) };
  for (const [k, v] of Object.entries(files)) {
    routes[`/assets/tfjs/C/${k}`] = v;
    routes[`/v1/artifacts/${hex(v)}`] = v; // content-addressed: no relative path resolves here
  }
  const srv = await serve(routes);
  try {
    weightsEqual(await loadDeployedSegment(`${srv.url}/assets`, 'C'), model);
    const client = new ServerClient(srv.url, { maxWaitMs: 500 });
    const seg = await loadSegmentFromServer(client, 'C');
    weightsEqual(seg, model);
    assert.equal(seg.isLast, true);
    await assert.rejects(loadSegmentFromServer(client, 'B'), /no TF\.js segment "B" \(it has: C/);
    // the server sent other bytes under a hash: refused
    routes[`/v1/artifacts/${hex(files['model.json'])}`] = Buffer.from(files['model.json'].toString().replace('fc1', 'fcX'));
    await assert.rejects(loadSegmentFromServer(client, 'C'), /tfjs\/C\/model\.json .*does not match/);
  } finally {
    await srv.close();
  }
});

test('a backend without a kernel the training needs (Step: the relu gradient) is refused at load time', async () => {
  const { model } = await segmentFiles(false);
  const name = 'cpu-without-step';
  tf.registerBackend(name, () => new (tf.findBackend('cpu').constructor)(), 0);
  for (const k of tf.getKernelsForBackend('cpu')) {
    if (k.kernelName !== 'Step') tf.registerKernel({ ...k, backendName: name });
  }
  const seg = new DeviceSegment(model, { is_last: false, input_shape: [4], output_shape: [3] });
  const before = seg.getWeights()['fc1/kernel'].dataSync().slice();
  const kernels = await seg.checkBackend();
  assert.ok(kernels.includes('Step') && kernels.includes('BatchMatMul'), kernels.join());
  await tf.setBackend(name);
  try {
    await assert.rejects(seg.checkBackend(), (e) => e instanceof DeviceRuntimeError &&
      e.message.includes(`"${name}" TF.js backend cannot train`) && e.message.includes("'Step'"));
  } finally {
    await tf.setBackend('cpu');
  }
  assert.deepEqual(seg.getWeights()['fc1/kernel'].dataSync(), before); // the check changed nothing
});

test('a page on another origin fails at once when the server is unreachable; same-origin retries', async () => {
  const srv = await serve({});
  const url = srv.url;
  await srv.close(); // nothing listens there now
  const previous = globalThis.location;
  globalThis.location = { origin: 'http://page.example', href: 'http://page.example/' };
  try {
    const t0 = Date.now();
    await assert.rejects(new ServerClient(url, { maxWaitMs: 10_000 }).openSession(), (e) =>
      e instanceof ServerError && e.code === 'unreachable' && e.message.includes('--cors-origin http://page.example'));
    assert.ok(Date.now() - t0 < 2000, 'failed fast');
    globalThis.location = { origin: url, href: `${url}/app/` };
    const same = new ServerClient(url, { maxWaitMs: 600, backoffMs: 50 });
    await assert.rejects(same.openSession(), (e) => e instanceof ServerError && e.code === 'unreachable');
    assert.ok(same.retries >= 2, `same-origin failures are retried (${same.retries})`);
  } finally {
    globalThis.location = previous;
  }
  await assert.rejects(new ServerClient('not a url').openSession(), /invalid server URL/);
});
