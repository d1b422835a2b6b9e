/**
 * A trainable device segment (A or C) of a split model exported with `splitexport export BUNDLE --format tfjs`.
 *
 * Update rule (mirrors splitexport/_update_rule.py):
 *  - a segment whose output `out` receives g = dL/d(out) trains on
 *    L_aux = 0.5 * sum((out - t)^2) with the detached target t = out - g;
 *  - the last segment trains on the mean cross-entropy (or mean MSE) of its output and
 *    returns dL/d(input) to send upstream.
 * Optimizers follow torch.optim semantics (SGD with momentum / weight decay, Adam, AdamW).
 * BatchNorm running variance is updated with the unbiased batch variance, as torch does.
 */
import * as tf from '@tensorflow/tfjs';
import './layers.js';

const LOSSES = ['cross_entropy', 'mse'];
const OPTIMIZERS = ['sgd', 'adam', 'adamw'];

/** Error raised for misuse of the runtime (wrong shapes, bad configuration). */
export class DeviceRuntimeError extends Error {
  constructor(message) {
    super(message);
    this.name = 'DeviceRuntimeError';
  }
}

function normalizeConfig(meta) {
  if (meta == null) throw new DeviceRuntimeError('segment metadata (splitexport.json contents) is required');
  const isLast = meta.isLast ?? meta.is_last;
  if (typeof isLast !== 'boolean') throw new DeviceRuntimeError('metadata must say whether the segment is last (is_last)');
  const loss = meta.loss ?? 'cross_entropy';
  if (!LOSSES.includes(loss)) throw new DeviceRuntimeError(`unknown loss ${JSON.stringify(loss)}; expected one of ${LOSSES}`);
  const o = meta.optimizer ?? {};
  const optimizer = {
    name: o.name ?? 'sgd',
    lr: o.lr ?? 0.05,
    momentum: o.momentum ?? 0,
    weightDecay: o.weightDecay ?? o.weight_decay ?? 0,
    betas: o.betas ?? [0.9, 0.999],
    eps: o.eps ?? 1e-8,
  };
  if (!OPTIMIZERS.includes(optimizer.name)) {
    throw new DeviceRuntimeError(`unknown optimizer ${JSON.stringify(optimizer.name)}; expected one of ${OPTIMIZERS}`);
  }
  return {
    isLast,
    loss,
    optimizer,
    inputShape: meta.inputShape ?? meta.input_shape ?? null,
    inputDtype: meta.inputDtype ?? meta.input_dtype ?? 'float32',
    outputShape: meta.outputShape ?? meta.output_shape ?? null,
    torchNames: meta.torchNames ?? meta.torch_names ?? {},
  };
}

/** Torch-semantics optimizer over a list of tf.Variables (state kept in tf.Variables). */
class Optimizer {
  constructor(variables, config) {
    this.vars = variables;
    this.c = config;
    this.step = 0;
    const slots = config.name === 'sgd' ? (config.momentum ? ['momentum'] : []) : ['exp_avg', 'exp_avg_sq'];
    this.slots = slots.map(() => variables.map((v) => tf.variable(tf.zerosLike(v), false)));
    this.slotNames = slots;
  }

  apply(grads) {
    const c = this.c;
    this.step += 1;
    tf.tidy(() => {
      this.vars.forEach((p, i) => {
        let g = grads[i];
        if (c.name === 'sgd') {
          if (c.weightDecay) g = tf.add(g, tf.mul(p, c.weightDecay));
          if (c.momentum) {
            const buf = this.slots[0][i];
            buf.assign(tf.add(tf.mul(buf, c.momentum), g));
            g = buf;
          }
          p.assign(tf.sub(p, tf.mul(g, c.lr)));
          return;
        }
        const [b1, b2] = c.betas;
        if (c.name === 'adamw' && c.weightDecay) p.assign(tf.mul(p, 1 - c.lr * c.weightDecay));
        else if (c.weightDecay) g = tf.add(g, tf.mul(p, c.weightDecay));
        const m1 = this.slots[0][i];
        const m2 = this.slots[1][i];
        m1.assign(tf.add(tf.mul(m1, b1), tf.mul(g, 1 - b1)));
        m2.assign(tf.add(tf.mul(m2, b2), tf.mul(tf.square(g), 1 - b2)));
        const bc1 = 1 - Math.pow(b1, this.step);
        const bc2 = 1 - Math.pow(b2, this.step);
        const denom = tf.add(tf.div(tf.sqrt(m2), Math.sqrt(bc2)), c.eps);
        p.assign(tf.sub(p, tf.mul(tf.div(m1, denom), c.lr / bc1)));
      });
    });
  }

