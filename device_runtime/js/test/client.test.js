// Unit tests of the protocol pieces that need no Python: safetensors and the client's retry rules
// (the latter against a small local HTTP server that answers 503 first; e2e.test.js uses the real one).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';

import { decodeSafetensors, encodeSafetensors, ServerClient, ServerError } from '../src/index.js';
import { fromHalf, toHalf } from '../src/safetensors.js';

test('safetensors round trip: F32, F16 transport and I64 labels', () => {
  const x = { shape: [2, 3], data: Float32Array.from([0.1, -2.5, 3e-5, 65504, 1e-8, -0]) };
  const y = { shape: [2], data: Int32Array.from([7, -1]) };
  const back = decodeSafetensors(encodeSafetensors({ x, y }));
  assert.deepEqual(back.x, { dtype: 'F32', shape: [2, 3], data: x.data });
  assert.deepEqual(back.y, { dtype: 'I64', shape: [2], data: y.data });
  const half = decodeSafetensors(encodeSafetensors({ x }, { fp16: true })).x;
  assert.equal(half.dtype, 'F16');
  Array.from(x.data).forEach((v, i) => assert.ok(Math.abs(half.data[i] - v) <= Math.abs(v) * 2 ** -11 + 2 ** -25));
  const bytes = encodeSafetensors({ x });
  const headLen = new DataView(bytes.buffer).getUint32(0, true);
  assert.equal((8 + headLen) % 8, 0, 'data is 8-byte aligned');
  assert.throws(() => decodeSafetensors(bytes.subarray(0, bytes.length - 4)), /does not match/);
});

test('float16 conversion rounds like numpy (nearest even, subnormals, overflow)', () => {
  const cases = [[1, 0x3c00], [0.1, 0x2e66], [65504, 0x7bff], [65520, 0x7c00], [2 ** -24, 0x0001], [2 ** -26, 0],
    [-2, 0xc000], [1 + 2 ** -11, 0x3c00], [1 + 3 * 2 ** -11, 0x3c02], [Infinity, 0x7c00]];
  for (const [v, bits] of cases) assert.equal(toHalf(v), bits, `toHalf(${v})`);
  for (const [v, bits] of cases.slice(0, 3)) assert.ok(Math.abs(fromHalf(bits) - v) <= v * 2 ** -11);
  assert.ok(Number.isNaN(fromHalf(toHalf(NaN))));
});

async function withServer(handler, fn) {
  const server = http.createServer(handler);
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  try {
    return await fn(`http://127.0.0.1:${server.address().port}`);
  } finally {
    await new Promise((r) => server.close(r));
  }
}

test('client retries 503 (Retry-After) and 5xx with the same body, sends the token, does not retry 4xx', async () => {
  const seen = [];
  await withServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      seen.push({ auth: req.headers.authorization, type: req.headers['content-type'], body: Buffer.concat(chunks) });
      if (req.url === '/refused') {
        res.writeHead(409, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ error: { code: 'wrong_step', message: 'no', next_step: 3 } }));
      } else if (seen.length === 1) {
        res.writeHead(503, { 'Retry-After': '1', 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ error: { code: 'busy', message: 'busy' } }));
      } else if (seen.length === 2) {
        res.writeHead(500);
        res.end('oops');
      } else {
        res.writeHead(200);
        res.end('ok');
      }
    });
  }, async (url) => {
    const client = new ServerClient(url, { token: 't0k', backoffMs: 10 });
    const body = encodeSafetensors({ x: { shape: [1], data: Float32Array.from([1]) } });
    assert.equal(await (await client.request('POST', '/call', body)).text(), 'ok');
    assert.equal(client.retries, 2);
    assert.equal(seen.length, 3);
    for (const s of seen) {
      assert.equal(s.auth, 'Bearer t0k');
      assert.equal(s.type, 'application/vnd.safetensors');
      assert.deepEqual(new Uint8Array(s.body), body);
    }
    await assert.rejects(client.request('POST', '/refused', body), (e) => {
      assert.ok(e instanceof ServerError);
      assert.equal(e.code, 'wrong_step');
      assert.equal(e.details.next_step, 3);
      return true;
    });
    assert.equal(seen.length, 4, 'a 4xx is not retried');
    const impatient = new ServerClient('http://127.0.0.1:9', { maxWaitMs: 200, backoffMs: 50 });
    await assert.rejects(impatient.openSession(), (e) => e instanceof ServerError && e.code === 'unreachable');
  });
});

test('openSession: every retry carries one Idempotency-Key, the next open another; 429 is final', async () => {
  const keys = [];
  let calls = 0;
  await withServer((req, res) => {
    calls += 1;
    keys.push(req.headers['idempotency-key']);
    if (calls === 1) {
      res.writeHead(503, { 'Retry-After': '0', 'Content-Type': 'application/json' });
      res.end(JSON.stringify({ error: { code: 'busy', message: 'busy' } }));
    } else if (calls <= 3) {
      res.writeHead(201, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify({ session_id: `s${calls}`, next_step: 0, expected: 'forward' }));
    } else {
      res.writeHead(429, { 'Retry-After': '1', 'Content-Type': 'application/json' });
      res.end(JSON.stringify({ error: { code: 'too_many_sessions', message: 'cap', limit: 2 } }));
    }
  }, async (url) => {
    const client = new ServerClient(url, { token: 'test-token-0123456789', backoffMs: 10 });
    assert.equal((await client.openSession()).session_id, 's2');
    assert.equal((await client.openSession()).session_id, 's3');
    await assert.rejects(client.openSession(), (e) => e instanceof ServerError && e.status === 429);
  });
  assert.equal(calls, 4, 'the 429 was not retried');
  assert.ok(keys.every((k) => typeof k === 'string' && k.length >= 16), String(keys));
  assert.equal(keys[0], keys[1], 'the retry carries the same key');
  assert.notEqual(keys[1], keys[2], 'a new open has a new key');
});
