/**
 * safetensors encode/decode for the server protocol (docs/protocol.md): an 8-byte little-endian
 * header length, a JSON header `{name: {dtype, shape, data_offsets}}`, then raw little-endian data.
 * Pure JS (DataView, typed arrays): no Buffer, no BigInt, so it runs in browsers and React Native.
 */

/**
 * @typedef {'F32' | 'F16' | 'I64' | 'I32'} Dtype
 * @typedef {{dtype: Dtype, shape: number[], data: Float32Array | Int32Array}} Tensor
 *   F32/F16 decode to Float32Array; I64/I32 to Int32Array (class ids; larger values are an error).
 */

const ITEM_SIZE = { F32: 4, F16: 2, I64: 8, I32: 4 };

/** Error for a body that is not valid safetensors (or holds a dtype this client cannot read). */
export class SafetensorsError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = 'SafetensorsError';
  }
}

/** @param {string} text @returns {Uint8Array} */
function utf8Encode(text) {
  if (typeof TextEncoder !== 'undefined') return new TextEncoder().encode(text);
  const bytes = unescape(encodeURIComponent(text));
  return Uint8Array.from(bytes, (c) => c.charCodeAt(0));
}

/** @param {Uint8Array} bytes @returns {string} */
function utf8Decode(bytes) {
  if (typeof TextDecoder !== 'undefined') return new TextDecoder().decode(bytes);
  return decodeURIComponent(escape(String.fromCharCode(...bytes)));
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 -> IEEE half bits, round to nearest even (what numpy's astype(float16) does). */
export function toHalf(value) {
  f32[0] = value;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // inf / nan
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow -> inf
  if (e <= 0) {
    if (e < -10) return sign; // underflow -> signed zero
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rest > mid || (rest === mid && half & 1)) half += 1;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && half & 1)) half += 1; // may carry into the exponent: correct
  return sign | half;
}

/** IEEE half bits -> float. */
export function fromHalf(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/**
 * Encode named tensors. Float data (Float32Array) travels as F32, or as F16 with `{fp16: true}`;
 * integer data (Int32Array, or any array with dtype 'I64') travels as I64.
 * @param {Record<string, {shape: number[], data: Float32Array | Int32Array | number[], dtype?: Dtype}>} tensors
 * @param {{fp16?: boolean}} [options]
 * @returns {Uint8Array}
 */
export function encodeSafetensors(tensors, options = {}) {
  /** @type {Record<string, {dtype: Dtype, shape: number[], data_offsets: [number, number]}>} */
  const header = {};
  const parts = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const isInt = t.dtype === 'I64' || t.dtype === 'I32' || t.data instanceof Int32Array;
    /** @type {Dtype} */
    const dtype = isInt ? 'I64' : options.fp16 ? 'F16' : 'F32';
    const n = t.data.length;
    const expected = t.shape.reduce((a, b) => a * b, 1);
    if (n !== expected) throw new SafetensorsError(`${name}: ${n} values for shape [${t.shape}]`);
    const bytes = new Uint8Array(n * ITEM_SIZE[dtype]);
    const view = new DataView(bytes.buffer);
    for (let i = 0; i < n; i++) {
      const v = t.data[i];
      if (dtype === 'F32') view.setFloat32(4 * i, v, true);
      else if (dtype === 'F16') view.setUint16(2 * i, toHalf(v), true);
      else {
        view.setInt32(8 * i, v, true);
        view.setInt32(8 * i + 4, v < 0 ? -1 : 0, true);
      }
    }
    header[name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes.length] };
    parts.push(bytes);
    offset += bytes.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8); // align the data (safetensors pads with spaces)
  const head = utf8Encode(json);
  const out = new Uint8Array(8 + head.length + offset);
  const view = new DataView(out.buffer);
  view.setUint32(0, head.length, true);
  view.setUint32(4, 0, true);
  out.set(head, 8);
  let at = 8 + head.length;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * Decode a safetensors body.
 * @param {ArrayBuffer | Uint8Array} body
 * @returns {Record<string, Tensor>}
 */
export function decodeSafetensors(body) {
  const bytes = body instanceof Uint8Array ? body : new Uint8Array(body);
  if (bytes.length < 8) throw new SafetensorsError(`body of ${bytes.length} bytes is too short`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headLen = view.getUint32(0, true) + view.getUint32(4, true) * 2 ** 32;
  if (8 + headLen > bytes.length) throw new SafetensorsError('header length exceeds the body');
  const header = JSON.parse(utf8Decode(bytes.subarray(8, 8 + headLen)));
  const base = 8 + headLen;
  /** @type {Record<string, Tensor>} */
  const out = {};
  for (const [name, spec] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const { dtype, shape, data_offsets: [start, end] } = spec;
    const size = ITEM_SIZE[/** @type {Dtype} */ (dtype)];
    if (size == null) throw new SafetensorsError(`${name}: unsupported dtype ${dtype}`);
    const n = (end - start) / size;
    if (base + end > bytes.length || n !== shape.reduce((a, b) => a * b, 1)) {
      throw new SafetensorsError(`${name}: data does not match shape [${shape}]`);
    }
    const at = base + start;
    const isInt = dtype === 'I64' || dtype === 'I32';
    const data = isInt ? new Int32Array(n) : new Float32Array(n);
    for (let i = 0; i < n; i++) {
      if (dtype === 'F32') data[i] = view.getFloat32(at + 4 * i, true);
      else if (dtype === 'F16') data[i] = fromHalf(view.getUint16(at + 2 * i, true));
      else if (dtype === 'I32') data[i] = view.getInt32(at + 4 * i, true);
      else {
        const lo = view.getInt32(at + 8 * i, true);
        const hi = view.getInt32(at + 8 * i + 4, true);
        if (hi !== (lo < 0 ? -1 : 0)) throw new SafetensorsError(`${name}: int64 value out of int32 range`);
        data[i] = lo;
      }
    }
    out[name] = { dtype, shape, data };
  }
  return out;
}