  dispose() {
    this.slots.flat().forEach((v) => v.dispose());
  }
}

/**
 * The auxiliary loss 0.5*sum((out - t)^2), t = out - g (= 0.5*sum(g^2)); its gradient w.r.t. out is exactly g
 * (the gradient of sum(out*g)): out - (out - g) in float32 would lose the low bits of g when |g| << |out|.
 */
const auxLoss = tf.customGrad((out, grad, save) => {
  save([grad]);
  return {
    value: tf.mul(0.5, tf.sum(tf.square(grad))),
    gradFunc: (dy, saved) => [tf.mul(dy, saved[0]), tf.zerosLike(grad)],
  };
});

/** The label loss of the last segment, mean-reduced (splitexport/_update_rule.py: label_loss). */
export function labelLoss(out, labels, kind = 'cross_entropy') {
  return tf.tidy(() => {
    if (kind === 'cross_entropy') {
      const numClasses = out.shape[1];
      const onehot = tf.oneHot(tf.cast(labels, 'int32'), numClasses);
      const logp = tf.sub(out, tf.logSumExp(out, 1, true));
      return tf.div(tf.neg(tf.sum(tf.mul(onehot, logp))), out.shape[0]);
    }
    if (kind === 'mse') return tf.mean(tf.square(tf.sub(out, tf.reshape(tf.cast(labels, 'float32'), out.shape))));
    throw new DeviceRuntimeError(`unknown loss ${JSON.stringify(kind)}`);
  });
}

/**
 * Make BatchNormalization layers update the moving variance with the unbiased batch variance
 * (torch's convention; TF.js uses the biased one), and allow freezing the moving statistics.
 */
function patchBatchNorm(model, state) {
  for (const layer of model.layers) {
    if (layer.getClassName() !== 'BatchNormalization') continue;
    const call = layer.call.bind(layer);
    layer.call = (inputs, kwargs) => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      layer.__count = x.size / x.shape[x.shape.length - 1];
      return call(inputs, kwargs);
    };
    for (const key of ['movingMean', 'movingVariance']) {
      const lv = layer[key];
      const write = lv.write.bind(lv);
      lv.write = (value) => {
        if (state.frozen) return lv;
        if (key === 'movingVariance' && layer.__count > 1) {
          const n = layer.__count;
          const m = 1 - layer.momentum;
          const corrected = tf.tidy(() => tf.add(value, tf.div(tf.sub(value, tf.mul(lv.read(), 1 - m)), n - 1)));
          write(corrected);
          corrected.dispose();
          return lv;
        }
        return write(value);
      };
    }
  }
}

function checkShape(what, tensor, expected) {
  if (expected == null) return;
  const got = tensor.shape.slice(1);
  if (got.length !== expected.length || got.some((d, i) => d !== expected[i])) {
    throw new DeviceRuntimeError(`${what} has shape [${tensor.shape}], expected [batch, ${expected}]`);
  }
}

/** Shape check plus dtype: a segment exported for token ids takes int32 tensors, any other takes float32. */
function checkInput(x, config) {
  checkShape('input', x, config.inputShape);
  if (x.dtype !== config.inputDtype) {
    const what = config.inputDtype === 'int32' ? 'int32 token ids' : 'float32 inputs';
    throw new DeviceRuntimeError(`segment takes ${what}, got a ${x.dtype} tensor`);
  }
}

