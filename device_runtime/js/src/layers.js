/**
 * Custom TF.js layers of splitexport's exports, registered with tf.serialization so that
 * tf.loadLayersModel can read them. Each mirrors a tf_keras layer written by the Python exporter
 * (splitexport/export/_seqtf.py) op for op; weights keep torch's layout.
 *
 * `SplitexportLayer` computes one sequence op chosen by `config.op`: `positional` (x + table[:T]),
 * `gru`, `lstm` (single layer, batch first, zero initial state, every hidden state out),
 * `attention` (nn.MultiheadAttention self-attention) and `encoder` (nn.TransformerEncoderLayer,
 * relu/gelu, norm_first either, no dropout).
 */
import * as tf from '@tensorflow/tfjs';

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

function attention(x, w, heads, prefix = '') {
  const [, t, e] = x.shape;
  const d = e / heads;
  const qkv = linear(x, w[`${prefix}in_proj_weight`], w[`${prefix}in_proj_bias`]);
  const [q, k, v] = tf.split(qkv, 3, 2).map((p) => tf.transpose(tf.reshape(p, [-1, t, heads, d]), [0, 2, 1, 3]));
  const scores = tf.matMul(tf.mul(q, 1 / Math.sqrt(d)), k, false, true);
  const a = tf.softmax(scores, -1);
  const o = tf.reshape(tf.transpose(tf.matMul(a, v), [0, 2, 1, 3]), [-1, t, e]);
  return linear(o, w[`${prefix}out_proj_weight`], w[`${prefix}out_proj_bias`]);
}

function encoder(x, w, { heads, activation, normFirst, epsilon }) {
  const sa = (h) => attention(h, w, heads, 'self_attn_');
  const ff = (h) => {
    const a = linear(h, w.linear1_weight, w.linear1_bias);
    return linear(activation === 'relu' ? tf.relu(a) : gelu(a), w.linear2_weight, w.linear2_bias);
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
    this.vars = this.weightNames.map((n, i) => this.addWeight(n, this.weightShapes[i], 'float32', tf.initializers.zeros()));
    this.built = true;
  }

  computeOutputShape(inputShape) {
    if (this.op === 'gru' || this.op === 'lstm') return [...inputShape.slice(0, -1), this.attrs.hidden];
    return inputShape;
  }

  call(inputs) {
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const w = Object.fromEntries(this.weightNames.map((n, i) => [n, this.vars[i].read()]));
      switch (this.op) {
        case 'positional':
          return positional(x, w.embeddings);
        case 'gru':
          return gru(x, w, this.attrs.hidden);
        case 'lstm':
          return lstm(x, w, this.attrs.hidden);
        case 'attention':
          return attention(x, w, this.attrs.heads);
        case 'encoder':
          return encoder(x, w, this.attrs);
        default:
          throw new Error(`SplitexportLayer: unknown op ${JSON.stringify(this.op)}`);
      }
    });
  }

  getConfig() {
    return { ...super.getConfig(), op: this.op, weightNames: this.weightNames, weightShapes: this.weightShapes, attrs: this.attrs };
  }
}

tf.serialization.registerClass(SplitexportLayer);
