/**
 * Node.js helpers: load exported TF.js segments from a directory on disk, and the device's data from a file.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import { loadData } from './data.js';
import { DeviceRuntimeError, DeviceSegment } from './segment.js';

/** A tf.io.IOHandler that reads `model.json` and its weight shards from `dir`. */
export function fileIO(dir) {
  return {
    async load() {
      const modelJson = JSON.parse(await readFile(path.join(dir, 'model.json'), 'utf8'));
      const weightSpecs = [];
      const buffers = [];
      for (const group of modelJson.weightsManifest) {
        weightSpecs.push(...group.weights);
        for (const rel of group.paths) buffers.push(await readFile(path.join(dir, rel)));
      }
      const joined = Buffer.concat(buffers);
      return {
        modelTopology: modelJson.modelTopology,
        format: modelJson.format,
        generatedBy: modelJson.generatedBy,
        convertedBy: modelJson.convertedBy,
        weightSpecs,
        weightData: joined.buffer.slice(joined.byteOffset, joined.byteOffset + joined.byteLength),
      };
    },
  };
}

/** Load a segment exported by splitexport (`model.json`, shards and `splitexport.json` in `dir`). */
export async function loadSegmentFromDir(dir) {
  let meta;
  try {
    meta = JSON.parse(await readFile(path.join(dir, 'splitexport.json'), 'utf8'));
  } catch (err) {
    throw new DeviceRuntimeError(`${dir} has no readable splitexport.json: ${err.message}`);
  }
  return DeviceSegment.load(fileIO(dir), meta);
}

/**
 * `loadData` on a file: `.npz`, `.npy` (labels from `<stem>.labels.npy` beside it) or `.csv` (with `target`),
 * for the bundle whose `manifest.json` is `manifest` (an object, or the path of the file).
 * @param {string} file @param {any} manifest @param {{target?: string, seed?: number}} [options]
 */
export async function loadDataFile(file, manifest, options = {}) {
  const format = path.extname(file).slice(1).toLowerCase();
  if (!['npz', 'npy', 'csv'].includes(format)) {
    throw new DeviceRuntimeError(`${file}: unknown data format; give a .npz, .npy or .csv`);
  }
  const m = typeof manifest === 'string' ? JSON.parse(await readFile(manifest, 'utf8')) : manifest;
  const labels = format === 'npy'
    ? await readFile(path.join(path.dirname(file), `${path.basename(file, path.extname(file))}.labels.npy`))
      .catch(() => { throw new DeviceRuntimeError(`${file}: an .npy holds only x; put the labels in <stem>.labels.npy`); })
    : undefined;
  return loadData(await readFile(file), m, { ...options, format, labels, name: path.basename(file) });
}
