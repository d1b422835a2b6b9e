// What the tests that talk to the real server share: the Python interpreter ($SPLITEXPORT_PYTHON, default
// <repo>/.venv/bin/python), fixtures written by Python modules (tests/device_runtime/js_*_fixture.py), free
// loopback ports, and `python -m splitexport serve` as a child process. Outside test/ so that `node --test test/`
// does not run it as a test file; not shipped (package.json `files`).
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const pkgRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const repoRoot = path.resolve(pkgRoot, '..', '..');
export const python = process.env.SPLITEXPORT_PYTHON ?? path.join(repoRoot, '.venv', 'bin', 'python');
/** Why the tests against a real server are skipped (false: they run); SPLITEXPORT_JS_E2E=0 skips them. */
export const e2eSkip = process.env.SPLITEXPORT_JS_E2E === '0' ? 'SPLITEXPORT_JS_E2E=0'
  : existsSync(python) ? false : `no Python environment at ${python} (set SPLITEXPORT_PYTHON)`;

/** Run `python ARGS` in the repository; its stdout (throws with its stderr when it fails). */
export function runPython(args) {
  const res = spawnSync(python, args, {
    cwd: repoRoot,
    encoding: 'utf8',
    env: { ...process.env, TF_CPP_MIN_LOG_LEVEL: '3', TFDF_DISABLE_WELCOME_MESSAGE: '1' },
  });
  if (res.status !== 0) throw new Error(`${python} ${args.join(' ')} failed:\n${res.stderr}`);
  return res.stdout;
}

/** A free loopback port; with `consecutive`, the first of that many free ports in a row. */
export async function freePort(consecutive = 1) {
  const listen = (port) => new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(null));
    srv.listen(port, '127.0.0.1', () => {
      const got = srv.address().port;
      srv.close(() => resolve(got));
    });
  });
  for (let attempt = 0; attempt < 50; attempt++) {
    const first = await listen(0);
    let ok = first != null;
    for (let i = 1; ok && i < consecutive; i++) ok = (await listen(first + i)) != null;
    if (ok) return first;
  }
  throw new Error(`no ${consecutive} consecutive free ports`);
}

/**
 * `python -m splitexport serve BUNDLE ARGS --port PORT` as a child process (SIGKILL-able, restartable on the same
 * port and state), up once `/healthz` answers at every URL of `urls` (`--replicas N`: PORT, PORT + 1, ...).
 */
export class Server {
  /** @param {string[]} args everything after `serve` @param {string[]} urls */
  constructor(args, urls) {
    this.args = ['-m', 'splitexport', 'serve', ...args];
    this.urls = urls;
    this.url = urls[0];
    this.proc = null;
  }

  spawn() {
    // its own process group: a SIGKILL after a failed stop also reaches the ranks that `--replicas` spawns
    this.proc = spawn(python, this.args, { cwd: repoRoot, stdio: ['ignore', 'ignore', 'inherit'], detached: true });
  }

  async start() {
    this.spawn();
    const started = Date.now();
    const deadline = started + 180_000; // a loaded 2-core CI machine can take a minute to import torch
    for (const url of this.urls) {
      for (;;) {
        try {
          if ((await fetch(`${url}/healthz`)).ok) break;
        } catch {
          // not listening yet
        }
        if (Date.now() > deadline) {
          await this.stop('SIGKILL'); // no orphan server keeps the test process alive
          throw new Error(`server ${this.args.join(' ')} did not start`);
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    return (Date.now() - started) / 1000;
  }

  /** Stop the server; SIGKILL its process group if it has not exited 15 s after SIGTERM (a failed test must not hang). */
  stop(signal = 'SIGTERM') {
    const proc = this.proc;
    if (proc == null || proc.exitCode != null || proc.signalCode != null) return Promise.resolve();
    const done = new Promise((r) => proc.once('exit', r));
    const kill = (sig) => {
      try {
        process.kill(sig === 'SIGKILL' ? -proc.pid : proc.pid, sig);
      } catch {
        // already gone
      }
    };
    kill(signal);
    const timer = setTimeout(() => kill('SIGKILL'), 15_000);
    return done.finally(() => clearTimeout(timer));
  }
}
