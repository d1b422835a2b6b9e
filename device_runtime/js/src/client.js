/**
 * HTTP client of the splitexport server (docs/protocol.md), fetch-based: browsers, React Native, Node >= 18.
 *
 * Exactly-once: a call is retried with the same body, with exponential backoff, on network errors,
 * 5xx and 503 (honouring Retry-After); the server answers a repeated call from its stored response.
 * After a server restart between a forward and its backward (a 409, `forward_lost` or `wrong_step`, expecting
 * the forward of the same step) the forward is sent again, then the backward. A refused call (other 4xx)
 * raises {@link ServerError}. In a browser, a call that never reached a cross-origin server (the browser
 * hides why: most often a missing `--cors-origin`) fails at once instead of retrying, as does a bad URL.
 *
 * Replicated B (`--replicas`, docs/scaling.md): opening a session may answer `307` to another replica. The client
 * follows it itself (same token, `Idempotency-Key` and body; at most {@link MAX_REDIRECTS}; a loop is an error),
 * remembers that replica's URL for the session and sends every call of the session there.
 */
import * as tf from '@tensorflow/tfjs';
import { ERROR_STATUS, ErrorCode, IDEMPOTENCY_KEY, MEDIA_TYPE, Tensor } from './protocol.js';
import { decodeSafetensors, encodeSafetensors } from './safetensors.js';

export { ErrorCode, MEDIA_TYPE, Tensor };

/** The server refused a call (4xx), or stayed unreachable through every retry (status 503, code `unreachable`). */
export class ServerError extends Error {
  /**
   * @param {number} status
   * @param {{error?: {code?: string, message?: string, [k: string]: unknown}}} body
   */
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(`${status} ${err.code ?? ''}: ${err.message ?? JSON.stringify(body)}`);
    this.name = 'ServerError';
    this.status = status;
    this.code = err.code ?? '';
    /** @type {Record<string, unknown>} */
    this.details = err;
  }
}

/**
 * @typedef {object} ClientOptions
 * @property {string | null} [token] bearer token
 * @property {number} [maxWaitMs] give up retrying a call after this long (default 120 s)
 * @property {number} [backoffMs] first retry delay, doubled up to 2 s (default 100 ms)
 * @property {typeof fetch} [fetch] fetch implementation (default: the global one)
 */

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Most redirects followed when opening a session (a replicated server sends at most one). */
const MAX_REDIRECTS = 5;

const SESSIONS = '/v1/sessions';

/** A redirect the client does not follow (client-side codes, not the server's). @param {string} code @param {string} message */
const badRedirect = (code, message) => new ServerError(307, { error: { code, message } });

/** The base URL of the server a sessions URL (`<base>/v1/sessions?replica=k`, where a 307 sends) belongs to. */
function sessionsBase(url) {
  const u = new URL(url);
  if (!u.pathname.endsWith(SESSIONS)) throw badRedirect('bad_redirect', `redirected to ${url}, not a ${SESSIONS} URL`);
  return `${u.origin}${u.pathname.slice(0, -SESSIONS.length)}`;
}

async function errorBody(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return body && typeof body === 'object' ? body : { error: { message: String(body) } };
  } catch {
    return { error: { message: text.slice(0, 200) } };
  }
}

/** A session-less client with retries. */
export class ServerClient {
  /** @param {string} baseUrl @param {ClientOptions} [options] */
  constructor(baseUrl, options = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.token = options.token ?? null;
    this.maxWaitMs = options.maxWaitMs ?? 120_000;
    this.backoffMs = options.backoffMs ?? 100;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    /** Number of retried calls (network errors, 5xx, 503). */
    this.retries = 0;
    /** Whether any call got an HTTP response (then a network error is transient and retried). */
    this.reached = false;
    /** @type {Map<string, string>} the replica's base URL of each session opened through a redirect */
    this._sessionUrls = new Map();
  }

  /** The base URL that serves session `id`: its replica's if a redirect opened it there, else `baseUrl`. @param {string} id */
  sessionUrl(id) {
    return this._sessionUrls.get(id) ?? this.baseUrl;
  }

