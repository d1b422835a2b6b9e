// Unit tests of the custom layers (src/layers.js) on models built in JS (no Python needed).
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { DeviceSegment, SeededDropout, TorchActivation, tf } from '../src/index.js';

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
