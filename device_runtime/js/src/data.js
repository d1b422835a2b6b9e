/**
 * The device's own data, read the way `splitexport simulate --data` and `python -m device_runtime train --data`
 * read it: NumPy `.npy`/`.npz` (parsed in plain JS) and CSV with a target column, checked against the bundle
 * and transformed by the `preprocess` its manifest records (docs/bundle.md, "Preprocessing"):
 * `x' = (x * scale - mean[c]) / std[c]` along axis 1, in float64 rounded to float32; int token ids unchanged
 * (as int32, TF.js's integer type). Images: decode and resize with the platform (canvas, an image library) and
 * pass the pixels to {@link preprocess}.
 *
 * Works on bytes, so in browsers, workers and Node alike; `./node.js` adds `loadDataFile(path, manifest)`.
 */
import * as tf from '@tensorflow/tfjs';

import { DeviceRuntimeError } from './segment.js';

/**
 * @typedef {Float32Array | Float64Array | Int8Array | Uint8Array | Int16Array | Uint16Array | Int32Array |
 *   Uint32Array | BigInt64Array | BigUint64Array} NumericArray
 * @typedef {{dtype: string, shape: number[], data: NumericArray}} NdArray  a C-order array; dtype as numpy names it
 * @typedef {object} PreprocessSpec  manifest.json's `preprocess`
 * @property {'image' | 'table' | 'array' | 'tokens'} kind
 * @property {number} [scale]
 * @property {number[]} [mean]
 * @property {number[]} [std]
 * @property {string[]} [feature_names]
 * @property {string[]} [label_names]
 * @property {number} [num_classes]
 * @typedef {{x: Float32Array | Int32Array, y: Int32Array | Float32Array, n: number,
 *   labelNames: string[], featureNames: string[]}} Table  rows in file order (x: n x features)
 * @typedef {object} DataOptions
 * @property {'npz' | 'npy' | 'csv'} format
 * @property {string} [target] the label column of a CSV
 * @property {Uint8Array} [labels] for `npy`: the `.labels.npy` beside it
 * @property {number} [seed] the 75/25 split when the file has no test set (default 0)
 * @property {string} [name] for messages (default the format)
 */

const NPY_MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
/** numpy dtype (without byte order) -> typed array */
const DTYPES = {
  f4: Float32Array, f8: Float64Array, i1: Int8Array, u1: Uint8Array, i2: Int16Array, u2: Uint16Array,
  i4: Int32Array, u4: Uint32Array, i8: BigInt64Array, u8: BigUint64Array, b1: Uint8Array,
};
const TEST_FRACTION = 0.25;

/** @param {string} msg */
const fail = (msg) => { throw new DeviceRuntimeError(msg); };

/** A plain Uint8Array view (a Node Buffer's slice() would not copy). @param {ArrayBuffer | Uint8Array} bytes */
const asBytes = (bytes) => (ArrayBuffer.isView(bytes)
  ? new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength) : new Uint8Array(bytes));

/**
 * Parse a NumPy `.npy` file (format 1.0 to 3.0): little-endian numeric dtypes in C order.
 * @param {ArrayBuffer | Uint8Array} input @param {string} [name]
 * @returns {NdArray}
 */
export function parseNpy(input, name = '.npy') {
  const bytes = asBytes(input);
  if (bytes.length < 10 || NPY_MAGIC.some((b, i) => bytes[i] !== b)) fail(`${name} is not a NumPy .npy file`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder('latin1').decode(bytes.subarray(start, start + headerLen));
  const descr = /'descr'\s*:\s*'([^']*)'/.exec(header)?.[1];
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr == null || fortran == null || shapeText == null) fail(`${name}: unreadable .npy header ${header.trim()}`);
  if (fortran === 'True') fail(`${name} is stored in Fortran order; save it with np.ascontiguousarray(...)`);
  const order = descr[0];
  const Type = DTYPES[descr.slice(1)];
  if (Type == null || !'<|='.includes(order)) {
    fail(`${name} holds ${descr} values; only little-endian numbers (float32/64, int8..64, uint8..64, bool) are read`);
  }
  const shape = shapeText.split(',').map((d) => d.trim()).filter((d) => d).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLen;
  if (bytes.length - offset < count * Type.BYTES_PER_ELEMENT) fail(`${name} is truncated`);
  const copy = bytes.slice(offset, offset + count * Type.BYTES_PER_ELEMENT); // aligned for the typed array
  return { dtype: descr.slice(1) === 'b1' ? 'bool' : descr.slice(1), shape, data: new Type(copy.buffer) };
}

