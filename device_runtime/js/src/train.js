/**
 * The device's training loop against the server: double split (A on the device, B on the server,
 * C on the device) or single split (A on the device, B on the server with the labels).
 */
import * as tf from '@tensorflow/tfjs';

import { rng } from './data.js';
import { DeviceRuntimeError, labelLoss } from './segment.js';

/**
 * @typedef {import('./segment.js').DeviceSegment} DeviceSegment
 * @typedef {import('./client.js').RemoteSegment} RemoteSegment
 * @typedef {{xTrain: tf.Tensor, yTrain: tf.Tensor, xTest: tf.Tensor, yTest: tf.Tensor}} Dataset
 *   inputs `[N, ...A.input]`: float32, or int32 token ids when A starts with an Embedding (its splitexport.json
 *   says input_dtype int32); labels int32 class ids (cross-entropy) or float targets (MSE)
 * @typedef {{epoch: number, step: number, loss: number}} StepInfo  step: the server's step number
 * @typedef {{epoch: number, trainLoss: number, trainAccuracy: number, testLoss: number,
 *   testAccuracy: number}} EpochInfo
 * @typedef {object} TrainOptions
 * @property {DeviceSegment} a the first segment (trains on the gradient the server returns)
 * @property {DeviceSegment | null} [c] the last segment (double split); null for a single split
 * @property {RemoteSegment} remote segment B on the server
 * @property {Dataset} data
 * @property {number} [epochs] default 1
 * @property {number} [batchSize] default 32
 * @property {number} [seed] batch order (default 0)
 * @property {number} [evalBatchSize] rows per evaluate call (default 256)
 * @property {string} [loss] 'cross_entropy' (default) or 'mse' (single split: the server's loss)
 * @property {(info: StepInfo) => void} [onStep]
 * @property {(info: EpochInfo) => void} [onEpoch]
 */

/** Shuffled mini-batch indices of one epoch (the same for the same seed and epoch). */
export function batchIndices(n, batchSize, seed, epoch) {
  const random = rng(seed * 100_003 + epoch);
  const order = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const batches = [];
  for (let start = 0; start < n; start += batchSize) batches.push(order.slice(start, start + batchSize));
  return batches;
}

/** @param {tf.Tensor} logits @param {tf.Tensor} labels number of correct argmax predictions */
function correct(logits, labels) {
  return tf.tidy(() => {
    const hits = tf.equal(tf.argMax(logits, 1), tf.cast(labels, 'int32'));
    return tf.sum(tf.cast(hits, 'float32')).dataSync()[0];
  });
}

/**
 * One training step on a batch; returns `{loss, output}` (output: the logits, to be disposed).
 * @param {TrainOptions} o @param {tf.Tensor} x @param {tf.Tensor} y
 */
export async function trainStep(o, x, y) {
  const act = o.a.forward(x);
  try {
    if (o.c == null) {
      const { loss, grad, output } = await o.remote.train(act, y);
      o.a.trainWithGradient(x, grad);
      grad.dispose();
      return { loss, output };
    }
    const h = await o.remote.forward(act);
    const { loss, gradInput, output } = o.c.trainWithLabels(h, y);
    h.dispose();
    const gradB = await o.remote.backward(gradInput);
    gradInput.dispose();
    o.a.trainWithGradient(x, gradB);
    gradB.dispose();
    return { loss, output };
  } finally {
    act.dispose();
  }
}

/**
 * Inference through A, B (server, changes nothing) and C in chunks; returns the logits.
 * @param {TrainOptions} o @param {tf.Tensor} x @returns {Promise<tf.Tensor>}
 */
export async function predict(o, x) {
  const size = o.evalBatchSize ?? 256;
  const outs = [];
  for (let start = 0; start < x.shape[0]; start += size) {
    const xb = tf.slice(x, start, Math.min(size, x.shape[0] - start));
    const act = o.a.evaluate(xb);
    const h = await o.remote.evaluate(act);
    outs.push(o.c == null ? h : o.c.evaluate(h));
    if (o.c != null) h.dispose();
    tf.dispose([xb, act]);
  }
  const logits = tf.concat(outs);
  tf.dispose(outs);
  return logits;
}

/**
 * Train for `epochs` and evaluate on the test set after each; returns the per-epoch metrics.
 * @param {TrainOptions} o @returns {Promise<EpochInfo[]>}
 */
export async function trainSplit(o) {
  const { data } = o;
  const n = data.xTrain.shape[0];
  if (data.yTrain.shape[0] !== n) throw new DeviceRuntimeError(`${data.yTrain.shape[0]} labels for ${n} samples`);
  const lossKind = o.loss ?? 'cross_entropy';
  const classify = lossKind === 'cross_entropy';
  /** @type {EpochInfo[]} */
  const history = [];
  for (let epoch = 1; epoch <= (o.epochs ?? 1); epoch++) {
    let total = 0;
    let hits = 0;
    for (const idx of batchIndices(n, o.batchSize ?? 32, o.seed ?? 0, epoch - 1)) {
      const i = tf.tensor1d(idx, 'int32');
      const x = tf.gather(data.xTrain, i);
      const y = tf.gather(data.yTrain, i);
      const step = o.remote.step;
      const { loss, output } = await trainStep(o, x, y);
      total += loss * idx.length;
      if (classify) hits += correct(output, y);
      tf.dispose([i, x, y, output]);
      o.onStep?.({ epoch, step, loss });
    }
    const logits = await predict(o, data.xTest);
    const testLoss = tf.tidy(() => labelLoss(logits, data.yTest, lossKind).dataSync()[0]);
    const testAccuracy = classify ? correct(logits, data.yTest) / data.yTest.shape[0] : NaN;
    logits.dispose();
    const info = { epoch, trainLoss: total / n, trainAccuracy: classify ? hits / n : NaN, testLoss, testAccuracy };
    history.push(info);
    o.onEpoch?.(info);
  }
  return history;
}
