// Dropout inside attention layers (SplitexportLayer 'attention' / 'encoder' with attrs.dropout) in the runtime:
// the activation forward() sends and the training step use the masks of the layer's seed (site k: the seeded hash
// with seed * SITES + k), the seed advances after every step, and training converges in A and in C.
// The models are built here, or, with $SPLITEXPORT_TFJS_DROPOUT_MODELS, are the Python exporter's
// (tests/splitexport/export/test_seq_ops.py::test_attention_dropout_tfjs writes them and runs this file).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';

import { DeviceSegment, tf } from '../src/index.js';
import { SITES, SplitexportLayer, seededUniform } from '../src/layers.js';
import { loadSegmentFromDir } from '../src/node.js';

const [N, T, D, FF, HEADS, P] = [16, 5, 8, 16, 2, 0.3];
const EXPORTED = process.env.SPLITEXPORT_TFJS_DROPOUT_MODELS;
const maxAbs = (a, b) => tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]);

const ENCODER_WEIGHTS = [
  ['self_attn_in_proj_weight', [3 * D, D]], ['self_attn_in_proj_bias', [3 * D]], ['self_attn_out_proj_weight', [D, D]],
  ['self_attn_out_proj_bias', [D]], ['linear1_weight', [FF, D]], ['linear1_bias', [FF]], ['linear2_weight', [D, FF]],
  ['linear2_bias', [D]], ['norm1_weight', [D]], ['norm1_bias', [D]], ['norm2_weight', [D]], ['norm2_bias', [D]],
];
const ATTENTION_WEIGHTS = [['in_proj_weight', [3 * D, D]], ['in_proj_bias', [3 * D]], ['out_proj_weight', [D, D]],
  ['out_proj_bias', [D]]];

/** A sequence layer with dropout as the exporter writes it (weights in torch layout, the seed last). */
function seqLayer(name, op, p, attrs) {
  const weights = op === 'encoder' ? ENCODER_WEIGHTS : ATTENTION_WEIGHTS;
  return new SplitexportLayer({
    name, op, attrs: { heads: HEADS, ...attrs, dropout: op === 'encoder' ? [p, p, p, p] : [p] },
    weightNames: [...weights.map(([n]) => n), 'seed'], weightShapes: [...weights.map(([, s]) => s), [1]],
  });
}

function randomize(model) {
  model.weights.forEach((w, i) => {
    if (w.originalName.endsWith('/seed')) {
      w.write(tf.tensor1d([321])); // the exporter starts each layer's seed at a value of its name
      return;
    }
    const isNormWeight = /norm\d_weight$/.test(w.originalName);
    w.write(isNormWeight ? tf.add(1, tf.randomNormal(w.shape, 0, 0.1, 'float32', i + 1))
      : tf.randomNormal(w.shape, 0, 0.3, 'float32', i + 1));
  });
}

const ENCODER = { activation: 'relu', normFirst: false, epsilon: 1e-5 };
const BUILT = {
  mask_A: { op: 'encoder', attrs: ENCODER, isLast: false, lr: 0.02 },
  mask_C: { op: 'encoder', attrs: { ...ENCODER, activation: 'gelu', normFirst: true }, isLast: true, lr: 0.02 },
  attention_A: { op: 'attention', attrs: {}, isLast: false, lr: 0.02 },
};

/** The named segment: the exporter's, or built here with the same layer (name `enc` / `attn`). */
async function segment(name) {
  if (EXPORTED) return loadSegmentFromDir(path.join(EXPORTED, name));
  const input = tf.input({ shape: [T, D], name: 'input' });
  let out;
  let c;
  if (name.startsWith('conv')) {
    out = seqLayer('enc', 'encoder', 0.1, ENCODER).apply(input);
    if (name === 'conv_C') {
      out = tf.layers.dense({ units: 2, name: 'fc' }).apply(tf.layers.globalAveragePooling1d({}).apply(out));
    }
    c = { isLast: name === 'conv_C', lr: 0.1 };
  } else {
    c = BUILT[name];
    out = seqLayer(c.op === 'encoder' ? 'enc' : 'attn', c.op, P, c.attrs).apply(input);
  }
  const model = tf.model({ inputs: input, outputs: out });
  randomize(model);
  const loss = name.startsWith('conv') ? 'cross_entropy' : 'mse';
  return new DeviceSegment(model, { is_last: c.isLast, loss, optimizer: { name: 'sgd', lr: c.lr },
    input_shape: [T, D], output_shape: out.shape.slice(1) });
}