/** @param {Uint8Array} bytes @param {number} method @param {string} name */
async function inflate(bytes, method, name) {
  if (method === 0) return bytes;
  if (method !== 8) fail(`${name}: zip compression method ${method} is not supported (stored or deflate)`);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate-raw'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/**
 * Parse a NumPy `.npz` (a zip of `.npy` files, `np.savez` or `np.savez_compressed`, zip64 included).
 * @param {ArrayBuffer | Uint8Array} input @param {string} [name]
 * @returns {Promise<Record<string, NdArray>>} arrays by name (`x`, `y`, ...)
 */
export async function parseNpz(input, name = '.npz') {
  const bytes = asBytes(input);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let eocd = -1;
  for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 65535); i--) {
    if (view.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) fail(`${name} is not a .npz (zip) file`);
  let entries = view.getUint16(eocd + 10, true);
  let cd = view.getUint32(eocd + 16, true);
  if ((entries === 0xffff || cd === 0xffffffff) && eocd >= 20 && view.getUint32(eocd - 20, true) === 0x07064b50) {
    const z64 = Number(view.getBigUint64(eocd - 12, true));
    entries = Number(view.getBigUint64(z64 + 32, true));
    cd = Number(view.getBigUint64(z64 + 48, true));
  }
  /** @type {Record<string, NdArray>} */
  const out = {};
  for (let e = 0, p = cd; e < entries; e++) {
    if (view.getUint32(p, true) !== 0x02014b50) fail(`${name}: damaged zip directory`);
    const method = view.getUint16(p + 10, true);
    let size = view.getUint32(p + 20, true);
    const nameLen = view.getUint16(p + 28, true);
    const extraLen = view.getUint16(p + 30, true);
    const commentLen = view.getUint16(p + 32, true);
    let local = view.getUint32(p + 42, true);
    const file = new TextDecoder().decode(bytes.subarray(p + 46, p + 46 + nameLen));
    for (let q = p + 46 + nameLen; q < p + 46 + nameLen + extraLen; q += 4 + view.getUint16(q + 2, true)) {
      if (view.getUint16(q, true) !== 0x0001) continue; // zip64: the sizes and offset that overflowed, in order
      let r = q + 4;
      if (view.getUint32(p + 24, true) === 0xffffffff) r += 8;
      if (size === 0xffffffff) { size = Number(view.getBigUint64(r, true)); r += 8; }
      if (local === 0xffffffff) local = Number(view.getBigUint64(r, true));
    }
    const data = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    if (file.endsWith('.npy')) {
      const key = file.slice(0, -4);
      out[key] = parseNpy(await inflate(bytes.subarray(data, data + size), method, name), `${name}:${key}`);
    }
    p += 46 + nameLen + extraLen + commentLen;
  }
  return out;
}

/** CSV rows as Python's csv.reader reads them (quotes, "" escapes, \n or \r\n); blank lines dropped. @param {string} text */
function csvRows(text) {
  const rows = [];
  let row = [];
  let field = '';
  let quoted = false;
  let any = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') { field += '"'; i++; } else if (ch === '"') quoted = false;
      else field += ch;
    } else if (ch === '"' && field === '') { quoted = true; any = true; } else if (ch === ',') {
      row.push(field); field = ''; any = true;
    } else if (ch === '\n' || ch === '\r') {
      if (ch === '\r' && text[i + 1] === '\n') i++;
      if (any || field) { row.push(field); rows.push(row); }
      row = []; field = ''; any = false;
    } else { field += ch; any = true; }
  }
  if (any || field) { row.push(field); rows.push(row); }
  return rows;
}

const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|infinity|nan)$/i;

/** Python's float(text) for the decimal forms a CSV holds; NaN for an empty field; null if not a number. @param {string} text */
function csvNumber(text) {
  const t = text.trim();
  if (t === '') return NaN;
  if (!NUMBER.test(t)) return null;
  const lower = t.toLowerCase().replace(/^[+]/, '');
  if (lower.endsWith('nan')) return NaN;
  if (lower.endsWith('inf') || lower.endsWith('infinity')) return lower.startsWith('-') ? -Infinity : Infinity;
  return Number(t);
}

/**
 * A table: every column but `target` is a numeric feature (float32, file order). A classification target may be
 * text: the classes are its sorted distinct values (`labelNames`).
 * @param {string} text @param {string | undefined} target @param {{task?: 'classification' | 'regression',
 *   name?: string}} [options]
 * @returns {Table}
 */
