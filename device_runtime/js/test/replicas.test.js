// The JS client against replicated B: a real `splitexport serve --strategy psl --clients 2 --replicas 2` (two
// torch.distributed ranks on loopback, rank r on port P + r). Two devices open their sessions at rank 0: one stays
// there, the other is redirected (307) to rank 1; both then train one PSL iteration, every call of a session at its
// own replica. The replies and both replicas' B are compared with the same iteration in one process
// (tests/device_runtime/js_replicas_fixture.py). Skipped like e2e.test.js.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { decodeSafetensors, RemoteSegment, ServerClient, tf } from '../src/index.js';
import { e2eSkip as skip, freePort, runPython, Server } from '../test-support/python.js';

// Largest |reply - one process| (B's outputs, cut gradients) and |B - one process| after the iteration: float32
// rounding of two partial means vs one (docs/scaling.md); measured values are printed.
const TOL = 1e-6;
const PAGE = 'https://app.example';

test('a device redirected to another replica trains there: one PSL iteration over two replicas', { skip }, async () => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'splitexport-replicas-'));
  const fixture = JSON.parse(runPython(['-m', 'tests.device_runtime.js_replicas_fixture', out]).trim().split('\n').at(-1));
  const port = await freePort(2);
  const state = path.join(out, 'state');
  const urls = [0, 1].map((r) => `http://127.0.0.1:${port + r}`);
  const server = new Server([fixture.bundle, '--strategy', 'psl', '--clients', '2', '--replicas', '2', '--port',
    String(port), '--state-dir', state, '--tokens', fixture.tokens, '--threads', '1', '--collective-timeout', '60',
    '--cors-origin', PAGE],
  urls);
  const seconds = await server.start();
  console.log(`2 replicas up in ${seconds.toFixed(1)} s`);
  try {
    const client = new ServerClient(urls[0], { token: fixture.token });
    const listed = await (await client.request('GET', '/v1/replicas')).json();
    assert.deepEqual(listed.replicas, urls);
    // round-robin from rank 0: the first session opens there, the second is redirected to rank 1
    const remotes = [await RemoteSegment.open(client), await RemoteSegment.open(client)];
    assert.deepEqual(remotes.map((r) => r.url), urls);
    remotes.forEach((r, k) => assert.match(r.sessionId, new RegExp(`^r${k}-`)));
    const raw = decodeSafetensors(readFileSync(fixture.batches));
    const t = (k) => tf.tensor(raw[k].data, raw[k].shape);
    const [d0, d1] = fixture.clients;
    // the iteration's barriers wait for both devices: their calls run at the same time
    const outputs = await Promise.all([remotes[0].forward(t(`x_${d0}`)), remotes[1].forward(t(`x_${d1}`))]);
    const grads = await Promise.all([remotes[0].backward(t(`g_${d0}`)), remotes[1].backward(t(`g_${d1}`))]);
    for (const [k, r] of remotes.entries()) {
      assert.equal(r.step, 1);
      const info = await client.session(r.sessionId); // at the session's replica: rank 0 does not know rank 1's
      assert.equal(info.next_step, 1, `${r.sessionId} at ${urls[k]}`);
    }
    const wire = (x) => ({ shape: x.shape, data: Array.from(x.dataSync()) });
    const run = {
      bundle: fixture.bundle, batches: fixture.batches, state_dir: state,
      outputs: { [d0]: wire(outputs[0]), [d1]: wire(outputs[1]) }, grads: { [d0]: wire(grads[0]), [d1]: wire(grads[1]) },
    };
    const file = path.join(out, 'run.json');
    writeFileSync(file, JSON.stringify(run));
    const cmp = JSON.parse(runPython(['-m', 'tests.device_runtime.js_replicas_fixture', '--compare', file])
      .trim().split('\n').at(-1));
    console.log(`replies vs one process: ${cmp.replies}; B vs one process: ${cmp.b} (${cmp.where}); ` +
      `replicas' B bit-identical: ${cmp.identical}`);
    assert.ok(cmp.identical, "the replicas' B differ");
    assert.ok(cmp.replies != null && cmp.replies <= TOL, `replies off by ${cmp.replies}`);
    assert.ok(cmp.b != null && cmp.b <= TOL, `B off by ${cmp.b} at ${cmp.where}`);
    for (const r of remotes) await client.deleteSession(r.sessionId);
    // the 201 names the replica, wherever the device opened it
    const more = [await client.openSession(), await client.openSession()];
    assert.deepEqual(more.map((i) => [i.replica, i.url, client.sessionUrl(i.session_id)]),
      [[0, urls[0], urls[0]], [1, urls[1], urls[1]]]);
    for (const i of more) await client.deleteSession(i.session_id);
    // a page on another origin (--cors-origin) can read the 307 too: it carries the CORS headers
    const cors = [];
    for (const key of ['cors-key-0-0123456789', 'cors-key-1-0123456789']) {
      const r = await fetch(`${urls[0]}/v1/sessions`, { method: 'POST', redirect: 'manual',
        headers: { Authorization: `Bearer ${fixture.token}`, Origin: PAGE, 'Idempotency-Key': key } });
      cors.push([r.status, r.headers.get('access-control-allow-origin')]);
      if (r.status === 201) await client.deleteSession((await r.json()).session_id);
    }
    assert.deepEqual(cors, [[201, PAGE], [307, PAGE]]);
  } finally {
    await server.stop();
  }
});
