// Type declarations of @splitexport/device-runtime (hand-written; the sources are JSDoc-annotated JS).
import * as tf from '@tensorflow/tfjs';

export { tf };

export class DeviceRuntimeError extends Error {}

export interface SegmentMeta {
  is_last?: boolean;
  isLast?: boolean;
  loss?: 'cross_entropy' | 'mse';
  optimizer?: { name?: 'sgd' | 'adam' | 'adamw'; lr?: number; momentum?: number; weight_decay?: number;
    weightDecay?: number; betas?: [number, number]; eps?: number };
  input_shape?: number[];
  output_shape?: number[];
  torch_names?: Record<string, unknown>;
  [key: string]: unknown;
}

export function labelLoss(out: tf.Tensor, labels: tf.Tensor, kind?: 'cross_entropy' | 'mse'): tf.Scalar;

export class DeviceSegment {
  constructor(model: tf.LayersModel, meta: SegmentMeta);
  static load(source: string | tf.io.IOHandler, meta: SegmentMeta): Promise<DeviceSegment>;
  readonly model: tf.LayersModel;
  readonly isLast: boolean;
  /** Dry step on the active backend; rejects with DeviceRuntimeError naming a missing kernel. */
  checkBackend(): Promise<string[]>;
  forward(x: tf.Tensor): tf.Tensor;
  evaluate(x: tf.Tensor): tf.Tensor;
  trainWithGradient(x: tf.Tensor, gradOut: tf.Tensor): number;
  trainWithLabels(x: tf.Tensor, labels: tf.Tensor): { loss: number; gradInput: tf.Tensor; output: tf.Tensor };
  getWeights(): Record<string, tf.Tensor>;
  setWeights(values: Record<string, tf.Tensor>): void;
  getOptimizerState(): Record<string, tf.Tensor>;
  setOptimizerState(values: Record<string, tf.Tensor>): void;
  dispose(): void;
}

export interface LoadOptions {
  /** Expected sha256 (hex) per file name relative to the segment directory; every file must be listed. */
  sha256?: Record<string, string>;
  fetch?: typeof fetch;
  /** Check the active backend's kernels at load time (default true). */
  checkBackend?: boolean;
}

export function sha256Hex(bytes: ArrayBuffer | Uint8Array): Promise<string>;
export function loadSegment(url: string, options?: LoadOptions): Promise<DeviceSegment>;
export function loadDeployedSegment(assetsUrl: string, name: string, options?: LoadOptions): Promise<DeviceSegment>;
export function loadSegmentFromServer(client: ServerClient, name: string,
  options?: { checkBackend?: boolean }): Promise<DeviceSegment>;

export interface ClientOptions {
  token?: string | null;
  maxWaitMs?: number;
  backoffMs?: number;
  fetch?: typeof fetch;
}

export interface SessionInfo { session_id: string; next_step: number; expected: string; [key: string]: unknown }

export class ServerError extends Error {
  constructor(status: number, body: unknown);
  readonly status: number;
  readonly code: string;
  readonly details: Record<string, unknown>;
}

export class ServerClient {
  constructor(baseUrl: string, options?: ClientOptions);
  readonly baseUrl: string;
  retries: number;
  reached: boolean;
  /** `path`: under `baseUrl`, or an absolute URL (another replica's). */
  request(method: string, path: string, body?: Uint8Array | null, contentType?: string,
          extraHeaders?: Record<string, string>, redirect?: RequestRedirect): Promise<Response>;
  /** Follows a replica's 307 (docs/scaling.md) and remembers where the session lives. */
  openSession(): Promise<SessionInfo>;
  /** The base URL that serves session `id` (its replica's, when opening it was redirected). */
  sessionUrl(id: string): string;
  setSessionUrl(id: string, url: string): void;
  session(id: string): Promise<SessionInfo>;
  deleteSession(id: string): Promise<void>;
  reportMetrics(id: string, metrics: Record<string, number>): Promise<void>;
  manifest(): Promise<{ manifest: any; device_files: Record<string, string> }>;
}

export class RemoteSegment {
  static open(client: ServerClient, options?: { sessionId?: string; url?: string; fp16?: boolean }): Promise<RemoteSegment>;
  readonly client: ServerClient;
  readonly sessionId: string;
  /** The base URL that serves this session (keep it with `sessionId` to resume). */
  readonly url: string;
  step: number;
  forward(activation: tf.Tensor): Promise<tf.Tensor>;
  backward(grad: tf.Tensor): Promise<tf.Tensor>;
  train(activation: tf.Tensor, labels: tf.Tensor): Promise<{ loss: number; grad: tf.Tensor; output: tf.Tensor }>;
  evaluate(activation: tf.Tensor): Promise<tf.Tensor>;
}