export function parseCsv(text, target, { task = 'classification', name = 'data.csv' } = {}) {
  if (!target) fail(`${name} is a CSV: name the label column (target)`);
  const rows = csvRows(text);
  if (!rows.length) fail(`${name} is empty`);
  const header = rows[0].map((h) => h.trim());
  const body = rows.slice(1);
  if (!header.includes(target)) fail(`target ${JSON.stringify(target)} is not a column of ${name}; columns: ${header.join(', ')}`);
  if (!body.length) fail(`${name} has a header but no rows`);
  const bad = body.findIndex((r) => r.length !== header.length);
  if (bad >= 0) fail(`${name} line ${bad + 2} has a different number of fields than the header`);
  const t = header.indexOf(target);
  const featureNames = header.filter((_, i) => i !== t);
  const cols = header.map((_, i) => i).filter((i) => i !== t);
  const n = body.length;
  const x = new Float32Array(n * cols.length);
  const text_ = [];
  cols.forEach((c, j) => {
    for (let r = 0; r < n; r++) {
      const v = csvNumber(body[r][c]);
      if (v === null) { text_.push(header[c]); return; }
      x[r * cols.length + j] = v;
    }
  });
  if (text_.length) {
    fail(`${name}: column(s) ${text_.map((h) => `'${h}'`).join(', ')} are not numeric; encode them as numbers `
      + '(e.g. one-hot) or drop them');
  }
  const raw = body.map((r) => r[t].trim());
  const nums = raw.map((v) => (v === '' ? null : csvNumber(v))); // Python's float('') fails: a text label
  let labelNames = [];
  let y;
  if (nums.every((v) => v !== null)) {
    if (task === 'classification') {
      if (nums.some((v) => !Number.isInteger(v))) {
        fail(`${name}: target '${target}' holds non-integer values, but the bundle is a classifier`);
      }
      y = Int32Array.from(/** @type {number[]} */ (nums));
    } else y = Float32Array.from(/** @type {number[]} */ (nums));
  } else {
    if (task === 'regression') fail(`${name}: target '${target}' is not numeric, but the bundle's loss is mse (regression)`);
    labelNames = [...new Set(raw)].sort();
    y = Int32Array.from(raw, (v) => labelNames.indexOf(v));
  }
  return { x, y, n, labelNames, featureNames };
}

/**
 * The manifest's transform on raw values laid out `[n, c, ...]`: `(x * scale - mean[c]) / std[c]` in float64,
 * rounded to float32 (what the Python reference computes); `tokens` ids pass through as int32.
 * @param {ArrayLike<number> | ArrayLike<bigint>} values @param {number[]} shape @param {PreprocessSpec} spec
 * @returns {Float32Array | Int32Array}
 */
export function preprocess(values, shape, spec) {
  if (spec.kind === 'tokens') return toInt32(values, 'token ids');
  const scale = spec.scale ?? 1;
  const mean = spec.mean ?? [];
  const std = spec.std ?? [];
  const channels = shape.length > 1 ? shape[1] : 1;
  const inner = shape.slice(2).reduce((a, b) => a * b, 1);
  const out = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = Math.fround(Number(values[i])) * scale; // float32 input, as the reference's x.double()
    if (mean.length) {
      const c = mean.length === 1 ? 0 : Math.floor(i / inner) % channels;
      out[i] = (v - mean[c]) / std[c];
    } else out[i] = v;
  }
  return out;
}

/** @param {ArrayLike<number> | ArrayLike<bigint>} values @param {string} what */
function toInt32(values, what) {
  const out = new Int32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = Number(values[i]);
    if (!Number.isInteger(v) || v < -(2 ** 31) || v >= 2 ** 31) fail(`${what}: ${values[i]} does not fit int32`);
    out[i] = v;
  }
  return out;
}

/** @param {NdArray} a */
const isInt = (a) => /^[iub]/.test(a.dtype);

/**
 * Read the device's data from file bytes for the bundle described by `manifest` (manifest.json, e.g. from
 * `GET /v1/manifest`): check it fits the first segment's input and the classifier, apply the recorded
 * preprocessing, and split it 75/25 (stratified by class, seeded) unless the file has `x_test`/`y_test`.
 * The split is the device's own; the transform is exactly the one `simulate` applies.
 * @param {ArrayBuffer | Uint8Array} bytes @param {any} manifest @param {DataOptions} options
 * @returns {Promise<import('./train.js').Dataset & {labelNames: string[]}>}
 */
