// Unit tests of the protocol pieces that need no Python: safetensors, the client's retry rules and its
// following of a replica's 307 (against small local HTTP servers; e2e.test.js and replicas.test.js use the real one).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';

import { decodeSafetensors, encodeSafetensors, RemoteSegment, ServerClient, ServerError, tf } from '../src/index.js';
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

/** Read a request's body, then answer it with `handler(req, body)`'s `[status, headers, body]`. */
function answering(handler) {
  return (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const [status, headers, body] = handler(req, Buffer.concat(chunks));
      res.writeHead(status, headers);
      res.end(body);
    });
  };
}

const JSON_TYPE = { 'Content-Type': 'application/json' };
const errorReply = (status, code) => [status, JSON_TYPE, JSON.stringify({ error: { code, message: code } })];

test('a session redirected to another replica (307) is opened there and every later call goes there', async () => {
  // two servers standing in for replicas 0 and 1 (the real ones: replicas.test.js); the client is the real one
  const seen = [];
  let replicaUrl;
  let opens = 0;
  const replica = answering((req, body) => {
    seen.push({ at: 'replica', method: req.method, url: req.url, auth: req.headers.authorization,
      key: req.headers['idempotency-key'], body: body.length });
    if (req.method === 'POST' && req.url === '/v1/sessions?replica=1') {
      opens += 1;
      if (opens === 1) return [503, { ...JSON_TYPE, 'Retry-After': '0' }, JSON.stringify({ error: { code: 'busy' } })];
      return [201, JSON_TYPE, JSON.stringify({ session_id: 'r1-abc', next_step: 0, expected: 'forward', replica: 1,
        url: replicaUrl })];
    }
    if (req.url === '/v1/sessions/r1-abc' && req.method === 'GET') {
      return [200, JSON_TYPE, JSON.stringify({ session_id: 'r1-abc', next_step: 0, expected: 'forward' })];
    }
    if (req.url === '/v1/sessions/r1-abc/steps/0/forward') {
      const act = decodeSafetensors(new Uint8Array(body)).activation;
      return [200, { 'Content-Type': 'application/vnd.safetensors' },
        Buffer.from(encodeSafetensors({ output: { shape: act.shape, data: act.data.map((v) => 2 * v) } }))];
    }
    if (req.url === '/v1/sessions/r1-abc/metrics') return [200, JSON_TYPE, '{}'];
    if (req.url === '/v1/sessions/r1-abc' && req.method === 'DELETE') return [204, {}, ''];
    return errorReply(404, 'unknown_session');
  });
  await withServer(replica, async (url1) => {
    replicaUrl = url1;
    const entry = answering((req) => {
      seen.push({ at: 'entry', method: req.method, url: req.url, auth: req.headers.authorization,
        key: req.headers['idempotency-key'] });
      if (req.method === 'POST' && req.url === '/v1/sessions') {
        return [307, { ...JSON_TYPE, Location: `${url1}/v1/sessions?replica=1` }, JSON.stringify({ replica: 1, url: url1 })];
      }
      return errorReply(404, 'unknown_session');
    });
    await withServer(entry, async (url0) => {
      const client = new ServerClient(url0, { token: 'test-token-0123456789', backoffMs: 10 });
      const remote = await RemoteSegment.open(client);
      assert.equal(remote.sessionId, 'r1-abc');
      assert.equal(remote.url, url1);
      assert.equal(client.sessionUrl('r1-abc'), url1);
      assert.equal(client.sessionUrl('r0-other'), url0, 'a session not opened through a redirect lives at baseUrl');
      const x = tf.tensor([[1, -2, 3]]);
      assert.deepEqual(Array.from((await remote.forward(x)).dataSync()), [2, -4, 6]);
      assert.equal((await client.session('r1-abc')).next_step, 0);
      await client.reportMetrics('r1-abc', { loss: 0.5 });
      await client.deleteSession('r1-abc');
      assert.equal(client.sessionUrl('r1-abc'), url0, 'a closed session is forgotten');
    });
  });
  assert.deepEqual(seen.map((s) => `${s.at} ${s.method} ${s.url}`), [
    'entry POST /v1/sessions',
    'replica POST /v1/sessions?replica=1', // 503: retried at the replica, not at the entry
    'replica POST /v1/sessions?replica=1',
    'replica POST /v1/sessions/r1-abc/steps/0/forward',
    'replica GET /v1/sessions/r1-abc',
    'replica POST /v1/sessions/r1-abc/metrics',
    'replica DELETE /v1/sessions/r1-abc',
  ]);
  assert.ok(seen.every((s) => s.auth === 'Bearer test-token-0123456789'), 'the token goes to the other origin too');
  const keys = seen.filter((s) => s.method === 'POST' && s.url.startsWith('/v1/sessions?') || s.url === '/v1/sessions')
    .map((s) => s.key);
  assert.equal(keys.length, 3);
  assert.ok(keys[0].length >= 16 && keys.every((k) => k === keys[0]), `one Idempotency-Key: ${keys}`);
});