export interface Dataset { xTrain: tf.Tensor; yTrain: tf.Tensor; xTest: tf.Tensor; yTest: tf.Tensor }
export interface StepInfo { epoch: number; step: number; loss: number }
export interface EpochInfo { epoch: number; trainLoss: number; trainAccuracy: number; testLoss: number; testAccuracy: number }
export interface TrainOptions {
  a: DeviceSegment;
  c?: DeviceSegment | null;
  remote: RemoteSegment;
  data: Dataset;
  epochs?: number;
  batchSize?: number;
  seed?: number;
  evalBatchSize?: number;
  loss?: 'cross_entropy' | 'mse';
  onStep?: (info: StepInfo) => void;
  onEpoch?: (info: EpochInfo) => void;
}

export function batchIndices(n: number, batchSize: number, seed: number, epoch: number): Int32Array[];
export function trainStep(o: TrainOptions, x: tf.Tensor, y: tf.Tensor): Promise<{ loss: number; output: tf.Tensor }>;
export function predict(o: TrainOptions, x: tf.Tensor): Promise<tf.Tensor>;
export function trainSplit(o: TrainOptions): Promise<EpochInfo[]>;

export type NumericArray = Float32Array | Float64Array | Int8Array | Uint8Array | Int16Array | Uint16Array | Int32Array |
  Uint32Array | BigInt64Array | BigUint64Array;
/** A C-order array read from a .npy; dtype as numpy names it without the byte order ('f4', 'i8', 'bool', ...). */
export interface NdArray { dtype: string; shape: number[]; data: NumericArray }
/** manifest.json's `preprocess` (docs/bundle.md). */
export interface PreprocessSpec {
  kind: 'image' | 'table' | 'array' | 'tokens'; scale?: number; mean?: number[]; std?: number[];
  image_size?: number[] | null; channel_order?: 'L' | 'RGB' | null; feature_names?: string[]; label_names?: string[];
  num_classes?: number;
}
export interface Table { x: Float32Array; y: Int32Array | Float32Array; n: number; labelNames: string[]; featureNames: string[] }
export interface DataOptions { format: 'npz' | 'npy' | 'csv'; target?: string; labels?: Uint8Array; seed?: number; name?: string }
export interface LoadedData extends Dataset { labelNames: string[] }
export function parseNpy(bytes: ArrayBuffer | Uint8Array, name?: string): NdArray;
export function parseNpz(bytes: ArrayBuffer | Uint8Array, name?: string): Promise<Record<string, NdArray>>;
export function parseCsv(text: string, target: string | undefined,
  options?: { task?: 'classification' | 'regression'; name?: string }): Table;
export function preprocess(values: ArrayLike<number> | ArrayLike<bigint>, shape: number[], spec: PreprocessSpec): Float32Array | Int32Array;
export function splitIndices(y: ArrayLike<number>, classify: boolean, seed?: number): [Int32Array, Int32Array];
export function loadData(bytes: ArrayBuffer | Uint8Array, manifest: object, options: DataOptions): Promise<LoadedData>;

export const MEDIA_TYPE: string;
export const Tensor: Readonly<Record<string, string>>;
export const ErrorCode: Readonly<Record<string, string>>;
export const ERROR_STATUS: Readonly<Record<string, number>>;

export type SafetensorsDtype = 'F32' | 'F16' | 'I32' | 'I64' | 'U8' | string;
export class SafetensorsError extends Error {}
export function decodeSafetensors(bytes: Uint8Array): Record<string, { dtype: SafetensorsDtype; shape: number[];
  data: Float32Array | Int32Array | Uint8Array }>;
export function encodeSafetensors(tensors: Record<string, { shape: number[]; data: Float32Array | Int32Array;
  dtype?: SafetensorsDtype }>, options?: { fp16?: boolean }): Uint8Array;

/** Custom TF.js layers the exporter writes (registered on import of the runtime; see src/layers.js). */
export class TorchActivation extends tf.layers.Layer {}
export class GroupNorm extends tf.layers.Layer {}
export class TorchReduce extends tf.layers.Layer {}
export class TorchConv2D extends tf.layers.Layer {}
export class SeededDropout extends tf.layers.Layer {
  /** Advances the mask seed after a training step (DeviceSegment calls it). */
  afterTrainStep(): void;
}
