import type * as tf from '@tensorflow/tfjs';
import type { DeviceSegment, LoadedData } from './index.js';

export function fileIO(dir: string): tf.io.IOHandler;
export function loadSegmentFromDir(dir: string): Promise<DeviceSegment>;
export function loadDataFile(file: string, manifest: object | string, options?: { target?: string; seed?: number }): Promise<LoadedData>;