/** A trainable device segment (A: trains on a received gradient; C: trains on labels). */
export class DeviceSegment {
  /**
   * @param {tf.LayersModel} model the loaded TF.js layers model
   * @param {object} meta contents of splitexport.json (is_last, loss, optimizer, shapes)
   */
  constructor(model, meta) {
    this.model = model;
    this.config = normalizeConfig(meta);
    this._bn = { frozen: false };
    patchBatchNorm(model, this._bn);
    this.trainable = model.trainableWeights;
    this.optimizer = new Optimizer(this.trainable.map((w) => w.read()), this.config.optimizer);
  }

  /**
   * Load a segment from a URL, a tf.io.IOHandler (e.g. bundleResourceIO in React Native,
   * fileIO from './node.js'), and its metadata object.
   */
  static async load(source, meta) {
    const model = await tf.loadLayersModel(source);
    return new DeviceSegment(model, meta);
  }

  get isLast() {
    return this.config.isLast;
  }

  /**
   * Check, before any step, that the active TF.js backend has every kernel this segment's training
   * step needs (forward, gradient, update): a dry step on a zero batch of two rows that changes no weight,
   * optimizer slot or BatchNorm statistic. A backend without one (e.g. wasm has no `Conv2DBackpropFilter`)
   * throws {@link DeviceRuntimeError} naming it, so training never fails halfway through a server step.
   * @returns {Promise<string[]>} the kernels a training step runs
   */
  async checkBackend() {
    const c = this.config;
    if (c.inputShape == null) throw new DeviceRuntimeError('metadata has no input_shape; cannot check the backend');
    const backend = tf.getBackend();
    this._bn.frozen = true;
    try {
      const info = await tf.profile(() => {
        const input = tf.variable(tf.zeros([2, ...c.inputShape]), true);
        const vars = [...this.optimizer.vars, input];
        try {
          const { value, grads } = tf.variableGrads(() => {
            const out = this.model.apply(input, { training: true });
            return c.isLast ? labelLoss(out, tf.zeros([2], c.loss === 'mse' ? 'float32' : 'int32'), c.loss)
              : auxLoss(out, tf.zerosLike(out));
          }, vars);
          // the update's arithmetic, on copies (the real slots and weights stay as they are)
          if (this.optimizer.vars.length) tf.tidy(() => {
            const p = this.optimizer.vars[0];
            const g = grads[p.name];
            const m = tf.add(tf.mul(tf.zerosLike(p), 0.9), tf.mul(tf.square(g), 0.1));
            tf.sub(p, tf.mul(tf.div(g, tf.add(tf.sqrt(m), 1e-8)), 0.1));
          });
          tf.dispose([value, ...Object.values(grads)]);
        } finally {
          input.dispose();
        }
      });
      return [...new Set(info.kernelNames)].sort();
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      throw new DeviceRuntimeError(`the ${JSON.stringify(backend)} TF.js backend cannot train this segment ` +
        `(${message}); use the cpu or webgl backend (tf.setBackend) before loading it`);
    } finally {
      this._bn.frozen = false;
    }
  }

  /** Training-mode forward (batch statistics) without changing any state: the activation to send. */
  forward(x) {
    checkInput(x, this.config);
    this._bn.frozen = true;
    try {
      return tf.tidy(() => this.model.apply(x, { training: true }));
    } finally {
      this._bn.frozen = false;
    }
  }

  /** Inference-mode forward (BatchNorm running statistics, no dropout). */
  evaluate(x) {
    checkInput(x, this.config);
    return tf.tidy(() => this.model.apply(x, { training: false }));
  }

