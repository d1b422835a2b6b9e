/**
 * Custom TF.js layers of the splitexport export, twins of splitexport/export/_keras_layers.py
 * (same class names and configs). Importing this module registers them, so that
 * tf.loadLayersModel can read models that use them; every op here has a TF.js gradient.
 *
 * `SplitexportLayer` (sequence ops, twin of splitexport/export/_seqtf.py) computes one op chosen by
 * `config.op`: `positional` (x + table[:T]), `gru`, `lstm` (single layer, batch first, zero initial
 * state, every hidden state out), `attention` (nn.MultiheadAttention self-attention) and `encoder`
 * (nn.TransformerEncoderLayer, relu/gelu, norm_first either); weights keep torch's layout. Attention and
 * encoder layers with dropout > 0 carry `attrs.dropout` (rate per site) and a non-trainable `seed` weight:
 * site k draws its mask with seed `seed * SITES + k`, and the seed advances after every training step
 * (splitexport/export/ops/attention.py). `SeededDropout` (plain Dropout) is site 0 of its layer; the exporter
 * starts every layer's seed where no two sites of a segment hash alike (splitexport/export/ops/dropout.py).
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

// Constants of the dropout mask hash (splitexport/export/ops/_tfshared.py HASH).
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

/** Dropout sites per layer (splitexport/export/ops/_tfshared.py SITES): site k uses the seed `seed * SITES + k`. */
export const SITES = 4;

/** Inverted dropout of x at `site` of a layer whose seed tensor is `seed` (shape [1]). */
function siteDropout(x, rate, seed, site) {
  if (rate === 0) return x;
  const keep = tf.cast(tf.greaterEqual(seededUniform(x, tf.add(tf.mul(seed, SITES), site)), rate), 'float32');
  return tf.mul(x, tf.mul(keep, 1 / (1 - rate)));
}

const noDropout = (h) => h;

/**
 * Dropout whose mask is a hash of (element index, seed * SITES): the forward that sends the activation and the
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
    return tf.tidy(() => siteDropout(x, this.rate, this.seed.read(), 0)); // a plain Dropout is site 0 of its layer
  }

  afterTrainStep() {
    tf.tidy(() => this.seed.write(tf.add(this.seed.read(), 1)));
  }

  getConfig() {
    return { ...super.getConfig(), rate: this.rate };
  }
}
SeededDropout.className = 'SeededDropout';

/**
 * The kernel a plain (or depthwise) convolution runs with (splitexport/export/ops/conv.py effective_kernel):
 * a grouped kernel [kh, kw, cin / groups, cout] tiled to cin and masked block-diagonal; for dilation, d - 1
 * zeros between the taps. Built from pad / reshape / slice / tile / mul, whose gradients TF.js has (its conv2d
 * gradient refuses dilation > 1).
 */
export function effectiveKernel(kernel, { kernelSize, dilation, groups, inChannels, filters }, depthwise) {
  let k = kernel;
  if (!depthwise && groups > 1) {
    const gi = inChannels / groups;
    const go = filters / groups;
    const mask = tf.tidy(() => tf.cast(tf.equal(
      tf.floorDiv(tf.reshape(tf.range(0, inChannels, 1, 'int32'), [inChannels, 1]), gi),
      tf.floorDiv(tf.reshape(tf.range(0, filters, 1, 'int32'), [1, filters]), go)), 'float32'));
    k = tf.mul(tf.tile(k, [1, 1, groups, 1]), mask);
  }
  const [kh, kw] = kernelSize;
  const [dh, dw] = dilation;
  if (dh > 1) {
    const [, w, a, b] = k.shape;
    k = tf.pad(tf.expandDims(k, 1), [[0, 0], [0, dh - 1], [0, 0], [0, 0], [0, 0]]);
    k = tf.slice(tf.reshape(k, [kh * dh, w, a, b]), [0, 0, 0, 0], [dh * (kh - 1) + 1, w, a, b]);
  }
  if (dw > 1) {
    const [h, , a, b] = k.shape;
    k = tf.pad(tf.expandDims(k, 2), [[0, 0], [0, 0], [0, dw - 1], [0, 0], [0, 0]]);
    k = tf.slice(tf.reshape(k, [h, kw * dw, a, b]), [0, 0, 0, 0], [h, dw * (kw - 1) + 1, a, b]);
  }
  return k;
}

/** A grouped and / or dilated convolution (valid padding, NHWC) with torch's semantics; twin of _keras_layers.py. */
export class TorchConv2D extends tf.layers.Layer {
  constructor(config) {
    super(config);
    this.filters = config.filters;
    this.kernelSize = config.kernelSize;
    this.strides = config.strides;
    this.dilation = config.dilation;
    this.groups = config.groups;
    this.inChannels = config.inChannels;
    this.depthwise = config.depthwise ?? false;
    this.useBias = config.useBias ?? true;
  }

