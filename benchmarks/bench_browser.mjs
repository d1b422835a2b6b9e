// Browser vs Node for the TF.js device runtime, and the size of the example app's bundle.
//   node benchmarks/bench_browser.mjs            # 3 epochs of the MLP (double split, digits, batch 32)
//   node benchmarks/bench_browser.mjs --smoke    # 1 epoch (checks the script; numbers are noisy)
//   [--json OUT]
// Bundle: esbuild bundles app/worker.js (the training Web Worker: runtime + tfjs) minified for browsers,
// then gzip -9; the runtime alone is bundled with tfjs external. Speed: a Node run and the /app/ page in
// Debian's headless chromium (cpu backend, Web Worker), each against a fresh `splitexport serve` on
// loopback; steps/s = steps / wall time of trainSplit including per-epoch evaluation.
import { writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { createRequire } from 'node:module';

import { jsRoot, launchBrowser, makeFixture, missing, nodeRun, pageRun, startServer } from '../tests/browser/harness.mjs';

const args = process.argv.slice(2);
const smoke = args.includes('--smoke');
const jsonOut = args.includes('--json') ? args[args.indexOf('--json') + 1] : null;
const epochs = smoke ? 1 : 3;
const esbuild = createRequire(path.join(jsRoot, 'package.json'))('esbuild');

async function bundle(entry, external) {
  const runtimeDir = path.join(jsRoot, 'src');
  const result = await esbuild.build({
    entryPoints: [entry], bundle: true, minify: true, format: 'esm', platform: 'browser', target: 'es2020',
    write: false, external, logLevel: 'error',
    plugins: [{ name: 'runtime', setup(b) {  // the app imports the runtime from the path the server serves it at
      b.onResolve({ filter: /^\.\/runtime\// }, (a) => ({ path: path.join(runtimeDir, a.path.slice('./runtime/'.length)) }));
    } }],
  });
  const code = result.outputFiles[0].contents;
  return { minified: code.length, gzipped: gzipSync(code, { level: 9 }).length };
}

const kib = (n) => `${(n / 1024).toFixed(0)} KiB`;
const sizes = {
  app: await bundle(path.join(jsRoot, 'app', 'worker.js'), []),
  runtime: await bundle(path.join(jsRoot, 'src', 'index.js'), ['@tensorflow/tfjs']),
};
console.log(`bundle of the example app's worker (runtime + tfjs): ${kib(sizes.app.minified)} minified, ${kib(sizes.app.gzipped)} gzipped`);
console.log(`runtime alone (tfjs external): ${kib(sizes.runtime.minified)} minified, ${kib(sizes.runtime.gzipped)} gzipped`);

const why = missing();
let speed = null;
if (why) {
  console.log(`speed skipped: ${why}`);
} else {
  const fixture = makeFixture();
  const s1 = await startServer(fixture);
  const node = await nodeRun(fixture, s1.url, { epochs });
  await s1.stop();
  const s2 = await startServer(fixture, ['--app']);
  const browser = await launchBrowser();
  const page = await pageRun(browser, `${s2.url}/app/?epochs=${epochs}&backend=cpu#token=${fixture.token}`, fixture.data);
  await browser.close();
  await s2.stop();
  if (page.state !== 'done') throw new Error(`browser run failed: ${page.error}`);
  speed = {
    epochs, steps: node.steps,
    node: { seconds: node.seconds, steps_per_s: node.steps / node.seconds },
    browser: { seconds: page.seconds, steps_per_s: page.steps / page.seconds },
  };
  console.log(`| runtime | steps | seconds | steps/s |\n|---|---|---|---|`);
  for (const k of ['node', 'browser']) {
    console.log(`| ${k === 'node' ? 'Node 20' : 'chromium, Web Worker'} (cpu backend) | ${speed.steps} | ${speed[k].seconds.toFixed(1)} | ${speed[k].steps_per_s.toFixed(1)} |`);
  }
}
console.log(`machine: ${os.cpus().length} x ${os.cpus()[0]?.model}, node ${process.version}`);
if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ sizes, speed, smoke }, null, 2));
process.exit(0);
