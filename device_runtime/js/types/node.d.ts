import type * as tf from '@tensorflow/tfjs';
import type { DeviceSegment } from './index.js';

export function fileIO(dir: string): tf.io.IOHandler;
export function loadSegmentFromDir(dir: string): Promise<DeviceSegment>;
