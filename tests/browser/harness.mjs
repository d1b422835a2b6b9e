// Shared by the browser test and benchmarks/bench_browser.mjs: the MLP fixture, `splitexport serve`
// processes, headless Debian chromium (puppeteer-core), the Node reference run and the /app/ page run.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { decodeSafetensors, loadSegmentFromServer, RemoteSegment, ServerClient, tf, trainSplit }
  from '../../device_runtime/js/src/index.js';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const jsRoot = path.join(repoRoot, 'device_runtime', 'js');
export const python = process.env.SPLITEXPORT_PYTHON ?? path.join(repoRoot, '.venv', 'bin', 'python');
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const require = createRequire(path.join(jsRoot, 'package.json'));

/** Why the browser tests cannot run here (null: they can). */
export function missing() {
  if (!existsSync(python)) return `no Python environment at ${python} (set SPLITEXPORT_PYTHON)`;
  if (!existsSync(CHROMIUM)) return `no chromium at ${CHROMIUM} (make setup installs it: apt-get install chromium)`;
  return null;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** The double-split MLP bundle (TF.js exported), digits as safetensors, a tokens file. */
export function makeFixture() {
  const out = mkdtempSync(path.join(os.tmpdir(), 'splitexport-browser-'));
  const res = spawnSync(python, ['-m', 'tests.device_runtime.js_e2e_fixture', out], {
    cwd: repoRoot, encoding: 'utf8',
    env: { ...process.env, TF_CPP_MIN_LOG_LEVEL: '3', TFDF_DISABLE_WELCOME_MESSAGE: '1' },
  });
  if (res.status !== 0) throw new Error(`fixture script failed (${python}):\n${res.stderr}`);
  const fixture = JSON.parse(readFileSync(path.join(out, 'fixture.json'), 'utf8'));
  const raw = decodeSafetensors(readFileSync(fixture.data));
  const t = (k) => tf.tensor(raw[k].data, raw[k].shape, raw[k].data instanceof Int32Array ? 'int32' : 'float32');
  fixture.dataset = { xTrain: t('x_train'), yTrain: t('y_train'), xTest: t('x_test'), yTest: t('y_test') };
  return fixture;
}

/** `python -m splitexport serve BUNDLE ...extra` on a free port; `await server.stop()`. */
export async function startServer(fixture, extra = []) {
  const port = await freePort();
  const state = mkdtempSync(path.join(os.tmpdir(), 'se-state-'));
  const args = ['-m', 'splitexport', 'serve', fixture.double.bundle, '--port', String(port), '--state-dir', state,
    '--tokens', fixture.tokens, ...extra];
  const proc = spawn(python, args, { cwd: repoRoot, stdio: ['ignore', 'ignore', 'inherit'] });
  const url = `http://127.0.0.1:${port}`;
  const stop = () => (proc.exitCode != null ? Promise.resolve()
    : new Promise((r) => { proc.once('exit', r); proc.kill('SIGTERM'); }));
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline) {
    if (proc.exitCode != null) throw new Error(`server exited with ${proc.exitCode}: ${args.join(' ')}`);
    try {
      if ((await fetch(`${url}/healthz`)).ok) return { url, port, stop };
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  await stop();
  throw new Error(`server did not start: ${args.join(' ')}`);
}

/** The Node run the page must reproduce: same bundle, data, epochs, batch size, seed, cpu backend. */
export async function nodeRun(fixture, url, { epochs, batchSize = 32 }) {
  await tf.setBackend('cpu');
  const client = new ServerClient(url, { token: fixture.token });
  const a = await loadSegmentFromServer(client, 'A');
  const c = await loadSegmentFromServer(client, 'C');
  const remote = await RemoteSegment.open(client);
  let steps = 0;
  const started = performance.now();
  const history = await trainSplit({ a, c, remote, data: fixture.dataset, epochs, batchSize, seed: 0,
    onStep: () => { steps += 1; } });
  return { history, steps, seconds: (performance.now() - started) / 1000 };
}

export async function launchBrowser() {
  const puppeteer = require('puppeteer-core');
  return puppeteer.launch({ executablePath: CHROMIUM, headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
}

/**
 * Open `pageUrl` (the /app/ page), choose the data file, press Train, and wait for the run to end.
 * @returns {Promise<{state: string, error: string | null, history: any[], steps?: number, seconds?: number,
 *   sessionId?: string, elapsedMs: number, page: any}>}
 */
export async function pageRun(browser, pageUrl, dataFile, timeoutMs = 600_000) {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(pageUrl, { waitUntil: 'load' });
  const input = await page.$('#data');
  await input.uploadFile(dataFile);
  const t0 = Date.now();
  await page.click('#start');
  await page.waitForFunction(() => ['done', 'error'].includes(window.splitexportRun.state), { timeout: timeoutMs, polling: 200 });
  const run = await page.evaluate(() => JSON.parse(JSON.stringify(window.splitexportRun)));
  return { ...run, elapsedMs: Date.now() - t0, page };
}
