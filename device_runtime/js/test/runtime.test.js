// Unit tests of the JS runtime on small models built in JS (no Python needed).
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { DeviceRuntimeError, DeviceSegment, labelLoss, tf } from '../src/index.js';

function dense(units, inputDim) {
  const model = tf.sequential();
  model.add(tf.layers.dense({ units, inputShape: [inputDim], name: 'fc' }));
  return model;
}

const close = (a, b, tol = 1e-6) => assert.ok(tf.max(tf.abs(tf.sub(a, b))).dataSync()[0] <= tol);

test('aux-loss step moves the weights by -lr * g^T x (exact backprop of the received gradient)', () => {
  const model = dense(3, 4);
  const seg = new DeviceSegment(model, { is_last: false, optimizer: { name: 'sgd', lr: 0.1 } });
  const w0 = seg.getWeights()['fc/kernel'];
  const x = tf.randomNormal([5, 4], 0, 1, 'float32', 1);
  const g = tf.randomNormal([5, 3], 0, 1, 'float32', 2);
  seg.trainWithGradient(x, g);
  close(seg.getWeights()['fc/kernel'], tf.sub(w0, tf.mul(0.1, tf.matMul(x, g, true, false))));
});

test('label step returns dL/dx of the mean cross-entropy', () => {
  const model = dense(3, 4);
  const seg = new DeviceSegment(model, { is_last: true, optimizer: { name: 'sgd', lr: 0.0001 } });
  const w = seg.getWeights()['fc/kernel'];
  const x = tf.randomNormal([5, 4], 0, 1, 'float32', 3);
  const y = tf.tensor1d([0, 2, 1, 1, 0], 'int32');
  const expected = tf.grad((xx) => labelLoss(model.apply(xx), y))(x);
  const { loss, gradInput } = seg.trainWithLabels(x, y);
  assert.ok(Number.isFinite(loss) && loss > 0);
  close(gradInput, expected);
  assert.equal(w.shape.join(), '4,3');
});

test('forward leaves BatchNorm statistics alone; training updates them with the unbiased variance', () => {
  const model = tf.sequential();
  model.add(tf.layers.batchNormalization({ inputShape: [2], momentum: 0.9, name: 'bn' }));
  const seg = new DeviceSegment(model, { is_last: false });
  const x = tf.tensor2d([[1, 2], [3, 6], [5, 10], [7, 14]]);
  seg.forward(x);
  close(seg.getWeights()['bn/moving_variance'], tf.ones([2]));
  seg.trainWithGradient(x, tf.zeros([4, 2]));
  const unbiased = tf.moments(x, 0).variance.mul(4 / 3);
  close(seg.getWeights()['bn/moving_variance'], tf.add(tf.mul(0.9, tf.ones([2])), tf.mul(0.1, unbiased)), 1e-5);
});

test('misuse raises DeviceRuntimeError', () => {
  const seg = new DeviceSegment(dense(3, 4), { is_last: true, input_shape: [4] });
  assert.throws(() => seg.trainWithGradient(tf.zeros([2, 4]), tf.zeros([2, 3])), DeviceRuntimeError);
  assert.throws(() => seg.evaluate(tf.zeros([2, 5])), /expected \[batch, 4\]/);
  assert.throws(() => new DeviceSegment(dense(1, 1), { is_last: true, optimizer: { name: 'lbfgs' } }), /unknown optimizer/);
});