/** The masks of the sites at layer seed `seed` (site k hashes with seed * SITES + k), keep-scaled. */
function siteMasks(seed, op, p) {
  const shapes = op === 'encoder' ? [[N, HEADS, T, T], [N, T, FF], [N, T, D], [N, T, D]] : [[N, HEADS, T, T]];
  return shapes.map((shape, k) => tf.tidy(() => {
    const u = seededUniform(tf.zeros(shape), tf.tensor1d([seed * SITES + k]));
    return tf.mul(tf.cast(tf.greaterEqual(u, p), 'float32'), 1 / (1 - p));
  }));
}

const linear = (h, w, b) => tf.add(tf.reshape(tf.matMul(tf.reshape(h, [-1, w.shape[1]]), w, false, true),
  [...h.shape.slice(0, -1), w.shape[0]]), b);
function layerNorm(h, g, b, eps) {
  const mean = tf.mean(h, -1, true);
  const v = tf.mean(tf.square(tf.sub(h, mean)), -1, true);
  return tf.add(tf.mul(tf.div(tf.sub(h, mean), tf.sqrt(tf.add(v, eps))), g), b);
}

/** torch's layer (attention or encoder layer) with `masks[k]` multiplied in at dropout site k. */
function reference(op, attrs, x, w, masks) {
  const attn = (h, pre) => {
    const d = D / HEADS;
    const heads = tf.split(linear(h, w[`${pre}in_proj_weight`], w[`${pre}in_proj_bias`]), 3, 2)
      .map((z) => tf.transpose(tf.reshape(z, [N, T, HEADS, d]), [0, 2, 1, 3]));
    const a = tf.mul(tf.softmax(tf.div(tf.matMul(heads[0], heads[1], false, true), Math.sqrt(d))), masks[0]);
    const o = tf.reshape(tf.transpose(tf.matMul(a, heads[2]), [0, 2, 1, 3]), [N, T, D]);
    return linear(o, w[`${pre}out_proj_weight`], w[`${pre}out_proj_bias`]);
  };
  if (op === 'attention') return attn(x, '');
  const act = (h) => (attrs.activation === 'relu' ? tf.relu(h)
    : tf.mul(tf.mul(h, 0.5), tf.add(1, tf.erf(tf.mul(h, Math.SQRT1_2)))));
  const sa = (h) => tf.mul(attn(h, 'self_attn_'), masks[2]);
  const ff = (h) => tf.mul(linear(tf.mul(act(linear(h, w.linear1_weight, w.linear1_bias)), masks[1]),
    w.linear2_weight, w.linear2_bias), masks[3]);
  const norm = (h, i) => layerNorm(h, w[`norm${i}_weight`], w[`norm${i}_bias`], attrs.epsilon);
  if (attrs.normFirst) {
    const h = tf.add(x, sa(norm(x, 1)));
    return tf.add(h, ff(norm(h, 2)));
  }
  const h = norm(tf.add(x, sa(x)), 1);
  return norm(tf.add(h, ff(h)), 2);
}

/** The dropout layer of a segment: its name, op, attrs (camel-cased, as loaded) and weights without the prefix. */
function dropLayer(seg) {
  const layer = seg.model.layers.find((l) => l.getClassName() === 'SplitexportLayer');
  const all = seg.getWeights();
  const w = Object.fromEntries(Object.entries(all).filter(([k]) => k.startsWith(`${layer.name}/`))
    .map(([k, v]) => [k.slice(layer.name.length + 1), v]));
  return { name: layer.name, op: layer.op, attrs: layer.attrs, w };
}

