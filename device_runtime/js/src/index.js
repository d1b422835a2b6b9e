/**
 * splitexport device runtime for TensorFlow.js: trains the device segments (A and C) of a split model
 * exported with `splitexport export BUNDLE --format tfjs`, against `splitexport serve`.
 *
 * Works wherever @tensorflow/tfjs runs (browser, Web Worker, React Native, Node). This module only
 * re-exports: the segment (`./segment.js`), loaders from URLs and from the server (`./loader.js`), the
 * server client (`./client.js`), safetensors (`./safetensors.js`), the training loop (`./train.js`), the data
 * loader (`./data.js`) and the protocol constants (`./protocol.js`). Loading from disk (Node only) is in `./node.js`.
 */
export * as tf from '@tensorflow/tfjs';
export { DeviceRuntimeError, DeviceSegment, labelLoss } from './segment.js';
export { loadDeployedSegment, loadSegment, loadSegmentFromServer, sha256Hex } from './loader.js';
export { RemoteSegment, ServerClient, ServerError } from './client.js';
export { ERROR_STATUS, ErrorCode, MEDIA_TYPE, Tensor } from './protocol.js';
export { decodeSafetensors, encodeSafetensors, SafetensorsError } from './safetensors.js';
export { batchIndices, predict, trainSplit, trainStep } from './train.js';
export { loadData, parseCsv, parseNpy, parseNpz, preprocess, splitIndices } from './data.js';
export { GroupNorm, SeededDropout, TorchActivation, TorchConv2D, TorchReduce } from './layers.js';
