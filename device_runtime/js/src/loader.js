/**
 * Load device segments over HTTP with sha256 checks (WebCrypto): from any URL (a static host, a CDN, the
 * app's own assets) or from the server's content-addressed `/v1/artifacts/{sha256}`.
 *
 * `model.json` names its weight shards by paths relative to itself; on the server every file lives at its
 * hash instead, so those paths are resolved through the bundle manifest (`GET /v1/manifest`).
 */
import * as tf from '@tensorflow/tfjs';

import { DeviceRuntimeError, DeviceSegment } from './segment.js';

/**
 * @typedef {object} LoadOptions
 * @property {Record<string, string>} [sha256] expected sha256 (hex) per file name relative to the segment
 *   directory (`model.json`, `splitexport.json`, shards); when given, every file must be listed and match
 * @property {typeof fetch} [fetch] fetch implementation (default: the global one)
 * @property {boolean} [checkBackend] check the backend's kernels at load time (default true)
 */

/** Hex sha256 of `bytes` (WebCrypto: browsers, workers, Node >= 18). @param {ArrayBuffer | Uint8Array} bytes */
export async function sha256Hex(bytes) {
  const digest = await globalThis.crypto.subtle.digest('SHA-256', bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

/** @param {string} what @param {Uint8Array} bytes @param {string | undefined} expected */
async function verify(what, bytes, expected) {
  if (expected == null) return;
  const got = await sha256Hex(bytes);
  if (got !== expected.toLowerCase()) {
    throw new DeviceRuntimeError(`${what}: sha256 ${got} does not match the expected ${expected}; refusing to load it`);
  }
}

const decoder = new TextDecoder();

/** @param {Uint8Array} bytes @param {string} what */
function parseJson(bytes, what) {
  try {
    return JSON.parse(decoder.decode(bytes));
  } catch (err) {
    throw new DeviceRuntimeError(`${what} is not JSON: ${err instanceof Error ? err.message : err}`);
  }
}

/**
 * Build the segment from its files, given a reader of names relative to the segment directory.
 * @param {(name: string) => Promise<Uint8Array>} read
 * @param {boolean} checkBackend
 */
async function assemble(read, checkBackend) {
  const modelJson = parseJson(await read('model.json'), 'model.json');
  const meta = parseJson(await read('splitexport.json'), 'splitexport.json');
  if (!Array.isArray(modelJson.weightsManifest)) throw new DeviceRuntimeError('model.json has no weightsManifest');
  const weightSpecs = [];
  const shards = [];
  for (const group of modelJson.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const rel of group.paths) shards.push(await read(rel));
  }
  const size = shards.reduce((n, s) => n + s.byteLength, 0);
  const weightData = new Uint8Array(size);
  let offset = 0;
  for (const s of shards) {
    weightData.set(s, offset);
    offset += s.byteLength;
  }
  /** @type {tf.io.IOHandler} */
  const handler = {
    load: async () => ({ modelTopology: modelJson.modelTopology, format: modelJson.format,
      generatedBy: modelJson.generatedBy, convertedBy: modelJson.convertedBy, weightSpecs,
      weightData: weightData.buffer }),
  };
  const segment = await DeviceSegment.load(handler, meta);
  if (checkBackend) {
    try {
      await segment.checkBackend();
    } catch (err) {
      segment.dispose();
      throw err;
    }
  }
  return segment;
}

/**
 * A segment from a URL: its directory (`.../tfjs/A/`) or its `model.json`, next to `splitexport.json` and the
 * shards (what `splitexport deploy` writes).
 * @param {string} url @param {LoadOptions} [options] @returns {Promise<DeviceSegment>}
 */
export async function loadSegment(url, options = {}) {
  const doFetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  const base = new URL(url.endsWith('model.json') ? url : url.replace(/\/?$/, '/model.json'),
    globalThis.location?.href);
  const hashes = options.sha256;
  return assemble(async (name) => {
    if (hashes != null && hashes[name] == null) throw new DeviceRuntimeError(`no expected sha256 for ${name}`);
    const target = new URL(name, base);
    const response = await doFetch(target.href);
    if (!response.ok) throw new DeviceRuntimeError(`GET ${target.href}: HTTP ${response.status}`);
    const bytes = new Uint8Array(await response.arrayBuffer());
    await verify(target.href, bytes, hashes?.[name]);
    return bytes;
  }, options.checkBackend ?? true);
}

/** @param {any} manifest @param {string} name */
function tfjsArtifacts(manifest, name) {
  const seg = manifest.segments?.find((/** @type {any} */ s) => s.name === name);
  const names = (manifest.segments ?? []).filter((/** @type {any} */ s) => s.artifacts?.tfjs).map((/** @type {any} */ s) => s.name);
  if (seg == null || seg.artifacts?.tfjs == null) {
    throw new DeviceRuntimeError(`the bundle has no TF.js segment ${JSON.stringify(name)} (it has: ${names.join(', ') || 'none'}; ` +
      'export it with `splitexport export BUNDLE --format tfjs`)');
  }
  const model = seg.artifacts.tfjs.model;
  return { dir: model.slice(0, model.lastIndexOf('/') + 1), files: manifest.files };
}

/**
 * A segment from a deployed asset directory (`splitexport deploy --to DIR` served over HTTP): every file
 * is checked against DIR/manifest.json. Note the manifest itself is trusted as served.
 * @param {string} assetsUrl @param {string} name e.g. 'A' @param {LoadOptions} [options]
 */
export async function loadDeployedSegment(assetsUrl, name, options = {}) {
  const doFetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  const base = new URL(assetsUrl.replace(/\/?$/, '/'), globalThis.location?.href);
  const response = await doFetch(new URL('manifest.json', base).href);
  if (!response.ok) throw new DeviceRuntimeError(`GET ${base.href}manifest.json: HTTP ${response.status}`);
  const { dir, files } = tfjsArtifacts(await response.json(), name);
  /** @type {Record<string, string>} */
  const sha256 = {};
  for (const [rel, digest] of Object.entries(files)) if (rel.startsWith(dir)) sha256[rel.slice(dir.length)] = String(digest);
  return loadSegment(new URL(dir, base).href, { ...options, sha256 });
}

/**
 * A segment from the server: `GET /v1/manifest`, then each file from `/v1/artifacts/{sha256}` (with the
 * client's token and retries), each checked against its hash.
 * @param {import('./client.js').ServerClient} client @param {string} name e.g. 'A' or 'C'
 * @param {{checkBackend?: boolean}} [options] @returns {Promise<DeviceSegment>}
 */
export async function loadSegmentFromServer(client, name, options = {}) {
  const { manifest } = await client.manifest();
  const { dir, files } = tfjsArtifacts(manifest, name);
  return assemble(async (rel) => {
    const path = dir + rel;
    const digest = files[path];
    if (digest == null) throw new DeviceRuntimeError(`model.json of ${name} names ${path}, which the bundle manifest lacks`);
    const response = await client.request('GET', `/v1/artifacts/${digest}`);
    const bytes = new Uint8Array(await response.arrayBuffer());
    await verify(`${path} (${client.baseUrl}/v1/artifacts/${digest})`, bytes, digest);
    return bytes;
  }, options.checkBackend ?? true);
}