for (const name of ['mask_A', 'mask_C', 'attention_A']) {
  test(`attention dropout (${EXPORTED ? 'exported' : 'built in JS'}) ${name}: the step trains on the masks forward() sent`, async () => {
    const seg = await segment(name);
    const lr = seg.config.optimizer.lr;
    const seen = [];
    const first = dropLayer(seg).w.seed.dataSync()[0];
    for (let step = 0; step < 3; step += 1) {
      const x = tf.randomNormal([N, T, D], 0, 1, 'float32', 100 + step);
      const target = tf.randomNormal([N, T, D], 0, 1, 'float32', 200 + step);
      const { name: layer, op, attrs, w } = dropLayer(seg);
      assert.deepEqual(attrs.dropout, op === 'encoder' ? [P, P, P, P] : [P]);
      assert.equal(w.seed.dataSync()[0], first + step, 'the seed advances once per step');
      const masks = siteMasks(first + step, op, P);
      masks.forEach((m) => {
        const keep = tf.mean(tf.cast(tf.greater(m, 0), 'float32')).dataSync()[0];
        assert.ok(Math.abs(keep - (1 - P)) < 0.1, `keep fraction ${keep}`);
      });
      const names = Object.keys(w).filter((k) => k !== 'seed');
      const lossOf = (xs, ...ws) => {
        const wd = Object.fromEntries(names.map((n, i) => [n, ws[i]]));
        const out = reference(op, attrs, xs, wd, masks);
        return seg.isLast ? tf.mean(tf.square(tf.sub(out, target))) : tf.sum(tf.mul(out, target));
      };
      const [gx, ...gw] = tf.grads(lossOf)([x, ...names.map((n) => w[n])]);
      if (seg.isLast) {
        const { gradInput, output } = seg.trainWithLabels(x, target);
        assert.ok(maxAbs(gradInput, gx) < 1e-5, `step ${step}: dL/d(input) is not torch's with the masks`);
        tf.dispose([gradInput, output]);
      } else {
        const sent = seg.forward(x);
        assert.equal(maxAbs(sent, seg.forward(x)), 0, 'forward has no side effects');
        assert.ok(maxAbs(sent, reference(op, attrs, x, w, masks)) < 1e-5, `step ${step}: the sent activation`);
        seg.trainWithGradient(x, target);
      }
      const after = seg.getWeights();
      names.forEach((n, i) => {
        const expected = tf.sub(w[n], tf.mul(lr, gw[i]));
        assert.ok(maxAbs(after[`${layer}/${n}`], expected) < 1e-5, `step ${step}: ${n} is not the step with the masks`);
      });
      seen.push(masks);
    }
    assert.ok(maxAbs(seen[0][0], seen[1][0]) > 0 && maxAbs(seen[1][0], seen[2][0]) > 0, 'new masks every step');
    if (seen[0].length === 4) assert.ok(maxAbs(seen[0][2], seen[0][3]) > 0, 'two sites of one shape differ');
    assert.equal(dropLayer(seg).w.seed.dataSync()[0], first + 3);
    seg.dispose();
  });
}

/** Batch `step` of the toy task: is the first feature's mean over time positive? */
function data(step) {
  const x = tf.randomNormal([N, T, D], 0, 1, 'float32', 1000 + step);
  const y = tf.cast(tf.greater(tf.mean(tf.slice(x, [0, 0, 0], [N, T, 1]), [1, 2]), 0), 'int32');
  return { x, y };
}

const CONVERGE_STEPS = 80;

for (const role of ['A', 'C']) {
  test(`attention dropout 0.1 (${EXPORTED ? 'exported' : 'built in JS'}) in ${role} trains and converges`, async () => {
    const seg = await segment(`conv_${role}`);
    const before = dropLayer(seg).w.self_attn_in_proj_weight.clone();
    // A: a softmax-regression head plays the server (SGD lr 0.1 on the flattened activation)
    const head = { w: tf.variable(tf.randomNormal([T * D, 2], 0, 0.1, 'float32', 7)), b: tf.variable(tf.zeros([2])) };
    const losses = [];
    for (let step = 0; step < CONVERGE_STEPS; step += 1) {
      const { x, y } = data(step);
      if (role === 'C') {
        const { loss, gradInput, output } = seg.trainWithLabels(x, y);
        assert.ok(Number.isFinite(gradInput.sum().dataSync()[0]));
        tf.dispose([gradInput, output]);
        losses.push(loss);
      } else {
        const out = seg.forward(x);
        const ce = (o, hw, hb) => tf.losses.softmaxCrossEntropy(tf.oneHot(y, 2), tf.add(tf.matMul(tf.reshape(o, [N, -1]), hw), hb));
        const [go, gw, gb] = tf.grads(ce)([out, head.w, head.b]);
        losses.push(ce(out, head.w, head.b).dataSync()[0]);
        head.w.assign(tf.sub(head.w, tf.mul(0.1, gw)));
        head.b.assign(tf.sub(head.b, tf.mul(0.1, gb)));
        seg.trainWithGradient(x, go);
      }
    }
    const mean = (a) => a.reduce((s, v) => s + v, 0) / a.length;
    const [first, last] = [mean(losses.slice(0, 10)), mean(losses.slice(-10))];
    console.log(`attention dropout 0.1 in ${role} (TF.js): cross-entropy ${first.toFixed(3)} -> ${last.toFixed(3)} ` +
      `(first / last 10 of ${CONVERGE_STEPS} steps)`);
    assert.ok(maxAbs(dropLayer(seg).w.self_attn_in_proj_weight, before) > 1e-3, 'the device trained');
    assert.ok(last < 0.7 * first, `cross-entropy ${first} -> ${last}`);
    seg.dispose();
  });
}
