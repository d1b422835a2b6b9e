// The custom layers of the exports (src/layers.js) and integer token-id inputs in the runtime.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { DeviceRuntimeError, DeviceSegment, tf } from '../src/index.js';
import { SplitexportLayer } from '../src/layers.js';

const maxAbs = (a, b) => tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]);

/** ids [N, 5] -> Embedding(10, 4) -> positional table (6 rows) -> GRU(4 -> 3), as the Python exporter writes it. */
function textModel() {
  const input = tf.input({ shape: [5], dtype: 'int32', name: 'input' });
  const emb = tf.layers.embedding({ inputDim: 10, outputDim: 4, name: 'emb' }).apply(input);
  const pos = new SplitexportLayer({ name: 'pos', op: 'positional', weightNames: ['embeddings'], weightShapes: [[6, 4]] })
    .apply(emb);
  const gru = new SplitexportLayer({
    name: 'gru', op: 'gru', attrs: { hidden: 3 },
    weightNames: ['weightIh', 'weightHh', 'biasIh', 'biasHh'], weightShapes: [[9, 4], [9, 3], [9], [9]],
  }).apply(pos);
  const model = tf.model({ inputs: input, outputs: gru });
  model.setWeights(model.weights.map((w, i) => tf.randomNormal(w.shape, 0, 0.5, 'float32', i + 1)));
  return model;
}

test('SplitexportLayer survives a topology round trip (camel-cased config, snake-case weight names)', async () => {
  const model = textModel();
  assert.deepEqual(model.weights.map((w) => w.originalName),
    ['emb/embeddings', 'pos/embeddings', 'gru/weight_ih', 'gru/weight_hh', 'gru/bias_ih', 'gru/bias_hh']);
  const saved = await new Promise((resolve) => {
    model.save(tf.io.withSaveHandler(async (artifacts) => { resolve(artifacts); return { modelArtifactsInfo: {} }; }));
  });
  const loaded = await tf.loadLayersModel(tf.io.fromMemory(saved));
  const ids = tf.tensor2d([[0, 1, 2, 3, 9], [4, 4, 4, 4, 4]], undefined, 'int32');
  const a = model.predict(ids);
  const b = loaded.predict(ids);
  assert.deepEqual(b.shape, [2, 5, 3]);
  assert.equal(maxAbs(a, b), 0);
  // the GRU's first step by hand: h1 = (1 - z) * n from a zero state
  const w = Object.fromEntries(model.weights.map((v) => [v.originalName, v.read()]));
  const x0 = tf.add(tf.gather(w['emb/embeddings'], tf.tensor1d([0], 'int32')), tf.slice(w['pos/embeddings'], [0, 0], [1, 4]));
  const gi = tf.add(tf.matMul(x0, w['gru/weight_ih'], false, true), w['gru/bias_ih']);
  const gh = tf.reshape(w['gru/bias_hh'], [1, 9]);
  const [ir, iz, inn] = tf.split(gi, 3, 1);
  const [, hz, hn] = tf.split(gh, 3, 1);
  const r = tf.sigmoid(tf.add(ir, tf.split(gh, 3, 1)[0]));
  const z = tf.sigmoid(tf.add(iz, hz));
  const h1 = tf.mul(tf.sub(1, z), tf.tanh(tf.add(inn, tf.mul(r, hn))));
  assert.ok(maxAbs(tf.slice(a, [0, 0, 0], [1, 1, 3]).reshape([1, 3]), h1) < 1e-6);
  assert.throws(() => new SplitexportLayer({ op: 'nope', weightNames: [], weightShapes: [] }).apply(tf.zeros([1, 2, 3])),
    /unknown op "nope"/);
});

test('a segment exported for token ids trains on int32 ids and refuses float inputs', () => {
  const seg = new DeviceSegment(textModel(), {
    is_last: false, input_shape: [5], input_dtype: 'int32', output_shape: [5, 3], optimizer: { name: 'sgd', lr: 0.1 },
  });
  const ids = tf.tensor2d([[0, 1, 2, 3, 9], [4, 4, 4, 4, 4]], undefined, 'int32');
  const before = seg.getWeights()['emb/embeddings'];
  const loss = seg.trainWithGradient(ids, tf.onesLike(seg.forward(ids)));
  assert.ok(Number.isFinite(loss));
  const after = seg.getWeights()['emb/embeddings'];
  const moved = tf.tidy(() => tf.any(tf.notEqual(before, after), 1).dataSync());
  // only the rows of the ids that occurred are trained
  assert.deepEqual(Array.from(moved), [1, 1, 1, 1, 1, 0, 0, 0, 0, 1]);
  assert.throws(() => seg.forward(tf.cast(ids, 'float32')), (e) => e instanceof DeviceRuntimeError &&
    /segment takes int32 token ids, got a float32 tensor/.test(e.message));
  seg.dispose();
});