  build() {
    const [kh, kw] = this.kernelSize;
    if (this.depthwise) {
      this.kernel = this.addWeight('depthwise_kernel', [kh, kw, this.inChannels, this.filters / this.inChannels],
        'float32', tf.initializers.zeros());
    } else {
      this.kernel = this.addWeight('kernel', [kh, kw, this.inChannels / this.groups, this.filters], 'float32',
        tf.initializers.zeros());
    }
    if (this.useBias) this.bias = this.addWeight('bias', [this.filters], 'float32', tf.initializers.zeros());
    this.built = true;
  }

  computeOutputShape(inputShape) {
    const [n, h, w] = inputShape;
    const size = (len, k, d, s) => (len == null ? null : Math.floor((len - d * (k - 1) - 1) / s) + 1);
    return [n, size(h, this.kernelSize[0], this.dilation[0], this.strides[0]),
      size(w, this.kernelSize[1], this.dilation[1], this.strides[1]), this.filters];
  }

  call(inputs) {
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const k = effectiveKernel(this.kernel.read(), this, this.depthwise);
      const strides = /** @type {[number, number]} */ (this.strides);
      const y = this.depthwise ? tf.depthwiseConv2d(x, k, strides, 'valid') : tf.conv2d(x, k, strides, 'valid');
      return this.useBias ? tf.add(y, this.bias.read()) : y;
    });
  }

  getConfig() {
    return {
      ...super.getConfig(), filters: this.filters, kernelSize: this.kernelSize, strides: this.strides,
      dilation: this.dilation, groups: this.groups, inChannels: this.inChannels, depthwise: this.depthwise,
      useBias: this.useBias,
    };
  }
}
TorchConv2D.className = 'TorchConv2D';

for (const cls of [TorchActivation, GroupNorm, TorchReduce, SeededDropout, TorchConv2D]) tf.serialization.registerClass(cls);


// ---------------------------------------------------------------- sequence ops (SplitexportLayer)

/** TF.js camel-cases every string of a Python config; weight names go back to snake case. */
const snake = (s) => s.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

/** x @ w^T + b over the last axis of a rank-2 or rank-3 x (torch's Linear layout). */
export function linear(x, w, b) {
  const [out, inp] = w.shape;
  let y;
  if (x.rank === 2) y = tf.matMul(x, w, false, true);
  else y = tf.reshape(tf.matMul(tf.reshape(x, [-1, inp]), w, false, true), [...x.shape.slice(0, -1), out]);
  return b ? tf.add(y, b) : y;
}

function layerNorm(x, gamma, beta, eps) {
  const mean = tf.mean(x, -1, true);
  const xc = tf.sub(x, mean);
  const v = tf.mean(tf.mul(xc, xc), -1, true);
  let y = tf.mul(xc, tf.rsqrt(tf.add(v, eps)));
  if (gamma) y = tf.mul(y, gamma);
  return beta ? tf.add(y, beta) : y;
}

function gelu(x) {
  return tf.mul(tf.mul(x, 0.5), tf.add(1, tf.erf(tf.mul(x, Math.SQRT1_2))));
}

function gru(x, w, hidden) {
  const steps = tf.unstack(linear(x, w.weight_ih, w.bias_ih), 1);
  let h = tf.zeros([x.shape[0], hidden]);
  const outs = [];
  for (const gi of steps) {
    let gh = tf.matMul(h, w.weight_hh, false, true);
    if (w.bias_hh) gh = tf.add(gh, w.bias_hh);
    const [ir, iz, inn] = tf.split(gi, 3, 1);
    const [hr, hz, hn] = tf.split(gh, 3, 1);
    const r = tf.sigmoid(tf.add(ir, hr));
    const z = tf.sigmoid(tf.add(iz, hz));
    const n = tf.tanh(tf.add(inn, tf.mul(r, hn)));
    h = tf.add(tf.mul(tf.sub(1, z), n), tf.mul(z, h));
    outs.push(h);
  }
  return tf.stack(outs, 1);
}

function lstm(x, w, hidden) {
  const steps = tf.unstack(linear(x, w.weight_ih, w.bias_ih), 1);
  let h = tf.zeros([x.shape[0], hidden]);
  let c = h;
  const outs = [];
  for (const gi of steps) {
    let gates = tf.add(gi, tf.matMul(h, w.weight_hh, false, true));
    if (w.bias_hh) gates = tf.add(gates, w.bias_hh);
    const [i, f, g, o] = tf.split(gates, 4, 1);
    c = tf.add(tf.mul(tf.sigmoid(f), c), tf.mul(tf.sigmoid(i), tf.tanh(g)));
    h = tf.mul(tf.sigmoid(o), tf.tanh(c));
    outs.push(h);
  }
  return tf.stack(outs, 1);
}

