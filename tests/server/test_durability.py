"""Durability: SIGKILL in every crash window and at random points, corrupt state, a full disk."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from device_runtime import RemoteSegment, ServerClient
from splitexport import SplitModel, TorchSegment, load_bundle, max_abs_difference
from splitexport._bundle import Bundle
from tests._support import TOKEN, ServerProcess, free_port

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def killable_server(bundle: Path, state_dir: Path, tokens: Path, *extra: str) -> ServerProcess:
    """`splitexport serve` in a child process that may be SIGKILLed (or kill itself: ``start(fault)``);
    each start's stderr is kept beside the state directory."""
    return ServerProcess(bundle, state_dir, tokens, *extra, stderr_dir=state_dir.parent)


def runners(bundle: Bundle, remote: object) -> list:
    m = bundle.manifest
    return [remote if s.role == "server" else
            TorchSegment(bundle.torch_segment(s.name), m.optimizer, loss=m.loss.kind, input_grad=s.index > 0)
            for s in m.segments]


def reference_b(bundle: Bundle, batches: list[tuple[int, torch.Tensor]], digits, devices: int) -> dict:
    """B after the same steps in process, devices taking turns (each device has its own A and C)."""
    b_spec = next(s for s in bundle.manifest.segments if s.role == "server")
    b = TorchSegment(bundle.torch_segment(b_spec.name), bundle.manifest.optimizer, loss=bundle.manifest.loss.kind)
    models = [SplitModel(runners(bundle, b)) for _ in range(devices)]
    for device, idx in batches:
        models[device].step(digits.x_train[idx], digits.y_train[idx])
    return b.module.state_dict()


