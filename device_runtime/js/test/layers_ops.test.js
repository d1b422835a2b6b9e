// Unit tests of the custom layers (src/layers.js) on models built in JS (no Python needed); the two-dropout test
// also runs on the exporter's model when $SPLITEXPORT_TFJS_TWO_DROPOUTS names it
// (tests/splitexport/export/test_tfjs_export.py::test_two_dropout_layers_draw_different_masks_tfjs).
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { DeviceSegment, SeededDropout, TorchActivation, tf } from '../src/index.js';
import { loadSegmentFromDir } from '../src/node.js';

const TWO_DROPOUTS = process.env.SPLITEXPORT_TFJS_TWO_DROPOUTS;

const maxAbs = (a, b) => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0];

test('SeededDropout: the training step uses the mask forward() sent, and the next step a new one', () => {
  const model = tf.sequential();
  model.add(tf.layers.dense({ units: 32, inputShape: [12], name: 'fc' }));
  model.add(new SeededDropout({ rate: 0.5, name: 'drop' }));
  const seg = new DeviceSegment(model, { is_last: false, optimizer: { name: 'sgd', lr: 0.1 } });
  const masks = [];
  for (let i = 0; i < 3; i += 1) {
    const x = tf.randomNormal([8, 12], 0, 1, 'float32', 10 + i);
    const g = tf.randomNormal([8, 32], 0, 1, 'float32', 20 + i);
    const w = seg.getWeights();
    const sent = seg.forward(x);
    assert.equal(maxAbs(sent, seg.forward(x)), 0); // forward has no side effects
    const lin = tf.add(tf.matMul(x, w['fc/kernel']), w['fc/bias']);
    const mask = tf.mul(tf.cast(tf.greater(tf.abs(sent), 1e-12), 'float32'), 2);
    assert.ok(maxAbs(tf.mul(lin, mask), sent) < 1e-5);
    const keep = tf.mean(mask).dataSync()[0] / 2;
    assert.ok(keep > 0.3 && keep < 0.7, `keep fraction ${keep}`);
    masks.push(mask);
    seg.trainWithGradient(x, g);
    const gm = tf.mul(g, mask);
    const expected = tf.sub(w['fc/kernel'], tf.mul(0.1, tf.matMul(x, gm, true, false)));
    assert.ok(maxAbs(seg.getWeights()['fc/kernel'], expected) < 1e-5);
  }
  assert.ok(maxAbs(masks[0], masks[1]) > 0 && maxAbs(masks[1], masks[2]) > 0);
  assert.equal(seg.getWeights()['drop/seed'].dataSync()[0], 3);
});

/** tests/op_models.py TwoDropouts: cat(d1(fc(x)), d2(fc(x))), the exporter's or built here (seeds set apart). */
async function twoDropouts() {
  if (TWO_DROPOUTS) return loadSegmentFromDir(TWO_DROPOUTS);
  const input = tf.input({ shape: [12], name: 'input' });
  const h = tf.layers.dense({ units: 16, name: 'fc' }).apply(input);
  const out = tf.layers.concatenate({ axis: -1 }).apply(['d1', 'd2'].map(
    (name) => new SeededDropout({ rate: 0.5, name }).apply(h)));
  const model = tf.model({ inputs: input, outputs: out });
  model.getLayer('d1').seed.write(tf.tensor1d([123]));
  model.getLayer('d2').seed.write(tf.tensor1d([456]));
  return new DeviceSegment(model, { is_last: false, optimizer: { name: 'sgd', lr: 0.1 } });
}

test(`two SeededDropout layers of one shape (${TWO_DROPOUTS ? 'exported' : 'built in JS'}) draw different masks, and the step trains on both`, async () => {
  const seg = await twoDropouts();
  const seeds = () => ['d1', 'd2'].map((n) => seg.getWeights()[`${n}/seed`].dataSync()[0]);
  const first = seeds();
  assert.notEqual(first[0], first[1]);
  for (let i = 0; i < 3; i += 1) {
    assert.deepEqual(seeds(), first.map((s) => s + i), 'both seeds advance once per step');
    const x = tf.randomNormal([8, 12], 0, 1, 'float32', 30 + i);
    const g = tf.randomNormal([8, 32], 0, 1, 'float32', 40 + i);
    const w = seg.getWeights();
    const sent = seg.forward(x);
    const h = tf.add(tf.matMul(x, w['fc/kernel']), w['fc/bias']);
    const mask = tf.mul(tf.cast(tf.greater(tf.abs(sent), 1e-6), 'float32'), 2);
    assert.ok(maxAbs(tf.mul(tf.concat([h, h], 1), mask), sent) < 1e-5);
    const [m1, m2] = tf.split(mask, 2, 1);
    const same = tf.mean(tf.cast(tf.equal(m1, m2), 'float32')).dataSync()[0];
    assert.ok(same < 0.75, `step ${i}: the two masks agree on ${same} of the elements`);
    seg.trainWithGradient(x, g);
    const [g1, g2] = tf.split(g, 2, 1);
    const gh = tf.add(tf.mul(g1, m1), tf.mul(g2, m2)); // the step with both masks that were sent
    const expected = tf.sub(w['fc/kernel'], tf.mul(0.1, tf.matMul(x, gh, true, false)));
    assert.ok(maxAbs(seg.getWeights()['fc/kernel'], expected) < 1e-5);
  }
  seg.dispose();
});

test('TorchActivation follows torch: hardswish, hardsigmoid, gelu_tanh', () => {
  const x = tf.tensor1d([-4, -3, -1, 0, 0.5, 2.9, 3.1, 5]);
  const hs = [0, 0, -1 / 3, 0, 0.5 * 3.5 / 6, (2.9 * 5.9) / 6, 3.1, 5];
  const hsig = [0, 0, 2 / 6, 0.5, 3.5 / 6, 5.9 / 6, 1, 1];
  const c = Math.sqrt(2 / Math.PI);
  const gt = x.arraySync().map((v) => 0.5 * v * (1 + Math.tanh(c * (v + 0.044715 * v ** 3))));
  for (const [fn, expected] of [['hardswish', hs], ['hardsigmoid', hsig], ['gelu_tanh', gt]]) {
    const layer = new TorchActivation({ fn, name: fn });
    assert.ok(maxAbs(layer.apply(x), tf.tensor1d(expected)) < 1e-6, fn);
  }
});
