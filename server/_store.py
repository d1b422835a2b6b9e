"""The server's durable state: SQLite (WAL mode) for sessions, responses and the step log; B's snapshots.

One database ``state.db`` in the state directory holds

* ``sessions``: one row per open session; it changes only when that session steps (or opens, closes);
* ``responses``: the last response of each call kind per session, for exactly-once retries (written
  once per step and replaced by the next: at most one row per session and call kind);
* ``steps``: the write-ahead log of the steps applied since the last snapshot: the step's input tensors
  (what replaying B's update needs), committed in the same transaction as the session row and response;
  with a strategy, its calls (:class:`LogEvent`: an iteration's opening and B step, round ends, turns);
* ``idempotency``: the ``Idempotency-Key`` a session was opened with (per token), deleted with the session;
* ``meta``: the bundle it belongs to, the strategy, and the format.

B and its optimizer are snapshotted to ``checkpoint.pt`` every N steps (write, fsync, rename) with a
sha256 of their contents; after a snapshot the log up to it is deleted. See docs/protocol.md (Durability).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

DB = "state.db"
_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}
"""``--sync`` to ``PRAGMA synchronous``."""
SNAPSHOT = "checkpoint.pt"
FORMAT = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, next_step INTEGER NOT NULL, phase TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    session_id TEXT NOT NULL, kind TEXT NOT NULL, step INTEGER NOT NULL, body_sha TEXT NOT NULL,
    response BLOB NOT NULL, PRIMARY KEY (session_id, kind));
CREATE TABLE IF NOT EXISTS steps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, kind TEXT NOT NULL, step INTEGER NOT NULL,
    inputs BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (
    token_hash TEXT NOT NULL, key TEXT NOT NULL, session_id TEXT NOT NULL, PRIMARY KEY (token_hash, key));
"""


class StateError(ValueError):
    """The state directory cannot be used (one line for the operator)."""


@dataclass
class StoredSession:
    id: str
    token_hash: str
    next_step: int
    phase: str
    responses: dict[str, tuple[int, str, bytes]]
    """kind -> (step, body sha256, response)."""
    idempotency_key: str | None = None


@dataclass(frozen=True)
class SessionWrite:
    """One session change for :meth:`Store.write_sessions`: an open (``token_hash`` set) or a delete."""

    session_ids: tuple[str, ...]
    token_hash: str | None = None
    idempotency_key: str | None = None

    @classmethod
    def open(cls, session_id: str, token_hash: str, idempotency_key: str | None = None) -> SessionWrite:
        return cls((session_id,), token_hash, idempotency_key)

    @classmethod
    def delete(cls, session_ids: list[str]) -> SessionWrite:
        return cls(tuple(session_ids))


@dataclass
class StepRecord:
    """One applied step for the log: who, which, and the inputs that replay B's update."""

    session_id: str
    kind: str
    step: int
    next_step: int
    body_sha: str
    response: bytes | None
    """None: only the session's ``next_step`` changes (a device a barrier proceeded without)."""
    inputs: bytes | None
    """safetensors bytes of the step's tensors; None: the step is logged as a :class:`LogEvent` instead."""


@dataclass
class LogEvent:
    """One entry of the step log that is not a single session's step: a strategy's call (an iteration's
    opening, its B step over several devices, a round end, a relayed turn), replayed in order on restart."""

    kind: str
    step: int
    inputs: bytes
    """:func:`pack` of the call's tensors and its other arguments."""
    session_id: str = ""


def pack(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    """safetensors bytes of ``tensors`` with ``meta`` (JSON) in the header's metadata."""
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"meta": json.dumps(meta)})


