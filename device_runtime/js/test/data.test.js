// The JS data loader (src/data.js): .npy/.npz parsed in plain JS, CSV with a target column, the manifest's
// preprocessing, and every bad-data case. The parity test reads the same files as Python's
// splitexport.simulation.datafiles.load_data (what simulate and the Python device use; fixture written by
// tests/device_runtime/js_data_fixture.py with $SPLITEXPORT_PYTHON, default <repo>/.venv/bin/python) and needs
// the same rows bit for bit; it is skipped when that Python is missing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { DeviceRuntimeError, loadData, parseCsv, parseNpy, preprocess, splitIndices, tf } from '../src/index.js';
import { loadDataFile } from '../src/node.js';

const pkgRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const repoRoot = path.resolve(pkgRoot, '..', '..');
const python = process.env.SPLITEXPORT_PYTHON ?? path.join(repoRoot, '.venv', 'bin', 'python');

/** The bytes of a .npy (format 1.0) holding `data` with numpy dtype `descr`. */
function npy(descr, shape, data, { fortran = false } = {}) {
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(', ');
  let header = `{'descr': '${descr}', 'fortran_order': ${fortran ? 'True' : 'False'}, 'shape': (${dims}), }`;
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n';
  const head = new Uint8Array(10 + header.length);
  head.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  new DataView(head.buffer).setUint16(8, header.length, true);
  head.set(new TextEncoder().encode(header), 10);
  const body = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const out = new Uint8Array(head.length + body.length);
  out.set(head);
  out.set(body, head.length);
  return out;
}

/** A manifest with just what the loader reads. */
function manifest({ input = [4], dtype = 'float32', output = [3], loss = 'cross_entropy', preprocess: pre = null }) {
  return { loss: { kind: loss }, preprocess: pre,
    segments: [{ input: { shape: ['batch', ...input], dtype } }, { output: { shape: ['batch', ...output] } }] };
}

const error = (re) => (err) => err instanceof DeviceRuntimeError && re.test(err.message);
const csvBytes = (text) => new TextEncoder().encode(text);

test('parseNpy reads numpy dtypes and shapes, and refuses what it cannot read in one message', () => {
  const f = parseNpy(npy('<f4', [2, 3], Float32Array.from([1, 2, 3, 4, 5, 0.1])));
  assert.deepEqual(f.shape, [2, 3]);
  assert.equal(f.dtype, 'f4');
  assert.equal(f.data[5], Math.fround(0.1));
  const i = parseNpy(npy('<i8', [3], BigInt64Array.from([1n, -2n, 3n])));
  assert.deepEqual(Array.from(i.data, Number), [1, -2, 3]);
  assert.deepEqual(Array.from(parseNpy(npy('|u1', [2], Uint8Array.from([7, 255]))).data), [7, 255]);
  assert.throws(() => parseNpy(new Uint8Array(20)), error(/not a NumPy \.npy file/));
  assert.throws(() => parseNpy(npy('<f4', [1, 2], new Float32Array(2), { fortran: true })), error(/Fortran order/));
  assert.throws(() => parseNpy(npy('>f4', [2], new Float32Array(2))), error(/holds >f4 values/));
  assert.throws(() => parseNpy(npy('|O', [1], new Uint8Array(8))), error(/holds \|O values/));
  assert.throws(() => parseNpy(npy('<f4', [4], new Float32Array(2))), error(/truncated/));
});