function attention(x, w, heads, prefix = '', drop = noDropout) {
  const [, t, e] = x.shape;
  const d = e / heads;
  const qkv = linear(x, w[`${prefix}in_proj_weight`], w[`${prefix}in_proj_bias`]);
  const [q, k, v] = tf.split(qkv, 3, 2).map((p) => tf.transpose(tf.reshape(p, [-1, t, heads, d]), [0, 2, 1, 3]));
  const scores = tf.matMul(tf.mul(q, 1 / Math.sqrt(d)), k, false, true);
  const a = drop(tf.softmax(scores, -1), 0);
  const o = tf.reshape(tf.transpose(tf.matMul(a, v), [0, 2, 1, 3]), [-1, t, e]);
  return linear(o, w[`${prefix}out_proj_weight`], w[`${prefix}out_proj_bias`]);
}

// dropout sites: 0 the attention weights, 1 the feed-forward's dropout, 2 dropout1, 3 dropout2 (as _seqtf.py)
function encoder(x, w, { heads, activation, normFirst, epsilon }, drop = noDropout) {
  const sa = (h) => drop(attention(h, w, heads, 'self_attn_', drop), 2);
  const ff = (h) => {
    const a = linear(h, w.linear1_weight, w.linear1_bias);
    return drop(linear(drop(activation === 'relu' ? tf.relu(a) : gelu(a), 1), w.linear2_weight, w.linear2_bias), 3);
  };
  const norm = (h, i) => layerNorm(h, w[`norm${i}_weight`], w[`norm${i}_bias`], epsilon);
  if (normFirst) {
    const h = tf.add(x, sa(norm(x, 1)));
    return tf.add(h, ff(norm(h, 2)));
  }
  const h = norm(tf.add(x, sa(x)), 1);
  return norm(tf.add(h, ff(h)), 2);
}

function positional(x, table) {
  const [, t, d] = x.shape;
  return tf.add(x, tf.slice(tf.reshape(table, [-1, d]), [0, 0], [t, d]));
}

/** One sequence op of a splitexport export (see the module comment). */
export class SplitexportLayer extends tf.layers.Layer {
  static className = 'SplitexportLayer';

  constructor(config) {
    super(config);
    this.op = config.op;
    this.weightNames = config.weightNames.map(snake);
    this.weightShapes = config.weightShapes;
    this.attrs = config.attrs ?? {};
  }

  build() {
    // a dropout seed (last) is state, not a trained weight
    this.vars = this.weightNames.map((n, i) => this.addWeight(n, this.weightShapes[i], 'float32', tf.initializers.zeros(),
      undefined, n !== 'seed'));
    this.seed = this.vars[this.weightNames.indexOf('seed')];
    this.built = true;
  }

  computeOutputShape(inputShape) {
    if (this.op === 'gru' || this.op === 'lstm') return [...inputShape.slice(0, -1), this.attrs.hidden];
    return inputShape;
  }

  /** The layer's dropout in training mode (rates per site in attrs.dropout), else the identity. */
  dropout(training, seed) {
    const rates = this.attrs.dropout ?? [];
    if (!training || !rates.some((r) => r > 0)) return noDropout;
    return (h, site) => siteDropout(h, rates[site], seed, site);
  }

  call(inputs, kwargs) {
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const w = Object.fromEntries(this.weightNames.map((n, i) => [n, this.vars[i].read()]));
      const drop = this.dropout(kwargs?.training, w.seed);
      switch (this.op) {
        case 'positional':
          return positional(x, w.embeddings);
        case 'gru':
          return gru(x, w, this.attrs.hidden);
        case 'lstm':
          return lstm(x, w, this.attrs.hidden);
        case 'attention':
          return attention(x, w, this.attrs.heads, '', drop);
        case 'encoder':
          return encoder(x, w, this.attrs, drop);
        default:
          throw new Error(`SplitexportLayer: unknown op ${JSON.stringify(this.op)}`);
      }
    });
  }

  /** After every training step: the dropout masks move on (layers with a seed only). */
  afterTrainStep() {
    if (this.seed) tf.tidy(() => this.seed.write(tf.add(this.seed.read(), 1)));
  }

  getConfig() {
    return { ...super.getConfig(), op: this.op, weightNames: this.weightNames, weightShapes: this.weightShapes, attrs: this.attrs };
  }
}

tf.serialization.registerClass(SplitexportLayer);
