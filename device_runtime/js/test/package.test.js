// The package as npm would publish it: tfjs a peer dependency, declarations that compile and match the
// runtime exports, only what an app needs in the tarball, index.js re-exports only.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as runtime from '../src/index.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'));

test('tfjs is a peer dependency, not a bundled one', () => {
  assert.equal(pkg.dependencies?.['@tensorflow/tfjs'], undefined);
  assert.ok(pkg.peerDependencies['@tensorflow/tfjs']);
  assert.ok(pkg.devDependencies['@tensorflow/tfjs']);
});

test('every runtime export is declared in types/index.d.ts, and the declarations compile', () => {
  const dts = readFileSync(path.join(root, 'types', 'index.d.ts'), 'utf8');
  const declared = new Set([...dts.matchAll(/export (?:declare )?(?:class|function|const|interface|type) (\w+)/g)]
    .map((m) => m[1]).concat(['tf']));
  const missing = Object.keys(runtime).filter((k) => !declared.has(k));
  assert.deepEqual(missing, []);
  execFileSync(path.join(root, 'node_modules', '.bin', 'tsc'), ['-p', path.join(root, 'test', 'types')], { stdio: 'pipe' });
});

test('npm pack ships src, types and app with the exports map pointing at them', () => {
  const [info] = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--json'], { cwd: root, encoding: 'utf8' }));
  const files = info.files.map((f) => f.path);
  for (const need of ['src/index.js', 'src/loader.js', 'src/segment.js', 'types/index.d.ts', 'types/node.d.ts',
    'package.json']) assert.ok(files.includes(need), need);
  assert.ok(!files.some((f) => f.startsWith('test/') || f.startsWith('node_modules/')), files.join());
  for (const entry of Object.values(pkg.exports)) {
    for (const target of typeof entry === 'string' ? [entry] : Object.values(entry)) {
      assert.ok(files.includes(target.replace(/^\.\//, '')), target);
    }
  }
});

test('index.js only re-exports (no code of its own for train.js to import in a cycle)', () => {
  const src = readFileSync(path.join(root, 'src', 'index.js'), 'utf8').replace(/\/\*[\s\S]*?\*\//g, '');
  const statements = src.split('\n').filter((l) => l.trim());
  assert.ok(statements.every((l) => /^export (\*|\{)/.test(l)), statements.join('\n'));
});
