/**
 * Node.js helpers: load exported TF.js segments from a directory on disk.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';

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