export async function loadData(bytes, manifest, options) {
  const { format, seed = 0 } = options;
  const name = options.name ?? `data.${format}`;
  const classify = manifest.loss?.kind !== 'mse';
  const inp = manifest.segments[0].input;
  const sample = inp.shape.slice(1);
  /** @type {PreprocessSpec | null} */
  const spec = manifest.preprocess ?? null;
  let parts; // [x, y] or [x, y, xTest, yTest], x as raw values with a sample shape
  let labelNames = [];
  if (format === 'csv') {
    if (spec == null) {
      fail(`the bundle records no preprocessing for a CSV; partition it with --data or --preprocess so every device `
        + 'scales the features the same way');
    }
    const table = parseCsv(new TextDecoder('utf-8', { ignoreBOM: true }).decode(asBytes(bytes)), options.target,
      { task: classify ? 'classification' : 'regression', name });
    if (spec.feature_names?.length && spec.feature_names.join('\u0000') !== table.featureNames.join('\u0000')) {
      fail(`data '${name}' has columns ${JSON.stringify(table.featureNames)}, but the bundle was prepared for `
        + `${JSON.stringify(spec.feature_names)}`);
    }
    labelNames = table.labelNames;
    parts = [{ dtype: 'f4', shape: [table.n, table.featureNames.length], data: table.x },
      { dtype: classify ? 'i8' : 'f4', shape: [table.n], data: table.y }];
  } else if (format === 'npz') {
    const arrays = await parseNpz(bytes, name);
    const missing = ['x', 'y'].filter((k) => !(k in arrays));
    if (missing.length) fail(`${name} has no array '${missing.join("' or '")}'; it holds ${Object.keys(arrays).sort().join(', ')}`);
    if (('x_test' in arrays) !== ('y_test' in arrays)) fail(`${name}: give both x_test and y_test, or neither`);
    parts = [arrays.x, arrays.y, ...('x_test' in arrays ? [arrays.x_test, arrays.y_test] : [])];
  } else if (format === 'npy') {
    if (options.labels == null) fail(`${name}: an .npy holds only x; pass its labels (the .labels.npy beside it)`);
    parts = [parseNpy(bytes, name), parseNpy(options.labels, `${name} labels`)];
  } else fail(`unknown data format ${JSON.stringify(format)}; give npz, npy or csv`);
  const [x, y, xTest, yTest] = parts;
  for (const [a, b, what] of [[x, y, 'x'], [xTest, yTest, 'x_test']]) {
    if (a && a.shape[0] !== b.shape[0]) fail(`${name}: ${what} has ${a.shape[0]} samples but its labels ${b.shape[0]}`);
  }
  // the same checks, in the same order, as splitexport.simulation.datafiles
  for (const [a, what] of [[x, 'x'], [y, 'y'], [xTest, 'x_test'], [yTest, 'y_test']]) {
    if (a && !isInt(a) && Array.prototype.some.call(a.data, (v) => !Number.isFinite(v))) {
      const per = a.shape.slice(1).reduce((p, d) => p * d, 1);
      const first = Math.floor(Array.prototype.findIndex.call(a.data, (v) => !Number.isFinite(v)) / per);
      fail(`${name}: ${what} holds NaN or Inf (first in sample ${first}); clean or impute it first`);
    }
  }
  const labels = (/** @type {NdArray} */ a, what) => {
    if (!classify) return Float32Array.from(a.data, Number);
    if (!isInt(a) && Array.prototype.some.call(a.data, (v) => v !== Math.round(v))) {
      fail(`${name}: class labels in ${what} must be whole numbers, got dtype ${a.dtype}`);
    }
    return toInt32(a.data, `${name}: ${what}`);
  };
  let yTr = labels(y, 'y');
  let yTe = yTest ? labels(yTest, 'y_test') : null;
  const names = spec?.label_names ?? [];
  if (classify && labelNames.length && names.length && labelNames.join('\u0000') !== names.join('\u0000')) {
    const unknown = labelNames.filter((l) => !names.includes(l));
    if (unknown.length) {
      fail(`data '${name}' has class(es) ${unknown.map((u) => `'${u}'`).join(', ')} that the bundle does not know; `
        + `its classes are ${names.join(', ')}`);
    }
    const lut = labelNames.map((l) => names.indexOf(l));
    yTr = Int32Array.from(yTr, (v) => lut[v]);
    if (yTe) yTe = Int32Array.from(yTe, (v) => lut[v]);
    labelNames = names;
  }
  const got = x.shape.slice(1);
  if (got.join() !== sample.join() || (xTest && xTest.shape.slice(1).join() !== sample.join())) {
    fail(`data '${name}' has samples of shape (${got.join(', ')}), but the bundle's input is (${sample.join(', ')})`);
  }
  const wantInt = !inp.dtype.startsWith('float');
  if (wantInt !== isInt(x)) {
    fail(`data '${name}' has ${isInt(x) ? 'int' : 'float'} samples, but the bundle's input is ${inp.dtype}`
      + (wantInt ? ' (token ids)' : ' (cast token ids or use a model that embeds them)'));
  }
  const out = manifest.segments[manifest.segments.length - 1].output.shape.slice(1);
  if (classify) {
    const k = out[0];
    for (const arr of [yTr, yTe]) {
      const badLabel = arr && Array.prototype.find.call(arr, (v) => v < 0 || v >= k);
      if (badLabel !== undefined && badLabel !== null) {
        fail(`data '${name}' has label ${badLabel}, but the bundle's classifier has ${k} classes (labels 0..${k - 1})`);
      }
    }
  }
  const transform = spec ?? { kind: wantInt ? 'tokens' : 'array' };
  const xs = preprocess(x.data, x.shape, transform);
  const dtype = wantInt ? 'int32' : 'float32';
  const yShape = classify ? [] : out;
  let data;
  if (xTest) {
    const xt = preprocess(xTest.data, xTest.shape, transform);
    data = { xTrain: tf.tensor(xs, x.shape, dtype), yTrain: labelTensor(yTr, yShape, classify),
      xTest: tf.tensor(xt, xTest.shape, dtype), yTest: labelTensor(/** @type {any} */ (yTe), yShape, classify) };
  } else {
    const [train, test] = splitIndices(yTr, classify, seed);
    const take = (/** @type {Int32Array} */ idx) => {
      const per = sample.reduce((a, b) => a * b, 1);
      const dst = new (wantInt ? Int32Array : Float32Array)(idx.length * per);
      idx.forEach((r, i) => dst.set(xs.subarray(r * per, (r + 1) * per), i * per));
      return tf.tensor(dst, [idx.length, ...sample], dtype);
    };
    const pick = (/** @type {Int32Array} */ idx) => labelTensor(
      classify ? Int32Array.from(idx, (i) => yTr[i]) : Float32Array.from(idx, (i) => yTr[i]), yShape, classify);
    data = { xTrain: take(train), yTrain: pick(train), xTest: take(test), yTest: pick(test) };
  }
  return { ...data, labelNames };
}

