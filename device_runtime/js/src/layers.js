/**
 * Custom TF.js layers of the splitexport export, twins of splitexport/export/_keras_layers.py
 * (same class names and configs). Importing this module registers them, so that
 * tf.loadLayersModel can read models that use them; every op here has a TF.js gradient.
 */
import * as tf from '@tensorflow/tfjs';

const C = Math.sqrt(2 / Math.PI);
const hardsigmoid = (x) => tf.div(tf.minimum(tf.maximum(tf.add(x, 3), 0), 6), 6);
const FUNCTIONS = {
  hardsigmoid,
  hardswish: (x) => tf.mul(x, hardsigmoid(x)),
  geluTanh: (x) => tf.mul(tf.mul(0.5, x), tf.add(1, tf.tanh(tf.mul(C, tf.add(x, tf.mul(0.044715, tf.mul(x, tf.mul(x, x)))))))),
};

// TF.js converts Python snake_case config strings to camelCase on load (gelu_tanh -> geluTanh).
const camel = (s) => s.replace(/_([a-z])/g, (_, c) => c.toUpperCase());

/** An activation with torch's formula: hardsigmoid, hardswish or gelu_tanh. */
export class TorchActivation extends tf.layers.Layer {
  constructor(config) {
    super(config);
    this.fn = camel(config.fn);
    if (!(this.fn in FUNCTIONS)) throw new Error(`unknown TorchActivation ${JSON.stringify(config.fn)}`);
  }

  call(inputs) {
    return tf.tidy(() => FUNCTIONS[this.fn](Array.isArray(inputs) ? inputs[0] : inputs));
  }

  getConfig() {
    return { ...super.getConfig(), fn: this.fn };
  }
}
TorchActivation.className = 'TorchActivation';

/** torch.nn.GroupNorm on channels-last input (..., C). */
export class GroupNorm extends tf.layers.Layer {
  constructor(config) {
    super(config);
    this.groups = config.groups;
    this.epsilon = config.epsilon ?? 1e-5;
  }

  build(inputShape) {
    const c = inputShape[inputShape.length - 1];
    this.gamma = this.addWeight('gamma', [c], 'float32', tf.initializers.ones());
    this.beta = this.addWeight('beta', [c], 'float32', tf.initializers.zeros());
    this.built = true;
  }

  computeOutputShape(inputShape) {
    return inputShape;
  }

  call(inputs) {
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const c = x.shape[x.shape.length - 1];
      const g = tf.reshape(x, [x.shape[0], -1, this.groups, c / this.groups]);
      const { mean, variance } = tf.moments(g, [1, 3], true);
      const y = tf.reshape(tf.mul(tf.sub(g, mean), tf.rsqrt(tf.add(variance, this.epsilon))), x.shape);
      return tf.add(tf.mul(y, this.gamma.read()), this.beta.read());
    });
  }

  getConfig() {
    return { ...super.getConfig(), groups: this.groups, epsilon: this.epsilon };
  }
}
GroupNorm.className = 'GroupNorm';

/** mean or sum over `axes` of the batched input, optionally keeping them. */
export class TorchReduce extends tf.layers.Layer {
  constructor(config) {
    super(config);
    this.op = config.op;
    this.axes = config.axes;
    this.keepdims = config.keepdims ?? false;
  }

  computeOutputShape(inputShape) {
    const shape = inputShape.map((d, i) => (this.axes.includes(i) ? 1 : d));
    return this.keepdims ? shape : shape.filter((_, i) => !this.axes.includes(i));
  }

  call(inputs) {
    const x = Array.isArray(inputs) ? inputs[0] : inputs;
    return tf.tidy(() => (this.op === 'mean' ? tf.mean : tf.sum)(x, this.axes, this.keepdims));
  }

  getConfig() {
    return { ...super.getConfig(), op: this.op, axes: this.axes, keepdims: this.keepdims };
  }
}
TorchReduce.className = 'TorchReduce';

// Constants of the dropout mask hash (splitexport/export/ops/dropout.py HASH).
const [MA, MB, MS, KA, KB, KS, SCALE] = [251, 241, 1009, 12.9898, 78.233, 37.719, 43758.5453];
const fmod = (v, m) => tf.sub(v, tf.mul(tf.floor(tf.div(v, m)), m));

/** Pseudo-random numbers in [0, 1) of x's shape from a seed tensor of shape [1] (same hash as the export). */
export function seededUniform(x, seed) {
  return tf.tidy(() => {
    const i = tf.reshape(tf.range(0, x.size, 1, 'float32'), x.shape);
    const a = fmod(i, MA);
    const b = fmod(tf.floor(tf.div(i, MA)), MB);
    const s = fmod(seed, MS);
    const v = tf.mul(tf.sin(tf.add(tf.add(tf.mul(a, KA), tf.mul(b, KB)), tf.mul(s, KS))), SCALE);
    return tf.sub(v, tf.floor(v));
  });
}

/**
 * Dropout whose mask is a hash of (element index, seed): the forward that sends the activation and the
 * training step that recomputes it draw the same mask. The runtime calls afterTrainStep() after every
 * training step, which advances the seed (a non-trainable weight, saved with the others).
 */
export class SeededDropout extends tf.layers.Layer {
  constructor(config) {
    super(config);
    this.rate = config.rate;
  }

  build() {
    this.seed = this.addWeight('seed', [1], 'float32', tf.initializers.zeros(), undefined, false);
    this.built = true;
  }

  computeOutputShape(inputShape) {
    return inputShape;
  }

  call(inputs, kwargs) {
    const x = Array.isArray(inputs) ? inputs[0] : inputs;
    if (!kwargs?.training || this.rate === 0) return x;
    return tf.tidy(() => {
      const keep = tf.cast(tf.greaterEqual(seededUniform(x, this.seed.read()), this.rate), 'float32');
      return tf.mul(x, tf.mul(keep, 1 / (1 - this.rate)));
    });
  }

  afterTrainStep() {
    tf.tidy(() => this.seed.write(tf.add(this.seed.read(), 1)));
  }

  getConfig() {
    return { ...super.getConfig(), rate: this.rate };
  }
}
SeededDropout.className = 'SeededDropout';

for (const cls of [TorchActivation, GroupNorm, TorchReduce, SeededDropout]) tf.serialization.registerClass(cls);
