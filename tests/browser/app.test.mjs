// The browser as a device: Debian's chromium (puppeteer-core) trains the MLP's A and C through
// `splitexport serve --app`'s /app/ page (Web Worker, cpu backend) and must reproduce the Node run's
// per-epoch numbers exactly; a page on another origin fails at once without --cors-origin and trains with
// it; /dashboard shows the run's steps and loss (screenshot saved). Run by `make test` (node --test tests/browser/).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';

import { launchBrowser, makeFixture, missing, nodeRun, pageRun, repoRoot, startServer } from './harness.mjs';

const EPOCHS = 3;
const skip = process.env.SPLITEXPORT_BROWSER === '0' ? 'SPLITEXPORT_BROWSER=0' : missing() ?? false;
const SHOTS = process.env.SPLITEXPORT_BROWSER_SHOTS ?? path.join(repoRoot, 'splitexport-results', 'browser');
let fixture;
let browser;
const servers = [];

before(async () => {
  if (skip) return;
  fixture = makeFixture();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await Promise.all(servers.map((s) => s.stop()));
});

async function server(extra) {
  const s = await startServer(fixture, extra);
  servers.push(s);
  return s;
}

test('/app/ trains the MLP in chromium to the same per-epoch numbers as Node; /dashboard shows it', { skip }, async () => {
  const ref = await server([]);
  const node = await nodeRun(fixture, ref.url, { epochs: EPOCHS });
  const app = await server(['--app']);
  const run = await pageRun(browser, `${app.url}/app/?epochs=${EPOCHS}&batch=32&backend=cpu#token=${fixture.token}`,
    fixture.data);
  assert.equal(run.state, 'done', run.error);
  console.log(`browser: ${run.steps} steps in ${run.seconds.toFixed(1)} s; node: ${node.steps} in ${node.seconds.toFixed(1)} s`);
  for (const e of run.history) {
    console.log(`epoch ${e.epoch}: train loss ${e.trainLoss} acc ${e.trainAccuracy}; test loss ${e.testLoss} acc ${e.testAccuracy}`);
  }
  assert.equal(run.history.length, EPOCHS);
  assert.deepEqual(run.history, node.history); // bit-identical floats: same weights path as Node
  assert.equal(run.steps, node.steps);
  assert.ok(run.history.at(-1).testAccuracy >= 0.9, `test accuracy ${run.history.at(-1).testAccuracy}`);
  // the page shows what it trained
  const shown = await run.page.evaluate(() => ({
    rows: document.querySelectorAll('#history tbody tr').length,
    final: document.getElementById('final').textContent,
    progress: [document.getElementById('progress').value, document.getElementById('progress').max],
  }));
  assert.deepEqual(shown, { rows: EPOCHS, final: run.history.at(-1).testAccuracy.toFixed(4),
    progress: [run.steps, run.steps] });

  // the dashboard: the run's steps applied and the loss/accuracy the page reported, from the DOM
  const dash = await browser.newPage();
  await dash.setViewport({ width: 1000, height: 1400 });
  await dash.goto(`${app.url}/dashboard?poll=300#token=${fixture.token}`);
  await dash.waitForFunction((steps, epochs) => document.getElementById('steps').textContent === String(steps) &&
    document.querySelectorAll('#metrics tbody tr').length === epochs, { timeout: 20_000 }, run.steps, EPOCHS);
  const dom = await dash.evaluate(() => ({
    sessions: document.getElementById('sessions').textContent,
    metrics: [...document.querySelectorAll('#metrics tbody tr')].map((tr) => [...tr.children].map((td) => td.textContent)),
    phases: [...document.querySelectorAll('#phases tbody tr')].map((tr) => tr.children[0].textContent),
    strategy: document.getElementById('strategy').textContent,
  }));
  assert.equal(dom.sessions, '1');
  assert.deepEqual(dom.metrics, run.history.map((e) => [run.sessionId, String(e.epoch), e.testLoss.toFixed(4),
    e.testAccuracy.toFixed(4)]));
  assert.ok(dom.phases.includes('total') && dom.phases.length >= 2, dom.phases.join());
  assert.equal(dom.strategy, 'none (sequential)');
  mkdirSync(SHOTS, { recursive: true });
  await dash.screenshot({ path: path.join(SHOTS, 'dashboard.png'), fullPage: true });
  await run.page.screenshot({ path: path.join(SHOTS, 'app.png'), fullPage: true });
});

test('a page on another origin fails at once without --cors-origin, and trains with it', { skip }, async () => {
  const host = await server(['--app']); // serves the page: its origin is the page's
  const bare = await server([]);
  const blocked = await pageRun(browser, `${host.url}/app/?server=${bare.url}&epochs=1#token=${fixture.token}`, fixture.data);
  assert.equal(blocked.state, 'error');
  assert.match(blocked.error, new RegExp(`--cors-origin ${host.url}`));
  assert.ok(blocked.elapsedMs < 10_000, `failed after ${blocked.elapsedMs} ms`);
  const open = await server(['--cors-origin', host.url]);
  const run = await pageRun(browser, `${host.url}/app/?server=${open.url}&epochs=1#token=${fixture.token}`, fixture.data);
  assert.equal(run.state, 'done', run.error);
  assert.ok(run.history[0].testAccuracy >= 0.5, `cross-origin epoch accuracy ${run.history[0].testAccuracy}`);
  const session = await (await fetch(`${open.url}/v1/sessions/${run.sessionId}`,
    { headers: { Authorization: `Bearer ${fixture.token}` } })).json();
  assert.equal(session.next_step, run.steps); // every step reached the other origin's server
});