  /** Send session `id`'s calls to `url` (resuming a session another replica serves). @param {string} id @param {string} url */
  setSessionUrl(id, url) {
    this._sessionUrls.set(id, url.replace(/\/+$/, ''));
  }

  /**
   * The one-line reason retrying cannot fix a failed fetch, or null: an invalid URL, or a first call from
   * a page to a server on another origin (CORS refusals and an unreachable host look the same to a page).
   * @param {unknown} exc @param {string} base @returns {string | null}
   */
  _hopeless(exc, base) {
    let target;
    try {
      target = new URL(base);
    } catch {
      return `invalid server URL ${JSON.stringify(base)}`;
    }
    const origin = globalThis.location?.origin;
    if (this.reached || !(exc instanceof TypeError) || origin == null || origin === 'null' || origin === target.origin) {
      return null;
    }
    return `${base} cannot be reached from ${origin} (${exc.message}): the server does not allow this ` +
      `origin (start it with --cors-origin ${origin}) or is down`;
  }

  /**
   * Send one call, retrying transport failures, 503 and 5xx until `maxWaitMs` has passed.
   * @param {string} method
   * @param {string} path a path under `baseUrl`, or an absolute URL (another replica's)
   * @param {Uint8Array | null} [body] safetensors bytes (or `contentType`)
   * @param {string} [contentType]
   * @param {Record<string, string>} [extraHeaders]
   * @param {RequestRedirect} [redirect] fetch's redirect mode (default `follow`)
   * @returns {Promise<Response>}
   */
  async request(method, path, body = null, contentType = MEDIA_TYPE, extraHeaders = {}, redirect = 'follow') {
    const absolute = /^https?:\/\//i.test(path);
    const url = absolute ? path : this.baseUrl + path;
    const deadline = Date.now() + this.maxWaitMs;
    let delay = this.backoffMs;
    /** @type {Record<string, string>} */
    const headers = { ...extraHeaders };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (body != null) headers['Content-Type'] = contentType;
    for (;;) {
      let failure;
      let wait = delay;
      try {
        const response = await this.fetch(url, { method, headers, body: body ?? undefined, redirect });
        this.reached = true;
        if (response.status < 400) return response;
        const err = new ServerError(response.status, await errorBody(response));
        if (response.status < 500) throw err;
        failure = err;
        const retryAfter = Number(response.headers.get('retry-after'));
        if (response.status === 503 && retryAfter > 0) wait = Math.max(wait, retryAfter * 1000);
      } catch (exc) {
        if (exc instanceof ServerError && exc.status < 500) throw exc;
        const hopeless = this._hopeless(exc, absolute ? path : this.baseUrl);
        if (hopeless != null) throw new ServerError(503, { error: { code: ErrorCode.UNREACHABLE, message: hopeless } });
        failure = exc;
      }
      if (Date.now() + wait > deadline) {
        throw new ServerError(503, { error: { code: ErrorCode.UNREACHABLE, message: String(failure?.message ?? failure) } });
      }
      this.retries += 1;
      await sleep(wait);
      delay = Math.min(delay * 2, 2000);
    }
  }

  /**
   * Open a session; where a replicated server redirects (307) to another replica, open it there.
   * @returns {Promise<{session_id: string, next_step: number, expected: string, split?: string, segment?: string}>}
   */
  async openSession() {
    // one key for every retry of this call, at every replica: a lost reply opens no second session
    const key = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
    const headers = { [IDEMPOTENCY_KEY]: key };
    let url = this.baseUrl + SESSIONS;
    const visited = new Set([url]);
    for (let redirects = 0; ; redirects += 1) {
      const response = await this.request('POST', url, null, MEDIA_TYPE, headers, 'manual');
      if (response.type === 'opaqueredirect') return this._openFollowing(url, headers);
      if (response.status < 300 || response.status >= 400) return this._opened(response, url);
      const location = response.headers.get('location');
      await response.body?.cancel();
      if (response.status !== 307 && response.status !== 308) {
        throw badRedirect('bad_redirect', `${url} answered ${response.status}: only a 307 or 308 redirects a session's opening`);
      }
      if (!location) throw badRedirect('bad_redirect', `${url} answered ${response.status} without a Location`);
      const next = new URL(location, url).href;
      const loop = (why) => badRedirect('redirect_loop', `opening a session at ${this.baseUrl}: ${why}`);
      if (visited.has(next)) throw loop(`${url} redirected back to ${next}`);
      if (redirects === MAX_REDIRECTS) throw loop(`more than ${MAX_REDIRECTS} redirects (the next to ${next})`);
      visited.add(next);
      url = next;
    }
  }

