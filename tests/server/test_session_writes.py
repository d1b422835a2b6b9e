"""Opening and closing sessions: durable before the reply, committed off the event loop, grouped into one commit.

The store's session transaction is made slow for real (``SPLITEXPORT_DELAY=session_commit:<s>``: the writer thread
sleeps inside the transaction, holding the store's lock, as during a slow fsync)."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server._store import SessionWrite, StepRecord, Store
from tests._support import TOKEN, ServerProcess, threaded_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOW_S = 1.0


def _rows(state_dir: Path, table: str = "sessions") -> list[tuple[object, ...]]:
    """The committed rows, read through a second, read-only connection (what a restart would find)."""
    db = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return db.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        db.close()


def _probe_while(url: str, busy: threading.Thread) -> list[float]:
    """``/healthz`` latencies (seconds) while ``busy`` runs (at least three probes)."""
    latencies: list[float] = []
    while busy.is_alive() or len(latencies) < 3:
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    return latencies


def test_a_slow_session_commit_does_not_block_the_event_loop(mlp_bundle: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """While an open and then a delete sit in their transaction for 1 s, /healthz and another session's read
    answer promptly; the open and the delete are answered only after their commit, and are in state.db then."""
    monkeypatch.setenv("SPLITEXPORT_DELAY", f"session_commit:{SLOW_S}")
    state_dir = tmp_path / "s"
    with threaded_server(mlp_bundle, state_dir) as (url, state):
        other = httpx.post(f"{url}/v1/sessions", headers=AUTH, timeout=10).json()["session_id"]
        for method, path in (("POST", "/v1/sessions"), ("DELETE", f"/v1/sessions/{other}")):
            result: dict[str, object] = {}

            def call(method: str = method, path: str = path, result: dict[str, object] = result) -> None:
                t0 = time.perf_counter()
                result["response"] = httpx.request(method, f"{url}{path}", headers=AUTH, timeout=10)
                result["seconds"] = time.perf_counter() - t0

            slow = threading.Thread(target=call)
            slow.start()
            time.sleep(0.1)
            latencies = _probe_while(url, slow)
            t0 = time.perf_counter()
            read = httpx.get(f"{url}/v1/sessions/{other}", headers=AUTH, timeout=10)
            read_s = time.perf_counter() - t0
            slow.join()
            response, seconds = result["response"], result["seconds"]
            assert isinstance(response, httpx.Response) and isinstance(seconds, float)
            print(f"{method} {path}: {seconds:.3f} s; /healthz meanwhile max {max(latencies) * 1e3:.1f} ms "
                  f"over {len(latencies)} probes")
            assert response.status_code in (201, 204), response.text
            assert seconds >= SLOW_S  # answered after its commit, not before
            assert max(latencies) < SLOW_S / 2, latencies  # the loop never waited for the commit
            if method == "POST":
                assert read_s < SLOW_S / 2 and read.status_code == 200
                opened = response.json()["session_id"]
                assert opened in {r[0] for r in _rows(state_dir)}
            else:
                assert other not in {r[0] for r in _rows(state_dir)}
                assert other not in state.sessions


def test_concurrent_opens_share_a_commit_and_keep_the_cap_and_idempotency(mlp_bundle: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight opens at once (one token, cap 6) while the first commit is slow: 6 open, 2 get 429 (opens still being
    committed count against the cap), in at most 2 commits; two more with one Idempotency-Key while its commit is
    slow get one session; every acknowledged session is in state.db."""
    monkeypatch.setenv("SPLITEXPORT_DELAY", f"session_commit:{SLOW_S}")
    state_dir = tmp_path / "s"
    with threaded_server(mlp_bundle, state_dir, max_sessions_per_token=6) as (url, state):
        commits = state.store.commits
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{url}/v1/sessions", headers=AUTH, timeout=10), range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] * 6 + [429] * 2, [r.text for r in responses]
        assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"too_many_sessions"}
        group_commits = state.store.commits - commits
        print(f"8 concurrent opens: {group_commits} commits")
        assert group_commits <= 2
        opened = {r.json()["session_id"] for r in responses if r.status_code == 201}
        assert len(opened) == 6 and {r[0] for r in _rows(state_dir)} == opened == set(state.sessions)

        for sid in list(opened)[:2]:  # room for the idempotent pair (and one more)
            assert httpx.delete(f"{url}/v1/sessions/{sid}", headers=AUTH, timeout=10).status_code == 204
        keyed = {**AUTH, "Idempotency-Key": "device-7"}
        with ThreadPoolExecutor(2) as pool:
            pair = list(pool.map(lambda _: httpx.post(f"{url}/v1/sessions", headers=keyed, timeout=10), range(2)))
        assert [r.status_code for r in pair] == [201, 201]
        assert pair[0].json()["session_id"] == pair[1].json()["session_id"]
        assert ("device-7",) in [r[1:2] for r in _rows(state_dir, "idempotency")]
        assert len(_rows(state_dir)) == len(state.sessions) == 5


@pytest.mark.parametrize("point", ["in_session_commit", "after_session_commit"])
def test_sigkill_in_an_open_keeps_acknowledged_sessions_and_the_retry_works(mlp_bundle: Path, tmp_path: Path,
                                                                            point: str) -> None:
    """A real ``splitexport serve`` SIGKILLed inside an open's transaction, or after its commit before the reply: the
    device got no answer; after a restart the session opened before is there, and the retry with the same
    Idempotency-Key gets one session (the committed one when the commit had ended)."""
    state_dir = tmp_path / "s"
    server = ServerProcess(mlp_bundle, state_dir, None, stderr_dir=tmp_path)
    try:
        server.start()
        before = httpx.post(f"{server.url}/v1/sessions", timeout=10).json()["session_id"]
        server.stop()
        server.start(fault=f"{point}:0")
        keyed = {"Idempotency-Key": "device-1"}
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{server.url}/v1/sessions", headers=keyed, timeout=10)
        assert server.proc is not None and server.proc.wait(timeout=10) == -9
        rows = {r[0] for r in _rows(state_dir)}
        assert before in rows and len(rows) == (2 if point == "after_session_commit" else 1)
        server.start()
        retried = httpx.post(f"{server.url}/v1/sessions", headers=keyed, timeout=10)
        assert retried.status_code == 201
        sid = retried.json()["session_id"]
        if point == "after_session_commit":
            assert rows == {before, sid}  # the session the killed call committed
        assert httpx.get(f"{server.url}/v1/sessions/{before}", timeout=10).status_code == 200
        assert {r[0] for r in _rows(state_dir)} == {before, sid}
    finally:
        server.stop()


def test_a_step_committed_after_its_session_was_deleted_keeps_no_reply_row(tmp_path: Path) -> None:
    """A DELETE that commits while the session's step is on B's thread: the step's commit logs B's update (it was
    applied) but stores no reply for a session that no longer exists."""
    store = Store(tmp_path)
    store.write_sessions([SessionWrite.open("gone", "t"), SessionWrite.open("kept", "t")])
    store.write_sessions([SessionWrite.delete(["gone"])])
    seq = store.commit_steps([StepRecord(sid, "backward", 0, 1, "sha", b"reply", b"inputs") for sid in ("gone", "kept")])
    store.close()
    assert [r[0] for r in _rows(tmp_path, "responses")] == ["kept"]
    assert len(_rows(tmp_path, "steps")) == 2 and seq == 2
    assert [r[:3] for r in _rows(tmp_path)] == [("kept", "t", 1)]
