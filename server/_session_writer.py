"""Session opens and deletes made durable off the event loop, several in one transaction (group commit).

``POST /v1/sessions`` and ``DELETE /v1/sessions/{id}`` are answered only once their rows are committed (and,
with ``--sync full``, fsynced). That commit must not run on the event loop (an fsync takes milliseconds to tens
of milliseconds under load, and the store's lock may be held by a step's commit), nor on B's thread (it would
queue behind training: a strategy iteration takes hundreds of milliseconds). One dedicated thread writes them:
everything queued when it gets to work goes into one transaction, so opens and deletes that arrive together
share one fsync.

It writes through the store's one SQLite connection, under the store's lock (the connection is opened with
``check_same_thread=False``; every use holds the lock): with a single connection there is no ``SQLITE_BUSY``
between writers and no busy timeout to tune, and the lock orders these transactions with B's step commits
(SQLite admits one writer at a time in any case).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ._store import SessionWrite, Store

log = logging.getLogger("splitexport.server")

_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class SessionWriter:
    """Queues session changes and commits them in batches on its own thread, in arrival order."""

    def __init__(self, store: Store, before_commit: Callable[[], None] | None = None,
                 after_commit: Callable[[], None] | None = None) -> None:
        """``before_commit`` runs inside each batch's transaction, ``after_commit`` after it, before anyone is told
        (test-only delays and crashes, :mod:`._faults`)."""
        self._store = store
        self._before_commit = before_commit
        self._after_commit = after_commit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitexport-store")
        self._lock = threading.Lock()
        self._queue: list[tuple[SessionWrite, _Waiter | None]] = []

    def write(self, change: SessionWrite) -> asyncio.Future[None]:
        """Queue ``change``; the returned future (of the running loop) is done once the change is committed, or
        holds the store's error (the whole batch failed: nothing of it was written)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._put(change, (loop, fut))
        return fut

    def write_later(self, change: SessionWrite) -> None:
        """Queue ``change`` with nobody waiting for it (expired sessions); after a failure it goes with the next
        batch."""
        self._put(change, None)

    def _put(self, change: SessionWrite, waiter: _Waiter | None) -> None:
        with self._lock:
            self._queue.append((change, waiter))
        self._pool.submit(self._flush)

    def _flush(self) -> None:
        """Commit everything queued (on the writer's thread). One flush is submitted per change; a flush that
        finds the queue empty had its change taken along by an earlier one."""
        with self._lock:
            batch, self._queue = self._queue, []
        if not batch:
            return
        error: Exception | None = None
        try:
            self._store.write_sessions([change for change, _ in batch], self._before_commit)
            if self._after_commit is not None:
                self._after_commit()
        except Exception as exc:  # noqa: BLE001 - handed to every waiter (storage errors become 507/503 there)
            error = exc
            later = [(change, None) for change, waiter in batch if waiter is None]
            if later:
                log.warning("could not delete expired sessions from the store (%s: %s); retrying with the next "
                            "session write", type(exc).__name__, exc)
                with self._lock:
                    self._queue[:0] = later
        for _, waiter in batch:
            if waiter is not None:
                _resolve(waiter, error)

    def shutdown(self) -> None:
        """Write what is queued, then stop the thread."""
        self._pool.shutdown(wait=True)


def _resolve(waiter: _Waiter, error: Exception | None) -> None:
    loop, fut = waiter

    def done() -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:  # the loop has closed (shutdown): nobody waits any more
        pass