/** @param {Int32Array | Float32Array} y @param {number[]} outShape @param {boolean} classify */
function labelTensor(y, outShape, classify) {
  if (classify) return tf.tensor1d(y, 'int32');
  const per = outShape.reduce((a, b) => a * b, 1);
  return tf.tensor(y, [y.length / per, ...outShape], 'float32');
}

/** Deterministic PRNG (mulberry32): the batch order in training, the split here. @param {number} seed */
export function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * A seeded 75/25 train/test split of row indices; by class for a classifier (each class gives a quarter, rounded,
 * of its rows to the test set, at least one row staying in training).
 * @param {ArrayLike<number>} y @param {boolean} classify @param {number} seed
 * @returns {[Int32Array, Int32Array]}
 */
export function splitIndices(y, classify, seed = 0) {
  if (y.length < 2) fail(`need at least 2 samples to split into train and test, got ${y.length}`);
  const random = rng(seed);
  const shuffle = (/** @type {number[]} */ a) => {
    for (let i = a.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [a[i], a[j]] = [a[j], a[i]];
    }
    return a;
  };
  const groups = new Map();
  for (let i = 0; i < y.length; i++) {
    const key = classify ? y[i] : 0;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(i);
  }
  const train = [];
  const test = [];
  for (const key of [...groups.keys()].sort((a, b) => a - b)) {
    const rows = shuffle(groups.get(key));
    const k = Math.min(rows.length - 1, Math.round(rows.length * TEST_FRACTION));
    test.push(...rows.slice(0, k));
    train.push(...rows.slice(k));
  }
  return [Int32Array.from(shuffle(train)), Int32Array.from(test.sort((a, b) => a - b))];
}