  /** Aux-loss step for a segment that is not last: `gradOut` = dL/d(output). Returns the aux loss. */
  trainWithGradient(x, gradOut) {
    if (this.config.isLast) throw new DeviceRuntimeError('the last segment trains with labels (trainWithLabels)');
    checkInput(x, this.config);
    checkShape('gradient', gradOut, this.config.outputShape);
    const vars = this.optimizer.vars;
    const { value, grads } = tf.variableGrads(() => auxLoss(this.model.apply(x, { training: true }), gradOut), vars);
    this.optimizer.apply(vars.map((v) => grads[v.name]));
    this._afterStep();
    const loss = value.dataSync()[0];
    value.dispose();
    tf.dispose(grads);
    return loss;
  }

  /**
   * Label-loss step of the last segment. Returns `{loss, gradInput, output}`: gradInput = dL/d(input) to
   * send upstream, output = this step's (pre-update) output; the caller disposes both tensors.
   */
  trainWithLabels(x, labels) {
    if (!this.config.isLast) throw new DeviceRuntimeError('only the last segment trains with labels; use trainWithGradient');
    checkInput(x, this.config);
    if (labels.shape[0] !== x.shape[0]) throw new DeviceRuntimeError(`${labels.shape[0]} labels for a batch of ${x.shape[0]}`);
    const input = tf.variable(x, true);
    const vars = [...this.optimizer.vars, input];
    let output;
    const { value, grads } = tf.variableGrads(() => {
      const out = this.model.apply(input, { training: true });
      output = tf.keep(out.clone());
      return labelLoss(out, labels, this.config.loss);
    }, vars);
    this.optimizer.apply(this.optimizer.vars.map((v) => grads[v.name]));
    this._afterStep();
    const gradInput = tf.keep(grads[input.name].clone());
    const loss = value.dataSync()[0];
    value.dispose();
    tf.dispose(grads);
    input.dispose();
    return { loss, gradInput, output };
  }

  /** Per-step state updates of the layers (the dropout seeds advance after every training step). */
  _afterStep() {
    for (const layer of this.model.layers) if (typeof layer.afterTrainStep === 'function') layer.afterTrainStep();
  }

  /** Every weight (trainable and BatchNorm statistics) keyed by its Keras name, e.g. `stem_0/kernel`. */
  getWeights() {
    const out = {};
    for (const w of this.model.weights) out[w.originalName] = w.read().clone();
    return out;
  }

  /** Set weights by Keras name (any subset); shapes must match. */
  setWeights(values) {
    const byName = new Map(this.model.weights.map((w) => [w.originalName, w]));
    for (const [name, value] of Object.entries(values)) {
      const w = byName.get(name);
      if (w == null) throw new DeviceRuntimeError(`segment has no weight ${JSON.stringify(name)}`);
      if (w.shape.toString() !== value.shape.toString()) {
        throw new DeviceRuntimeError(`weight ${name} has shape [${w.shape}], got [${value.shape}]`);
      }
      w.read().assign(value);
    }
  }

  /** Optimizer slots (SGD momentum, Adam moments) keyed `<weight>/<slot>`, plus `optimizer/step`. */
  getOptimizerState() {
    const out = { 'optimizer/step': tf.scalar(this.optimizer.step) };
    this.optimizer.slotNames.forEach((slot, s) => {
      this.trainable.forEach((w, i) => {
        out[`${w.originalName}/${slot}`] = this.optimizer.slots[s][i].clone();
      });
    });
    return out;
  }

  /** Set the optimizer state; slots missing from `values` are reset to zero (torch's fresh state). */
  setOptimizerState(values) {
    const step = values['optimizer/step'];
    this.optimizer.step = step == null ? 0 : step.dataSync()[0];
    this.optimizer.slotNames.forEach((slot, s) => {
      this.trainable.forEach((w, i) => {
        const v = this.optimizer.slots[s][i];
        const value = values[`${w.originalName}/${slot}`];
        if (value == null) v.assign(tf.zerosLike(v));
        else v.assign(value);
      });
    });
  }

  dispose() {
    this.optimizer.dispose();
    this.model.dispose();
  }
}