  /**
   * A page's fetch hides a redirect's Location: let it follow (the same key gets the same replica). It drops the
   * token on a redirect to another origin, so the replicas must share the page's origin (one load balancer).
   * @param {string} url @param {Record<string, string>} headers
   */
  async _openFollowing(url, headers) {
    try {
      return await this._opened(await this.request('POST', url, null, MEDIA_TYPE, headers), url);
    } catch (exc) {
      if (!(exc instanceof ServerError) || exc.status !== 401) throw exc;
      exc.message += ` (${url} redirected this page to another replica; a browser drops the token on a redirect to ` +
        'another origin: serve every replica under one origin, docs/scaling.md)';
      throw exc;
    }
  }

  /** The session a successful open answered; remembers the replica it lives at. @param {Response} response @param {string} url */
  async _opened(response, url) {
    const info = await response.json();
    // the URL it was opened at: where the response came from (after a fetch that followed a redirect itself, as in a
    // page or React Native, the URL it ended at)
    const base = sessionsBase(response.url || url);
    if (base !== this.baseUrl) this._sessionUrls.set(info.session_id, base);
    return info;
  }

  /** @param {string} id @returns {Promise<{session_id: string, next_step: number, expected: string}>} */
  async session(id) {
    return (await this.request('GET', this._sessionPath(id))).json();
  }

  /** @param {string} id */
  async deleteSession(id) {
    await this.request('DELETE', this._sessionPath(id));
    this._sessionUrls.delete(id);
  }

  /** Session `id`'s URL at its replica (`suffix` appended). @param {string} id @param {string} [suffix] */
  _sessionPath(id, suffix = '') {
    return `${this.sessionUrl(id)}${SESSIONS}/${encodeURIComponent(id)}${suffix}`;
  }

  /**
   * Report device-side numbers (e.g. `{epoch: 1, loss: 0.4, accuracy: 0.9}`) for the operator's dashboard and
   * the strategy (`POST /v1/sessions/{id}/metrics`). @param {string} id @param {Record<string, number>} metrics
   */
  async reportMetrics(id, metrics) {
    const body = new TextEncoder().encode(JSON.stringify(metrics));
    await this.request('POST', this._sessionPath(id, '/metrics'), body, 'application/json');
  }

  /** @returns {Promise<{manifest: any, device_files: Record<string, string>}>} the bundle manifest with `device_files` */
  async manifest() {
    return (await this.request('GET', '/v1/manifest')).json();
  }
}

/** A tensor's values without blocking the thread (`data()`, not `dataSync()`). @param {tf.Tensor} t */
async function wire(t) {
  const data = /** @type {Float32Array | Int32Array} */ (await t.data());
  return { shape: t.shape, data };
}

/** @param {{shape: number[], data: Float32Array | Int32Array}} t @returns {tf.Tensor} */
function toTensor(t) {
  return tf.tensor(t.data, t.shape, t.data instanceof Int32Array ? 'int32' : 'float32');
}

/** The server's segment B of one session, driven step by step (at the session's replica, with replicated B). */
export class RemoteSegment {
  /**
   * Use {@link RemoteSegment.open}.
   * @param {ServerClient} client
   * @param {{session_id: string, next_step: number}} info
   * @param {{fp16?: boolean}} [options] send activations and gradients as float16
   */
  constructor(client, info, options = {}) {
    this.client = client;
    this.sessionId = info.session_id;
    /** The base URL that serves this session (keep it with `sessionId` to resume the session elsewhere). */
    this.url = client.sessionUrl(this.sessionId);
    this.step = Number(info.next_step);
    this.fp16 = Boolean(options.fp16);
    /** @type {Uint8Array | null} */
    this._forwardBody = null;
  }