test('redirects on opening a session: a loop and too many hops fail with one clear error', async () => {
  let hops = 0;
  let loop = true;
  await withServer(answering((req) => {
    hops += 1;
    const n = Number(new URL(req.url, 'http://x').searchParams.get('replica') ?? 0);
    // loop: /v1/sessions and ?replica=1 send to each other; otherwise every hop names a new replica (up to 20)
    if (n === 20) return [201, JSON_TYPE, JSON.stringify({ session_id: 'r20-x', next_step: 0 })];
    const next = loop && n === 1 ? '/v1/sessions' : `/v1/sessions?replica=${n + 1}`;
    return [307, { ...JSON_TYPE, Location: next }, '{}'];
  }), async (url) => {
    const client = new ServerClient(url, { backoffMs: 10, maxWaitMs: 2000 });
    await assert.rejects(client.openSession(), (e) => e instanceof ServerError && e.code === 'redirect_loop' &&
      e.message.includes(`back to ${url}/v1/sessions`));
    assert.equal(hops, 2);
    loop = false;
    hops = 0;
    await assert.rejects(client.openSession(), (e) => e instanceof ServerError && e.code === 'redirect_loop' &&
      e.message.includes('more than 5 redirects'));
    assert.equal(hops, 6);
  });
  // not a redirect the client follows: another 3xx (a POST would turn into a GET), a 307 without a Location
  for (const [status, headers, why] of [[302, { Location: '/v1/sessions?replica=1' }, 'only a 307 or 308'],
    [307, {}, 'without a Location']]) {
    await withServer(answering(() => [status, headers, '']), async (url) => {
      await assert.rejects(new ServerClient(url, { maxWaitMs: 2000 }).openSession(), (e) => e instanceof ServerError &&
        e.code === 'bad_redirect' && e.message.includes(why));
    });
  }
});

test('in a page (fetch hides a redirect): the browser follows, and the session stays at the replica it ended at', async () => {
  // a page's fetch: `redirect: 'manual'` answers an opaque redirect (no status, no Location); `follow` is fetch's own
  const pageFetch = async (url, init) => {
    const response = await fetch(url, init);
    if (init.redirect !== 'manual' || response.status < 300 || response.status >= 400) return response;
    await response.body?.cancel();
    return { type: 'opaqueredirect', status: 0, redirected: false, url: '', headers: new Headers(), body: null };
  };
  const seen = [];
  // one origin, replicas under path prefixes (a load balancer; SPLITEXPORT_REPLICA_URL=<origin>/r1 on replica 1)
  await withServer(answering((req) => {
    seen.push(`${req.method} ${req.url} ${req.headers.authorization} ${req.headers['idempotency-key']?.length}`);
    if (req.headers.authorization !== 'Bearer test-token-0123456789') return errorReply(401, 'missing_token');
    if (req.url === '/r0/v1/sessions') return [307, { ...JSON_TYPE, Location: '/r1/v1/sessions?replica=1' }, '{}'];
    if (req.url === '/r1/v1/sessions?replica=1') {
      return [201, JSON_TYPE, JSON.stringify({ session_id: 'r1-p', next_step: 0, expected: 'forward' })];
    }
    if (req.url === '/r1/v1/sessions/r1-p') return [200, JSON_TYPE, JSON.stringify({ session_id: 'r1-p', next_step: 0 })];
    return errorReply(404, 'unknown_session');
  }), async (url) => {
    const client = new ServerClient(`${url}/r0`, { token: 'test-token-0123456789', fetch: pageFetch });
    const remote = await RemoteSegment.open(client);
    assert.equal(remote.url, `${url}/r1`);
    assert.equal((await client.session('r1-p')).session_id, 'r1-p');
  });
  assert.deepEqual(seen, [
    'POST /r0/v1/sessions Bearer test-token-0123456789 32', // the opaque redirect
    'POST /r0/v1/sessions Bearer test-token-0123456789 32', // sent again, this time followed by fetch
    'POST /r1/v1/sessions?replica=1 Bearer test-token-0123456789 32',
    'GET /r1/v1/sessions/r1-p Bearer test-token-0123456789 undefined',
  ]);
  // another origin: the browser drops the token, and the error says why
  await withServer(answering((req) => (req.headers.authorization ? [201, JSON_TYPE, '{}'] : errorReply(401, 'missing_token'))),
    async (other) => {
      await withServer(answering(() => [307, { ...JSON_TYPE, Location: `${other}/v1/sessions?replica=1` }, '{}']),
        async (url) => {
          const client = new ServerClient(url, { token: 'test-token-0123456789', fetch: pageFetch });
          await assert.rejects(client.openSession(), (e) => e instanceof ServerError && e.code === 'missing_token' &&
            e.message.includes('serve every replica under one origin'));
        });
    });
});
