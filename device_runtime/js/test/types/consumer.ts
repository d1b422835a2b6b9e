// Compiled by test/package.test.js with `tsc --noEmit`: what an app written in TypeScript does.
import { loadData, loadSegmentFromServer, RemoteSegment, ServerClient, ServerError, tf, trainSplit } from '@splitexport/device-runtime';
import { loadDataFile, loadSegmentFromDir } from '@splitexport/device-runtime/node';

export async function run(data: { xTrain: tf.Tensor; yTrain: tf.Tensor; xTest: tf.Tensor; yTest: tf.Tensor }): Promise<number> {
  const client = new ServerClient('http://127.0.0.1:8000', { token: 'x'.repeat(20) });
  const a = await loadSegmentFromServer(client, 'A');
  const c = await loadSegmentFromDir('/tmp/C');
  const kernels: string[] = await a.checkBackend();
  const remote = await RemoteSegment.open(client, { fp16: true });
  try {
    const history = await trainSplit({ a, c, remote, data, epochs: 1, onEpoch: (e) => console.log(e.testAccuracy) });
    await client.reportMetrics(remote.sessionId, { epoch: 1, accuracy: history[0].testAccuracy });
    const resumed = await RemoteSegment.open(client, { sessionId: remote.sessionId, url: remote.url });
    const at: string = client.sessionUrl(resumed.sessionId);
    if (at !== resumed.url) return -1;
    return kernels.length;
  } catch (err) {
    if (err instanceof ServerError) return err.status;
    throw err;
  }
}

export async function ownData(client: ServerClient, bytes: Uint8Array): Promise<string[]> {
  const { manifest } = await client.manifest();
  const fromBytes = await loadData(bytes, manifest, { format: 'csv', target: 'price' });
  const fromFile = await loadDataFile('/tmp/tokens.npz', '/tmp/app/manifest.json');
  fromFile.xTrain.dispose();
  return fromBytes.labelNames;
}