def batches_for(digits, steps: int, devices: int, batch: int = 8) -> list[tuple[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(i % devices, torch.randint(0, len(digits.x_train), (batch,), generator=gen)) for i in range(steps)]


def final_snapshot(state_dir: Path) -> dict:
    return torch.load(state_dir / "checkpoint.pt", weights_only=True)  # type: ignore[no-any-return]


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text(f"{TOKEN}\n")
    return path


def _restarter(server: ServerProcess, stop: threading.Event) -> threading.Thread:
    """Start the server again (without a fault) whenever it has died."""
    def loop() -> None:
        while not stop.is_set():
            assert server.proc is not None
            if server.proc.poll() is not None:
                try:
                    server.start()
                except RuntimeError:  # killed while starting: start again
                    continue
            time.sleep(0.05)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def test_sigkill_in_every_crash_window_loses_and_repeats_nothing(resnet_bundle: Path, digits, tmp_path: Path,
                                                                 tokens: Path) -> None:
    """BatchNorm in B; the server kills itself before, inside and after the commit, after the apply (the
    reply is lost) and while writing a snapshot; the Python client recovers on its own each time."""
    bundle = load_bundle(resnet_bundle)
    state_dir = tmp_path / "state"
    server = killable_server(resnet_bundle, state_dir, tokens, "--checkpoint-every", "3")
    faults = ["before_commit:2", "in_commit:4", "after_commit:6", "after_apply:8", "in_snapshot:9"]
    steps = 12
    batches = batches_for(digits, steps, 1)
    server.start(faults[0])
    stop = threading.Event()
    try:
        client = ServerClient(server.url, TOKEN, max_wait_s=120, backoff_s=0.05)
        remote = RemoteSegment(client)
        keep = client.open_session()["session_id"]  # opened before a kill: stays
        gone = client.open_session()["session_id"]
        httpx.delete(f"{server.url}/v1/sessions/{gone}", headers=AUTH).raise_for_status()  # deleted: stays so
        model = SplitModel(runners(bundle, remote))
        pending = list(faults[1:])

        def restart() -> None:  # each restart arms the next crash window
            while not stop.is_set():
                assert server.proc is not None
                if server.proc.poll() is not None:
                    server.start(pending.pop(0) if pending else None)
                time.sleep(0.05)

        watcher = threading.Thread(target=restart, daemon=True)
        watcher.start()
        for _, idx in batches:
            model.step(digits.x_train[idx], digits.y_train[idx])
        stop.set()
        watcher.join()
        assert server.starts == len(faults) + 1, f"every fault fired: {server.log}"
        assert client.retries > 0
        assert client.session(remote.session_id)["next_step"] == steps
        assert client.session(keep)["next_step"] == 0
        with pytest.raises(Exception, match="unknown_session|404"):
            client.session(gone)
    finally:
        stop.set()
        err = server.stop()
    assert "resumed from step" in err
    saved = final_snapshot(state_dir)
    assert saved["applied_steps"] == steps
    ref = reference_b(bundle, batches, digits, 1)
    diff, where = max_abs_difference(saved["module"], ref)
    print(f"crash windows {faults}: B max |dw| vs uninterrupted = {diff:.3e} ({where})")
    assert diff <= 1e-5  # a step lost or applied twice moves B by > 1e-3
    assert not list(state_dir.glob("*.tmp"))


def test_random_sigkills_while_four_devices_train(mlp_bundle: Path, digits, tmp_path: Path, tokens: Path) -> None:
    """SIGKILL at random moments (inside steps, commits, snapshots) while 4 devices take turns on B:
    every step is applied exactly once and B ends equal to an uninterrupted run's."""
    kills = int(os.environ.get("SPLITEXPORT_TEST_KILLS", "6"))
    devices, per_device = 4, 10
    bundle = load_bundle(mlp_bundle)
    state_dir = tmp_path / "state"
    server = killable_server(mlp_bundle, state_dir, tokens, "--checkpoint-every", "2")
    batches = batches_for(digits, devices * per_device, devices)
    server.start()
    stop = threading.Event()
    turn = threading.Condition()
    position = [0]
    errors: list[BaseException] = []
    restarter = _restarter(server, stop)
    try:
        remotes = [RemoteSegment(ServerClient(server.url, TOKEN, max_wait_s=120, backoff_s=0.05))
                   for _ in range(devices)]
        models = [SplitModel(runners(bundle, r)) for r in remotes]

        def device(d: int) -> None:
            try:
                for i, (owner, idx) in enumerate(batches):
                    if owner != d:
                        continue
                    with turn:
                        turn.wait_for(lambda i=i: position[0] >= i)  # type: ignore[misc]
                    models[d].step(digits.x_train[idx], digits.y_train[idx])
                    with turn:
                        position[0] += 1
                        turn.notify_all()
            except BaseException as exc:  # noqa: BLE001 - re-raised by the test
                errors.append(exc)
                with turn:
                    position[0] = 10**9
                    turn.notify_all()

        threads = [threading.Thread(target=device, args=(d,)) for d in range(devices)]
        for t in threads:
            t.start()
        rng = random.Random(0)
        done = 0
        # kill points drawn over the run's steps (not wall time, which a loaded machine stretches), each at a
        # random moment after that step began: inside steps, commits and snapshots
        targets = sorted(rng.sample(range(1, devices * per_device * 3 // 4), kills))
        for target in targets:
            while position[0] < target and any(t.is_alive() for t in threads):
                time.sleep(0.002)
            if not any(t.is_alive() for t in threads):
                break
            time.sleep(rng.uniform(0.0, 0.01))
            assert server.proc is not None
            if server.proc.poll() is None:
                server.kill()
                done += 1
                while server.proc.poll() is not None:  # the restarter brings it back
                    time.sleep(0.02)
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        stop.set()
        restarter.join()
        print(f"{done} SIGKILLs at random points while {devices} devices trained")
        assert done == kills, "the devices finished before every kill fired; train longer"
        for r in remotes:
            assert r.client.session(r.session_id)["next_step"] == per_device
    finally:
        stop.set()
        server.stop()
    saved = final_snapshot(state_dir)
    assert saved["applied_steps"] == devices * per_device
    diff, where = max_abs_difference(saved["module"], reference_b(bundle, batches, digits, devices))
    print(f"after {kills} random SIGKILLs: B max |dw| vs uninterrupted = {diff:.3e} ({where})")
    assert diff == 0.0


def _serve_exit(bundle: Path, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitexport", "serve", str(bundle), "--state-dir", str(state_dir),
                           "--port", str(free_port())], check=False, capture_output=True, text=True, timeout=120)


def test_damaged_state_is_refused_in_one_line(mlp_bundle: Path, tmp_path: Path) -> None:
    from server import ServerSettings, ServerState

    state_dir = tmp_path / "state"
    state = ServerState(ServerSettings(bundle=mlp_bundle, state_dir=state_dir, checkpoint_every=1))
    state.checkpoint()
    state.store.close()
    snap = state_dir / "checkpoint.pt"
    good = snap.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01  # one flipped bit inside the tensor data
    snap.write_bytes(bytes(data))
    result = _serve_exit(mlp_bundle, state_dir)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "checksum" in result.stderr or "damaged" in result.stderr

    snap.write_bytes(good)  # a checkpoint with NaN weights (checksum consistent) is refused too
    saved = torch.load(snap, weights_only=True)
    saved.pop("checksum")
    key = next(iter(saved["module"]))
    saved["module"][key].fill_(float("nan"))
    state.store.write_snapshot(saved)
    result = _serve_exit(mlp_bundle, state_dir)
    assert result.returncode == 2 and "non-finite" in result.stderr and "Traceback" not in result.stderr

    (state_dir / "state.db").write_bytes(b"not a database" * 100)
    result = _serve_exit(mlp_bundle, state_dir)
    assert result.returncode == 2 and "unusable" in result.stderr and "Traceback" not in result.stderr


def test_start_logs_fresh_start_then_resumed(mlp_bundle: Path, tmp_path: Path, caplog) -> None:
    from server import ServerSettings, ServerState
    from server._store import SessionWrite

    settings = ServerSettings(bundle=mlp_bundle, state_dir=tmp_path / "s")
    with caplog.at_level("WARNING", logger="splitexport.server"):
        state = ServerState(settings)
    assert "fresh start" in caplog.text and state.resumed_from is None
    state.store.write_sessions([SessionWrite.open("abc", "h")])
    state.store.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="splitexport.server"):
        again = ServerState(settings)
    assert "resumed from step 0" in caplog.text and "abc" in again.sessions
    again.store.close()


def test_state_files_are_not_left_behind(mlp_bundle: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "s"
    state_dir.mkdir()
    (state_dir / "checkpoint.tmp").write_bytes(b"partial")  # a snapshot a crash interrupted
    from server import ServerSettings, ServerState

    state = ServerState(ServerSettings(bundle=mlp_bundle, state_dir=state_dir))
    assert not (state_dir / "checkpoint.tmp").exists()
    state.store.close()
    shutil.rmtree(state_dir)


def test_sigkill_at_a_round_end_applies_it_exactly_once(mlp_bundle: Path, tmp_path: Path, tokens: Path) -> None:
    """SplitFed, two devices; four round ends, each hit by a SIGKILL in another window: while the round end's
    snapshot is written, after the snapshot but before the sessions' rows are saved, after all of it before the
    reply (these two rounds also run an iteration, so the snapshot carries a B step), and while the first
    device's call waits at the barrier (the test kills). The devices' clients retry on their own against the restarted
    server: every round end is applied exactly once (the server's round counts them), every device gets the
    sample-weighted average, and B ends equal to the in-process strategy's."""
    from device_runtime import HttpLink
    from splitexport.strategies import StrategyConfig, average_states, make_strategy

    names = ["a", "b"]
    # the fault armed for each round: SPLITEXPORT_FAULT=<point>:<n> fires at or after the n-th applied step, so the
    # server that recovers round r's end (before the iteration of round r + 1) can be armed for round r + 1 already
    windows = ["in_snapshot:0", "after_snapshot:1", "after_round_end:2", None]
    bundle = load_bundle(mlp_bundle)
    spec, m = bundle.manifest.server_segments[0], bundle.manifest
    ref = make_strategy("sfl", TorchSegment(bundle.torch_segment(spec.name), m.optimizer, loss=m.loss.kind),
                        StrategyConfig(num_clients=2, client_lr=m.optimizer.lr))
    gen = torch.Generator().manual_seed(0)
    # snapshots only at round ends (and shutdown), so each fault fires in its round end
    server = killable_server(mlp_bundle, tmp_path / "state", tokens, "--strategy", "sfl", "--clients", "2",
                             "--round-timeout", "60", "--checkpoint-every", "1000")
    server.start(windows[0])
    try:
        with HttpLink(server.url, names, TOKEN, max_wait_s=120) as link:
            for r, window in enumerate(windows):
                if r in (1, 2):  # an iteration, which the round end's snapshot keeps (the fault is in it or after it)
                    x = {c: torch.randn(8, *spec.input.sample_shape, generator=gen) for c in names}
                    g = {c: torch.randn(8, *spec.output.sample_shape, generator=gen) for c in names}
                    link.participants(r, names)
                    link.forward_round(x)
                    link.backward_round(g)
                    ref.forward_round(x)
                    ref.backward_round(g)
                states = {c: {"A.w": torch.randn(3, 2, generator=gen), "C.n": torch.tensor([r + i])}
                          for i, c in enumerate(names)}
                counts = {"a": 3 + r, "b": 5}
                replies: dict[str, dict[str, torch.Tensor]] = {}
                ending = threading.Thread(target=lambda out, st, n: out.update(link.end_round(st, n)),
                                          args=(replies, states, counts))
                if window is None:  # the first device's round end waits at the barrier when the server dies
                    first = threading.Thread(target=lambda out, i, st, n: out.update(
                        a=link.remotes["a"].end_round(i, st, n)), args=(replies, r, states["a"], counts["a"]))
                    first.start()
                    time.sleep(1.0)
                    server.kill()
                    server.start()
                    replies["b"] = link.remotes["b"].end_round(r, states["b"], counts["b"])
                    first.join()
                    link.round += 1
                else:  # the server kills itself inside the round end; the clients retry against its successor
                    ending.start()
                    assert server.proc is not None
                    assert server.proc.wait(timeout=60) == -9, f"the fault {window} did not fire"
                    server.start(windows[r + 1] if r + 1 < len(windows) else None)
                    ending.join()
                expected = average_states(states, counts)
                for c in names:
                    assert set(replies[c]) == set(expected), (window, c)
                    assert all(torch.equal(replies[c][k], expected[k]) for k in expected), (window, c)
                ref.end_round(states, counts)
                info = httpx.get(f"{server.url}/v1/strategy", headers=AUTH).json()
                assert (info["round"], info["next_iteration"]) == (r + 1, min(r, 2)), (window, info)
        server.stop()
        diff, where = max_abs_difference(final_snapshot(tmp_path / "state")["module"],  # B, once per snapshot
                                         ref.server.module.state_dict())  # type: ignore[union-attr]
        assert diff == 0.0, (diff, where)
    finally:
        server.stop()


@pytest.mark.parametrize(("sync", "pragma"), [("full", 2), ("normal", 1)])
def test_sqlite_synchronous_reaches_the_store(mlp_bundle: Path, tmp_path: Path, sync: str, pragma: int) -> None:
    from server import ServerSettings, ServerState

    state = ServerState(ServerSettings(bundle=mlp_bundle, state_dir=tmp_path / "s", sqlite_synchronous=sync))
    try:
        assert state.store._db.execute("PRAGMA synchronous").fetchone()[0] == pragma
    finally:
        state.store.close()


def test_sync_normal_loses_no_step_to_a_sigkill(mlp_bundle: Path, digits, tmp_path: Path, tokens: Path) -> None:
    """``--sync normal``: steps acknowledged before a SIGKILL (no snapshot since start) are all replayed from the log;
    B equals an uninterrupted run's."""
    bundle = load_bundle(mlp_bundle)
    state_dir = tmp_path / "state"
    server = killable_server(mlp_bundle, state_dir, tokens, "--sync", "normal", "--checkpoint-every", "1000")
    batches = batches_for(digits, 4, 1)
    server.start()
    try:
        remote = RemoteSegment(ServerClient(server.url, TOKEN, max_wait_s=60, backoff_s=0.05))
        model = SplitModel(runners(bundle, remote))
        for _, idx in batches:
            model.step(digits.x_train[idx], digits.y_train[idx])
        server.kill()
        assert not (state_dir / "checkpoint.pt").exists()  # everything comes from the step log
        server.start()
        assert remote.client.session(remote.session_id)["next_step"] == len(batches)
    finally:
        server.stop()
    saved = final_snapshot(state_dir)
    assert saved["applied_steps"] == len(batches)
    diff, where = max_abs_difference(saved["module"], reference_b(bundle, batches, digits, 1))
    assert diff == 0.0, where