  /**
   * Open a new session, or resume `sessionId` (served at `url`, the `url` it had: another replica's) at the
   * server's next step.
   * @param {ServerClient} client
   * @param {{sessionId?: string, url?: string, fp16?: boolean}} [options]
   */
  static async open(client, options = {}) {
    if (options.sessionId && options.url) client.setSessionUrl(options.sessionId, options.url);
    const info = options.sessionId ? await client.session(options.sessionId) : await client.openSession();
    return new RemoteSegment(client, info, options);
  }

  /** @param {string} call */
  _path(call) {
    return `/v1/sessions/${encodeURIComponent(this.sessionId)}/steps/${this.step}/${call}`;
  }

  /** @param {string} path @param {Uint8Array} body @param {string} name */
  async _call(path, body, name) {
    const response = await this.client.request('POST', this.url + path, body);
    const tensors = decodeSafetensors(new Uint8Array(await response.arrayBuffer()));
    return name ? toTensor(tensors[name]) : tensors;
  }

  /**
   * Double split, step part 1: B's output for A's activation. B is held for this device until the backward.
   * @param {tf.Tensor} activation @returns {Promise<tf.Tensor>}
   */
  async forward(activation) {
    this._forwardBody = encodeSafetensors({ [Tensor.ACTIVATION]: await wire(activation) }, { fp16: this.fp16 });
    return /** @type {Promise<tf.Tensor>} */ (this._call(this._path('forward'), this._forwardBody, Tensor.OUTPUT));
  }

  /**
   * Double split, step part 2: B trains on dL/d(B output) and returns dL/d(B input); the step advances.
   * @param {tf.Tensor} grad @returns {Promise<tf.Tensor>}
   */
  async backward(grad) {
    const body = encodeSafetensors({ [Tensor.GRAD]: await wire(grad) }, { fp16: this.fp16 });
    let out;
    try {
      out = await this._call(this._path('backward'), body, Tensor.GRAD);
    } catch (exc) {
      // a 409 (forward_lost, or wrong_step from a restarted server) that expects this very step's forward again
      const lost = exc instanceof ServerError && exc.status === ERROR_STATUS[ErrorCode.FORWARD_LOST] &&
        this._forwardBody != null && [ErrorCode.FORWARD_LOST, ErrorCode.WRONG_STEP].includes(exc.code) &&
        exc.details.expected === 'forward' && exc.details.next_step === this.step;
      if (!lost) throw exc;
      // the server restarted between our forward and backward: the same forward again, then the backward
      (await this._call(this._path('forward'), this._forwardBody, Tensor.OUTPUT)).dispose();
      out = await this._call(this._path('backward'), body, Tensor.GRAD);
    }
    this.step += 1;
    this._forwardBody = null;
    return /** @type {tf.Tensor} */ (out);
  }

  /**
   * Single split: B (the last segment) trains on the labels; the step advances.
   * @param {tf.Tensor} activation @param {tf.Tensor} labels int class ids (cross-entropy) or float targets (MSE)
   * @returns {Promise<{loss: number, grad: tf.Tensor, output: tf.Tensor}>}
   */
  async train(activation, labels) {
    const y = labels.dtype === 'int32' ? { ...(await wire(labels)), dtype: /** @type {const} */ ('I64') } : await wire(labels);
    const body = encodeSafetensors({ [Tensor.ACTIVATION]: await wire(activation), [Tensor.LABELS]: y }, { fp16: this.fp16 });
    const out = /** @type {Record<string, any>} */ (await this._call(this._path('train'), body, ''));
    this.step += 1;
    return { loss: out[Tensor.LOSS].data[0], grad: toTensor(out[Tensor.GRAD]), output: toTensor(out[Tensor.OUTPUT]) };
  }

  /** B in inference mode; changes nothing. @param {tf.Tensor} activation @returns {Promise<tf.Tensor>} */
  async evaluate(activation) {
    const body = encodeSafetensors({ [Tensor.ACTIVATION]: await wire(activation) }, { fp16: this.fp16 });
    return /** @type {Promise<tf.Tensor>} */ (
      this._call(`/v1/sessions/${encodeURIComponent(this.sessionId)}/evaluate`, body, Tensor.OUTPUT)
    );
  }
}