def unpack(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the metadata of :func:`pack`."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    meta: dict[str, Any] = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    return st_load(blob), meta


def digest(obj: Any) -> str:
    """sha256 over a nested structure of dicts, lists, tensors and scalars (keys sorted)."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, Mapping):
            h.update(b"{")
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, list | tuple):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        elif isinstance(o, np.ndarray):
            walk(torch.from_numpy(np.ascontiguousarray(o)))
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


class Store:
    """SQLite in WAL mode; every write is one transaction, fsynced (``synchronous=FULL``, the default) or, with
    ``synchronous="normal"``, handed to the OS and fsynced at WAL checkpoints (durable across a killed process, not
    across a power loss or OS crash; docs/protocol.md, Durability)."""

    def __init__(self, state_dir: Path, synchronous: Literal["full", "normal"] = "full") -> None:
        self.dir = state_dir
        self.bytes_written = 0
        """Bytes of tensors, rows and snapshots handed to the disk (the benchmark reads it)."""
        self.commits = 0
        """Write transactions committed (each one fsync of the WAL)."""
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            for stale in state_dir.glob("*.tmp"):  # a snapshot that a crash interrupted
                stale.unlink()
            self._db = sqlite3.connect(state_dir / DB, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[synchronous]}")
            self.synchronous = ("OFF", "NORMAL", "FULL", "EXTRA")[self._db.execute("PRAGMA synchronous").fetchone()[0]]
            """The connection's ``PRAGMA synchronous`` as SQLite reports it (the start log line names it)."""
            self._db.executescript(_SCHEMA)
            self._file = self._identity()
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"state directory {state_dir} is unusable: {exc}") from exc
        self._lock = threading.Lock()

    def _identity(self) -> tuple[int, int]:
        st = os.stat(self.dir / DB)
        return st.st_dev, st.st_ino

    def _check_file(self) -> None:
        """``OSError`` when ``state.db`` was removed or replaced since it was opened: SQLite would go on writing to
        the open, unlinked file, acknowledging steps that no restart can find."""
        if self._identity() != self._file:  # a missing file raises FileNotFoundError itself
            raise OSError(errno.ESTALE, f"{self.dir / DB} was replaced since the server opened it")

    @property
    def snapshot_path(self) -> Path:
        return self.dir / SNAPSHOT

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._check_file()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self.commits += 1

    # -- meta ---------------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, values: Mapping[str, str]) -> None:
        with self._txn() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    # -- sessions -----------------------------------------------------------------------------

    def sessions(self) -> list[StoredSession]:
        with self._lock:
            rows = self._db.execute("SELECT id, token_hash, next_step, phase FROM sessions ORDER BY rowid").fetchall()
            out = {r[0]: StoredSession(r[0], r[1], int(r[2]), r[3], {}) for r in rows}
            for sid, kind, step, sha, response in self._db.execute("SELECT * FROM responses"):
                if sid in out:
                    out[sid].responses[kind] = (int(step), sha, bytes(response))
            for sid, key in self._db.execute("SELECT session_id, key FROM idempotency"):
                if sid in out:
                    out[sid].idempotency_key = key
        return list(out.values())

    def write_sessions(self, writes: list[SessionWrite], before_commit: Callable[[], None] | None = None) -> None:
        """Opens and deletes of sessions, in order, in one transaction (``._session_writer`` groups them)."""
        with self._txn() as db:
            for w in writes:
                if w.token_hash is not None:
                    sid = w.session_ids[0]
                    db.execute("INSERT INTO sessions VALUES (?, ?, 0, 'forward')", (sid, w.token_hash))
                    if w.idempotency_key is not None:
                        db.execute("INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?)",
                                   (w.token_hash, w.idempotency_key, sid))
                else:
                    ids = [(s,) for s in w.session_ids]
                    db.executemany("DELETE FROM sessions WHERE id = ?", ids)
                    db.executemany("DELETE FROM responses WHERE session_id = ?", ids)
                    db.executemany("DELETE FROM idempotency WHERE session_id = ?", ids)
            if before_commit is not None:
                before_commit()

    # -- steps --------------------------------------------------------------------------------

    def commit_steps(self, records: list[StepRecord], before_commit: Callable[[], None] | None = None,
                     events: list[LogEvent] | None = None) -> int:
        """The steps' session rows, responses and log records, then ``events``, in one transaction (a group
        commit: every device of a barrier at once); the last log seq (0: nothing logged)."""
        seq = 0
        with self._txn() as db:
            for r in records:
                row = db.execute("UPDATE sessions SET next_step = ?, phase = 'forward' WHERE id = ?",
                                 (r.next_step, r.session_id))
                if r.response is not None and row.rowcount:  # a session deleted meanwhile keeps no reply row
                    db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                               (r.session_id, r.kind, r.step, r.body_sha, r.response))
                    self.bytes_written += len(r.response) + 64
                if r.inputs is not None:
                    cur = db.execute("INSERT INTO steps (session_id, kind, step, inputs) VALUES (?, ?, ?, ?)",
                                     (r.session_id, r.kind, r.step, r.inputs))
                    seq = int(cur.lastrowid or 0)
                    self.bytes_written += len(r.inputs)
            for e in events or ():
                cur = db.execute("INSERT INTO steps (session_id, kind, step, inputs) VALUES (?, ?, ?, ?)",
                                 (e.session_id, e.kind, e.step, e.inputs))
                seq = int(cur.lastrowid or 0)
                self.bytes_written += len(e.inputs) + 32
            if before_commit is not None:
                before_commit()
        return seq

    def log(self, after_seq: int) -> list[tuple[int, str, int, bytes]]:
        """The logged steps after ``after_seq``: (seq, kind, step, inputs), in order."""
        with self._lock:
            rows = self._db.execute("SELECT seq, kind, step, inputs FROM steps WHERE seq > ? ORDER BY seq",
                                    (after_seq,)).fetchall()
        return [(int(s), k, int(n), bytes(b)) for s, k, n, b in rows]

    def last_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM steps").fetchone()
        return int(row[0] or 0)

    def drop_log(self, upto_seq: int) -> None:
        with self._txn() as db:
            db.execute("DELETE FROM steps WHERE seq <= ?", (upto_seq,))

    # -- snapshots ----------------------------------------------------------------------------

    def write_snapshot(self, payload: dict[str, Any], before_sync: Callable[[], None] | None = None) -> None:
        """``payload`` plus its ``checksum`` to ``checkpoint.pt`` atomically; no partial file on failure."""
        payload = {**payload, "checksum": digest(payload)}
        tmp = self.snapshot_path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                if before_sync is not None:
                    before_sync()
                os.fsync(f.fileno())
                self.bytes_written += f.tell()
            os.replace(tmp, self.snapshot_path)
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def read_snapshot(self) -> dict[str, Any] | None:
        """The last snapshot, checksum verified; ``StateError`` when it is damaged."""
        path = self.snapshot_path
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable snapshot is one operator error
            raise StateError(f"{path} is damaged ({type(exc).__name__}); restore it from a backup or use another "
                             "--state-dir") from exc
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise StateError(f"{path} has an unknown format; move it away to start fresh")
        saved = state.pop("checksum", None)
        if saved != digest(state):
            raise StateError(f"{path} fails its checksum (damaged); restore it from a backup or use another "
                             "--state-dir")
        return state