test('parseCsv reads quotes, CRLF and blank lines like csv.reader; text labels are the sorted values', () => {
  const t = parseCsv('a, b ,y\r\n1,"2.5",emu\r\n\r\n-3e2, 4 ,cat\r\n.5,,cat\r\n', 'y');
  assert.deepEqual(t.featureNames, ['a', 'b']);
  assert.deepEqual(t.labelNames, ['cat', 'emu']);
  assert.deepEqual(Array.from(t.y), [1, 0, 0]);
  assert.deepEqual(Array.from(t.x).slice(0, 5), [1, 2.5, -300, 4, 0.5]);
  assert.ok(Number.isNaN(t.x[5])); // an empty feature is NaN (refused later, as in Python)
  assert.throws(() => parseCsv('a,color,size,y\n1,red,s,0\n', 'y'), error(/column\(s\) 'color', 'size' are not numeric/));
  assert.throws(() => parseCsv('a,y\n1,0\n', undefined), error(/name the label column/));
  assert.throws(() => parseCsv('a,y\n1,0\n', 'price'), error(/"price" is not a column of data\.csv; columns: a, y/));
  assert.throws(() => parseCsv('a,y\n1,0,3\n', 'y'), error(/line 2 has a different number of fields/));
  assert.throws(() => parseCsv('a,y\n1,0.5\n', 'y'), error(/non-integer values/));
  assert.throws(() => parseCsv('a,y\n1,big\n', 'y', { task: 'regression' }), error(/not numeric, but the bundle's loss is mse/));
});

test('preprocess: (x * scale - mean[c]) / std[c] per channel of axis 1 in float64, rounded to float32', () => {
  const spec = { kind: 'image', scale: 1 / 255, mean: [0.5, 0.25], std: [0.2, 0.4] };
  const raw = Float32Array.from([0, 255, 10, 20, 30, 40, 50, 60]); // [1, 2, 2, 2]
  const got = preprocess(raw, [1, 2, 2, 2], spec);
  const want = Array.from(raw, (v, i) => Math.fround((v * (1 / 255) - spec.mean[i >> 2]) / spec.std[i >> 2]));
  assert.deepEqual(Array.from(got), want);
  const ids = preprocess(BigInt64Array.from([3n, 7n]), [1, 2], { kind: 'tokens' });
  assert.ok(ids instanceof Int32Array);
  assert.deepEqual(Array.from(ids), [3, 7]);
  assert.throws(() => preprocess(BigInt64Array.from([2n ** 40n]), [1, 1], { kind: 'tokens' }), error(/does not fit int32/));
});

test('splitIndices: a seeded 75/25 split per class, disjoint and covering every row', () => {
  const y = Int32Array.from({ length: 40 }, (_, i) => (i < 24 ? 0 : i < 36 ? 1 : 2));
  const [train, test_] = splitIndices(y, true, 0);
  assert.deepEqual([...train, ...test_].sort((a, b) => a - b), Array.from({ length: 40 }, (_, i) => i));
  const counts = [0, 0, 0];
  test_.forEach((i) => { counts[y[i]] += 1; });
  assert.deepEqual(counts, [6, 3, 1]);
  assert.deepEqual(splitIndices(y, true, 0), [train, test_]);
  assert.notDeepEqual(splitIndices(y, true, 1)[1], test_);
});

test('loadData: bad data is one DeviceRuntimeError naming what is wrong', async () => {
  const x = npy('<f4', [4, 5], new Float32Array(20));
  const labels = npy('<i8', [4], BigInt64Array.from([0n, 1n, 2n, 0n]));
  const m = manifest({});
  await assert.rejects(loadData(x, m, { format: 'npy', labels }), error(/samples of shape \(5\), but the bundle's input is \(4\)/));
  const ints = npy('<i8', [4, 4], new BigInt64Array(16));
  await assert.rejects(loadData(ints, m, { format: 'npy', labels }), error(/int samples, but the bundle's input is float32/));
  const four = npy('<f4', [4, 4], new Float32Array(16));
  const high = npy('<i8', [4], BigInt64Array.from([0n, 1n, 3n, 0n]));
  await assert.rejects(loadData(four, m, { format: 'npy', labels: high }), error(/label 3, but the bundle's classifier has 3 classes/));
  const inf = new Float32Array(16);
  inf[9] = Infinity;
  await assert.rejects(loadData(npy('<f4', [4, 4], inf), m, { format: 'npy', labels }), error(/x holds NaN or Inf \(first in sample 2\)/));
  await assert.rejects(loadData(four, m, { format: 'npy' }), error(/an \.npy holds only x/));
  const csv = csvBytes('a,b,c,d,y\n1,2,3,4,cat\n5,6,7,8,dog\n');
  await assert.rejects(loadData(csv, m, { format: 'csv', target: 'y' }), error(/records no preprocessing for a CSV/));
  const table = { kind: 'table', mean: [0, 0, 0, 0], std: [1, 1, 1, 1], feature_names: ['a', 'b', 'c', 'e'],
    label_names: ['cat', 'dog', 'emu'], num_classes: 3 };
  await assert.rejects(loadData(csv, manifest({ preprocess: table }), { format: 'csv', target: 'y' }),
    error(/columns \["a","b","c","d"\], but the bundle was prepared for \["a","b","c","e"\]/));
  const fox = csvBytes('a,b,c,e,y\n1,2,3,4,cat\n5,6,7,8,fox\n');
  await assert.rejects(loadData(fox, manifest({ preprocess: table }), { format: 'csv', target: 'y' }),
    error(/class\(es\) 'fox' that the bundle does not know; its classes are cat, dog, emu/));
  await assert.rejects(loadData(four, m, { format: 'json' }), error(/unknown data format "json"/));
});

test('loadData gives the dataset trainSplit takes: int32 labels, a regression target shaped like the output', async () => {
  const x = npy('<f8', [8, 4], Float64Array.from({ length: 32 }, (_, i) => i / 3));
  const y = npy('<f8', [8], Float64Array.from({ length: 8 }, (_, i) => i * 0.5));
  const reg = await loadData(x, manifest({ loss: 'mse', output: [1] }), { format: 'npy', labels: y });
  assert.deepEqual(reg.xTrain.shape, [6, 4]);
  assert.deepEqual(reg.yTrain.shape, [6, 1]);
  assert.equal(reg.yTrain.dtype, 'float32');
  const cls = await loadData(x, manifest({}), { format: 'npy', labels: npy('<i4', [8], Int32Array.from([0, 1, 2, 0, 1, 2, 0, 1])) });
  assert.equal(cls.yTrain.dtype, 'int32');
  assert.equal(cls.xTrain.shape[0] + cls.xTest.shape[0], 8);
  tf.dispose([reg.xTrain, reg.yTrain, reg.xTest, reg.yTest, cls.xTrain, cls.yTrain, cls.xTest, cls.yTest]);
});

/** Each row's bytes (hex) with its label, sorted: the same multiset of samples whatever the split. */
function rows(x, y, shape, yWidth) {
  const per = shape.slice(1).reduce((a, b) => a * b, 1);
  const xb = Buffer.from(x.buffer, x.byteOffset, x.byteLength);
  const yb = Buffer.from(y.buffer, y.byteOffset, y.byteLength);
  return Array.from({ length: shape[0] }, (_, i) => `${xb.subarray(i * per * 4, (i + 1) * per * 4).toString('hex')}|`
    + yb.subarray(i * yWidth * 4, (i + 1) * yWidth * 4).toString('hex')).sort();
}

const pythonSkip = existsSync(python) ? false : `no Python environment at ${python} (set SPLITEXPORT_PYTHON)`;

test('the same file gives the same preprocessed rows in JS and in Python (bit for bit)', { skip: pythonSkip }, async () => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'splitexport-data-'));
  const res = spawnSync(python, ['-m', 'tests.device_runtime.js_data_fixture', out],
    { cwd: repoRoot, encoding: 'utf8', env: { ...process.env, TFDF_DISABLE_WELCOME_MESSAGE: '1' } });
  if (res.status !== 0) throw new Error(`fixture script failed (${python}):\n${res.stderr}`);
  const { cases } = JSON.parse(readFileSync(path.join(out, 'fixture.json'), 'utf8'));
  assert.equal(cases.length, 6);
  for (const c of cases) {
    const data = await loadDataFile(c.file, c.manifest, c.target ? { target: c.target } : {});
    const x = tf.concat([data.xTrain, data.xTest]);
    const y = tf.concat([data.yTrain, data.yTest]);
    assert.deepEqual(x.shape, c.shape, c.name);
    assert.equal(x.dtype, c.x_dtype, c.name);
    assert.deepEqual(y.shape, c.y_shape, c.name);
    assert.equal(y.dtype, c.y_dtype, c.name);
    const b64 = (s, T) => { const b = Buffer.from(s, 'base64'); return new T(b.buffer, b.byteOffset, b.byteLength / 4); };
    const width = c.y_shape.slice(1).reduce((a, b) => a * b, 1);
    const want = rows(b64(c.x, c.x_dtype === 'int32' ? Int32Array : Float32Array),
      b64(c.y, c.y_dtype === 'int32' ? Int32Array : Float32Array), c.shape, width);
    const got = rows(x.dataSync(), y.dataSync(), x.shape, width);
    assert.deepEqual(got, want, `${c.name}: JS rows differ from Python's`);
    if (c.name === 'csv subset') assert.deepEqual([...new Set(y.dataSync())].sort(), [1, 2]); // dog, emu by name
    tf.dispose([x, y, data.xTrain, data.yTrain, data.xTest, data.yTest]);
  }
});
