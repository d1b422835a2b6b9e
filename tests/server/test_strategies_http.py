"""The strategy layer over real HTTP: round barriers, one batched B step, SplitAvg, averaging, AdaSplit, 409s."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load, save

from device_runtime import HttpLink, ServerError
from server import ServerSettings, create_app
from splitexport import TorchSegment, load_bundle, max_abs_difference
from splitexport.strategies import StrategyConfig, average_states, make_strategy
from tests._support import TOKEN, threaded_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ST = {**AUTH, "Content-Type": "application/vnd.safetensors"}


def server_spec(bundle_path: Path):
    bundle = load_bundle(bundle_path)
    return bundle, bundle.manifest.server_segments[0]


def reference(bundle_path: Path, name: str, **config: object):
    """The same strategy in process around a fresh copy of the bundle's B."""
    bundle, spec = server_spec(bundle_path)
    m = bundle.manifest
    seg = TorchSegment(bundle.torch_segment(spec.name), m.optimizer, loss=m.loss.kind, input_grad=True)
    return make_strategy(name, seg, StrategyConfig(client_lr=m.optimizer.lr, **config))  # type: ignore[arg-type]


def activations(bundle_path: Path, clients: list[str], batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    _, spec = server_spec(bundle_path)
    gen = torch.Generator().manual_seed(seed)
    return {c: torch.randn(batch, *spec.input.sample_shape, generator=gen) for c in clients}


def open_session(url: str) -> str:
    return str(httpx.post(f"{url}/v1/sessions", headers=AUTH).json()["session_id"])


def test_psl_round_is_one_b_step_over_the_concatenated_batch(mlp_bundle: Path, tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    ref = reference(mlp_bundle, "psl", num_clients=3)
    x = activations(mlp_bundle, names)
    gen = torch.Generator().manual_seed(1)
    with threaded_server(mlp_bundle, tmp_path / "s", strategy="psl", num_clients=3) as (url, state), \
            HttpLink(url, names, TOKEN) as link:
        for c in reversed(names):  # the server hears from the devices in the reverse of the order they opened
            assert httpx.get(f"{url}/v1/sessions/{link.remotes[c].session_id}", headers=AUTH).status_code == 200
        assert link.participants(0, names) == names
        out = link.forward_round(x)
        grads = {c: torch.randn(o.shape, generator=gen) for c, o in out.items()}
        back = link.backward_round(grads)
        assert state.applied_steps == 1  # one B step for the three devices
        ref_out = ref.forward_round(x)
        ref_back = ref.backward_round(grads)
        for c in names:  # bit for bit: B concatenates the batches in the order the sessions opened
            assert torch.equal(out[c], ref_out[c]) and torch.equal(back[c], ref_back[c]), c
        diff, where = max_abs_difference(state.segment.module.state_dict(), ref.server.module.state_dict())
        assert diff == 0.0, (diff, where)
        assert state.metrics()["iterations_total"] == 1


def test_sglr_broadcasts_one_averaged_gradient_and_scales_server_lr(mlp_single_bundle: Path, digits,
                                                                   tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    bundle, _ = server_spec(mlp_single_bundle)
    lr = bundle.manifest.optimizer.lr
    x = activations(mlp_single_bundle, names)
    y = {c: digits.y_train[i * 8:(i + 1) * 8] for i, c in enumerate(names)}
    with threaded_server(mlp_single_bundle, tmp_path / "s", strategy="sglr", num_clients=4, alpha=0.5,
                         phi=1.0) as (url, state), HttpLink(url, names, TOKEN) as link:
        info = httpx.get(f"{url}/v1/strategy", headers=AUTH).json()
        assert info["server_lr"] == pytest.approx(lr * 4**0.5)
        assert state.segment.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 2)
        link.participants(0, names)
        replies = link.train_round({c: (x[c], y[c]) for c in names})
        grads = [replies[c].grad for c in names]
        first = grads[0]
        assert first is not None and all(g is not None and torch.equal(g, first) for g in grads)
        assert link.last_broadcast == frozenset(names)
        losses = {replies[c].loss for c in names}
        assert len(losses) == 4  # each device still gets its own loss and logits


def test_sfl_round_end_gives_every_device_the_same_average(mlp_bundle: Path, tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    gen = torch.Generator().manual_seed(0)
    states = {c: {"A.w": torch.randn(4, 3, generator=gen), "A.n": torch.tensor(i)} for i, c in enumerate(names)}
    counts = {"a": 10, "b": 20, "c": 30}
    with threaded_server(mlp_bundle, tmp_path / "s", strategy="sfl", num_clients=3) as (url, _), \
            HttpLink(url, names, TOKEN) as link:
        link.participants(0, names)
        out = link.forward_round(activations(mlp_bundle, names))
        link.backward_round({c: torch.ones_like(o) for c, o in out.items()})
        new = link.end_round(states, counts)
        assert set(new) == set(names)
        expected = average_states(states, counts)
        for c in names:
            assert new[c].keys() == expected.keys()
            assert all(torch.allclose(new[c][k], expected[k]) for k in expected)
            assert all(torch.equal(new[c][k], new["a"][k]) for k in expected)
        info = httpx.get(f"{url}/v1/strategy", headers=AUTH).json()
        assert info["round"] == 1 and info["next_iteration"] == 1
        # the strategy state is checkpointed with B
        saved = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)
        assert saved["strategy"]["name"] == "sfl" and saved["strategy"]["strategy"]["round"] == 1


def test_adasplit_selects_devices_and_sends_no_gradient(mlp_single_bundle: Path, digits, tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    x = activations(mlp_single_bundle, names)
    with threaded_server(mlp_single_bundle, tmp_path / "s", strategy="adasplit", num_clients=4, eta=0.5,
                         kappa=0.0) as (url, state), HttpLink(url, names, TOKEN) as link:
        chosen = link.participants(0, names)
        assert len(chosen) == 2
        other = next(c for c in names if c not in chosen)
        body = save({"activation": x[other].numpy(), "labels": digits.y_train[:8].numpy()})
        sid = link.remotes[other].session_id
        r = httpx.post(f"{url}/v1/sessions/{sid}/steps/0/train", content=body, headers=ST)
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_in_round"
        replies = link.train_round({c: (x[c], digits.y_train[:8]) for c in chosen})
        assert all(r.grad is None and r.loss is not None and r.output is not None for r in replies.values())
        # a selected device's raw response has no gradient at all
        chosen_sid = link.remotes[chosen[0]].session_id
        raw = httpx.post(f"{url}/v1/sessions/{chosen_sid}/steps/0/train", headers=ST,
                         content=save({"activation": x[chosen[0]].numpy(), "labels": digits.y_train[:8].numpy()}))
        assert raw.status_code == 200 and set(load(raw.content)) == {"loss", "output"}
        assert state.applied_steps == 2


def test_exactly_once_inside_a_round(mlp_single_bundle: Path, digits, tmp_path: Path) -> None:
    x = activations(mlp_single_bundle, ["a", "b"])
    with threaded_server(mlp_single_bundle, tmp_path / "s", strategy="psl", num_clients=2) as (url, state):
        sids = [open_session(url), open_session(url)]
        bodies = [save({"activation": x[c].numpy(), "labels": digits.y_train[:8].numpy()}) for c in "ab"]
        results: dict[str, httpx.Response] = {}

        def call(key: str, sid: str, body: bytes) -> None:
            results[key] = httpx.post(f"{url}/v1/sessions/{sid}/steps/0/train", content=body, headers=ST, timeout=30)

        # device 0 sends its call twice (a retry while the barrier waits), device 1 completes the barrier
        threads = [threading.Thread(target=call, args=(k, sids[0], bodies[0])) for k in ("first", "retry")]
        for t in threads:
            t.start()
        call("other", sids[1], bodies[1])
        for t in threads:
            t.join()
        assert all(r.status_code == 200 for r in results.values()), {k: r.text for k, r in results.items()}
        assert results["first"].content == results["retry"].content
        assert state.applied_steps == 1
        again = httpx.post(f"{url}/v1/sessions/{sids[0]}/steps/0/train", content=bodies[0], headers=ST)
        assert again.content == results["first"].content and state.applied_steps == 1
        conflict = httpx.post(f"{url}/v1/sessions/{sids[0]}/steps/0/train", content=bodies[1], headers=ST)
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflicting_retry"
        ahead = httpx.post(f"{url}/v1/sessions/{sids[0]}/steps/5/train", content=bodies[0], headers=ST)
        assert ahead.status_code == 409 and ahead.json()["error"]["code"] == "wrong_step"


def test_round_timeout_proceeds_with_the_devices_present(mlp_bundle: Path, tmp_path: Path) -> None:
    x = activations(mlp_bundle, ["a", "b", "c"])
    with threaded_server(mlp_bundle, tmp_path / "s", strategy="psl", num_clients=3,
                         round_timeout_s=0.5) as (url, state):
        sids = [open_session(url) for _ in range(3)]
        outs: dict[int, httpx.Response] = {}

        def forward(i: int) -> None:
            body = save({"activation": x["abc"[i]].numpy()})
            outs[i] = httpx.post(f"{url}/v1/sessions/{sids[i]}/steps/0/forward", content=body, headers=ST,
                                 timeout=30)

        threads = [threading.Thread(target=forward, args=(i,)) for i in (0, 1)]  # device 2 stays silent
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [outs[i].status_code for i in (0, 1)] == [200, 200]
        late = httpx.post(f"{url}/v1/sessions/{sids[2]}/steps/0/forward", headers=ST,
                          content=save({"activation": x["c"].numpy()}))
        assert late.status_code == 409 and late.json()["error"]["code"] == "not_in_round"
        backs: dict[int, httpx.Response] = {}

        def backward(i: int) -> None:
            g = np.ones_like(load(outs[i].content)["output"])
            backs[i] = httpx.post(f"{url}/v1/sessions/{sids[i]}/steps/0/backward", content=save({"grad": g}),
                                  headers=ST, timeout=30)

        threads = [threading.Thread(target=backward, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [backs[i].status_code for i in (0, 1)] == [200, 200]
        assert load(backs[0].content)["grad"].shape == x["a"].shape
        assert state.applied_steps == 1


def test_misuse_is_refused_precisely(mlp_bundle: Path, mlp_single_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="adasplit.*single split.*double split"):
        create_app(ServerSettings(bundle=mlp_bundle, state_dir=tmp_path / "a", strategy="adasplit", num_clients=2))
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        create_app(ServerSettings(bundle=mlp_bundle, state_dir=tmp_path / "b", strategy="nope", num_clients=2))
    with pytest.raises(ValueError, match="--clients"):
        create_app(ServerSettings(bundle=mlp_bundle, state_dir=tmp_path / "c", strategy="psl"))
    with threaded_server(mlp_single_bundle, tmp_path / "d") as (url, _):  # no strategy: the old protocol
        sid = open_session(url)
        r = httpx.post(f"{url}/v1/sessions/{sid}/rounds/0/end", content=save({}), headers=ST)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_strategy"
    with threaded_server(mlp_bundle, tmp_path / "e", strategy="psl", num_clients=1) as (url, _):
        sid = open_session(url)
        r = httpx.post(f"{url}/v1/sessions/{sid}/rounds/3/end", content=save({}), headers=ST)
        assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_round"
        r = httpx.get(f"{url}/v1/sessions/{sid}/device-state", headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_call"
    with pytest.raises(ValueError, match="strategy 'psl'"):  # a checkpoint of another strategy
        create_app(ServerSettings(bundle=mlp_bundle, state_dir=tmp_path / "e", strategy="sfl", num_clients=1))


def test_simulation_over_http_equals_in_process(mlp_bundle: Path, digits, tmp_path: Path) -> None:
    from splitexport.simulation import simulate_clients

    bundle = load_bundle(mlp_bundle)
    small = dataclasses.replace(digits, x_train=digits.x_train[:192], y_train=digits.y_train[:192],
                                x_test=digits.x_test[:64], y_test=digits.y_test[:64])
    kw = {"strategy": "sfl", "clients": 3, "rounds": 2, "batch_size": 16, "dataset": small, "progress": False}
    local = simulate_clients(bundle, **kw)  # type: ignore[arg-type]
    with threaded_server(mlp_bundle, tmp_path / "s", strategy="sfl", num_clients=3, total_rounds=2) as (url, state), \
            HttpLink(url, 3, TOKEN) as link:
        remote = simulate_clients(bundle, link=link, **kw)  # type: ignore[arg-type]
        assert link.retries == 0
    for a, b in zip(local.rounds, remote.rounds, strict=True):
        assert math.isclose(a.test_accuracy, b.test_accuracy, abs_tol=1e-9)
        assert math.isclose(a.train_loss, b.train_loss, rel_tol=1e-4)
    assert state.counters["errors"] == 0


def test_backward_without_forward_is_a_409(mlp_bundle: Path, tmp_path: Path) -> None:
    _, spec = server_spec(mlp_bundle)
    with threaded_server(mlp_bundle, tmp_path / "s", strategy="psl", num_clients=1) as (url, _), \
            HttpLink(url, ["a"], TOKEN) as link:
        link.participants(0, ["a"])
        with pytest.raises(ServerError) as err:
            link.backward_round({"a": torch.zeros(8, *spec.output.sample_shape)})
        assert err.value.status == 409 and err.value.code == "wrong_step"


@pytest.mark.parametrize(("name", "bundle_name"), [("ssl", "mlp_bundle"), ("sglr", "mlp_bundle"),
                                                   ("adasplit", "mlp_single_bundle"), ("fedavg", "mlp_single_bundle")])
def test_every_strategy_over_http_matches_in_process(name: str, bundle_name: str, digits, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    from splitexport.simulation import simulate_clients

    path = request.getfixturevalue(bundle_name)
    bundle = load_bundle(path)
    small = dataclasses.replace(digits, x_train=digits.x_train[:96], y_train=digits.y_train[:96],
                                x_test=digits.x_test[:48], y_test=digits.y_test[:48])
    kw = {"strategy": name, "clients": 3, "rounds": 2, "batch_size": 16, "dataset": small, "progress": False,
          "alpha": 0.5, "phi": 1.0}
    local = simulate_clients(bundle, **kw)  # type: ignore[arg-type]
    with threaded_server(path, tmp_path / "s", strategy=name, num_clients=3, total_rounds=2, alpha=0.5,
                         phi=1.0) as (url, state), HttpLink(url, 3, TOKEN) as link:
        remote = simulate_clients(bundle, link=link, **kw)  # type: ignore[arg-type]
    for a, b in zip(local.rounds, remote.rounds, strict=True):
        assert math.isclose(a.test_accuracy, b.test_accuracy, abs_tol=1e-9), (a, b)
        assert math.isclose(a.train_loss, b.train_loss, rel_tol=1e-4, abs_tol=1e-6), (a, b)
    assert state.counters["errors"] == 0


def test_serve_cli_refuses_a_strategy_the_bundle_cannot_run(mlp_bundle: Path, tmp_path: Path, capsys) -> None:
    from splitexport._cli import main

    code = main(["serve", str(mlp_bundle), "--state-dir", str(tmp_path / "s"), "--strategy", "adasplit",
                 "--clients", "4"])
    assert code == 2
    assert "strategy 'adasplit' needs a single split" in capsys.readouterr().err


def test_restart_mid_iteration_resumes_with_the_strategy_state(mlp_bundle: Path, tmp_path: Path) -> None:
    from device_runtime import RemoteSegment, ServerClient

    names = ["a", "b"]
    x = activations(mlp_bundle, names)
    ref = reference(mlp_bundle, "sfl", num_clients=2)
    with threaded_server(mlp_bundle, tmp_path / "s", strategy="sfl", num_clients=2) as (url, first), \
            HttpLink(url, names, TOKEN) as link:
        link.participants(0, names)
        out = link.forward_round(x)
        grads = {c: torch.ones_like(o) for c, o in out.items()}
        link.backward_round(grads)
        link.end_round({c: {"A.w": torch.full((2,), float(i))} for i, c in enumerate(names)}, {"a": 1, "b": 1})
        before_stop = {k: v.detach().clone() for k, v in first.segment.module.state_dict().items()}
        link.participants(1, names)
        link.forward_round(x)  # the server stops between this forward and its backward
        sessions = {c: r.session_id for c, r in link.remotes.items()}
    ref.forward_round(x)
    ref.backward_round(grads)
    ref.end_round({}, {})
    with threaded_server(mlp_bundle, tmp_path / "s", strategy="sfl", num_clients=2) as (url, state):
        info = httpx.get(f"{url}/v1/strategy", headers=AUTH).json()
        assert info["round"] == 1 and info["next_iteration"] == 1
        # the restart restores B exactly as the server had it, and that B is the in-process step bit for bit: the
        # server concatenates the devices' batches in the order their sessions opened, as the reference does (in
        # the order they were last heard from it was 8.9e-8 off in fc2.weight whenever b's call came first)
        restored, _ = max_abs_difference(state.segment.module.state_dict(), before_stop)
        assert restored == 0.0
        diff, where = max_abs_difference(state.segment.module.state_dict(), ref.server.module.state_dict())
        assert diff == 0.0, (diff, where)
        remotes = {c: RemoteSegment(ServerClient(url, TOKEN), sessions[c]) for c in names}
        results: dict[str, torch.Tensor] = {}

        def finish(c: str) -> None:  # the lost forward is resent by the client, then the backward goes through
            remotes[c]._forward_body = save({"activation": x[c].numpy()})
            results[c] = remotes[c].train_with_gradient(grads[c])  # type: ignore[assignment]

        threads = [threading.Thread(target=finish, args=(c,)) for c in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ref.forward_round(x)
        ref_back = ref.backward_round(grads)
        assert set(results) == set(names)
        for c in names:
            assert torch.equal(results[c], ref_back[c]), c
        diff, where = max_abs_difference(state.segment.module.state_dict(), ref.server.module.state_dict())
        assert diff == 0.0, (diff, where)
        assert state.applied_steps == 2


def test_simulate_cli_runs_the_devices_against_a_served_strategy(mlp_bundle: Path, tmp_path: Path, capsys) -> None:
    from splitexport._cli import main

    with threaded_server(mlp_bundle, tmp_path / "s", strategy="psl", num_clients=2) as (url, state):
        wrong = ["simulate", str(mlp_bundle), "--server", url, "--token", TOKEN, "--clients", "3", "--no-progress"]
        assert main(wrong) == 2
        assert "runs psl for 2 clients" in capsys.readouterr().err
        out = tmp_path / "out"
        args = ["simulate", str(mlp_bundle), "--server", url, "--token", TOKEN, "--clients", "2", "--rounds", "1",
                "--no-progress", "--out", str(out)]
        assert main(args) == 0
        assert state.applied_steps > 0 and state.counters["errors"] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runs"][0]["strategy"] == "psl" and metrics["runs"][0]["clients"] == 2
    assert "final test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "bundle_name"), [("psl", "mlp_bundle"), ("adasplit", "mlp_single_bundle")])
def test_sigkill_replays_the_strategy_log(name: str, bundle_name: str, tmp_path: Path, request: pytest.FixtureRequest,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A strategy's calls are durable by the step log, not by a snapshot per step: SIGKILL after a round end's
    snapshot and two more iterations, restart, and B (with AdaSplit's masks and UCB state) is as it was."""
    from device_runtime import HttpLink
    from tests._support import ServerProcess

    path = request.getfixturevalue(bundle_name)
    names = ["a", "b", "c", "d"]
    for key, value in {"STRATEGY": name, "NUM_CLIENTS": 4, "KAPPA": 0, "ETA": 0.5, "THREADS": 1}.items():
        monkeypatch.setenv(f"SPLITEXPORT_{key}", str(value))
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    server = ServerProcess(path, tmp_path / "s", tokens)
    server.start()
    _, spec = server_spec(path)
    single = spec.is_last
    ref = reference(path, name, num_clients=4, kappa=0.0, eta=0.5)
    gen = torch.Generator().manual_seed(3)
    probe = torch.randn(5, *spec.input.sample_shape, generator=gen)

    def iteration(link: HttpLink, step: int) -> None:
        members = link.participants(ref.round, names)
        assert members == ref.participants(ref.round, names)
        x = activations(path, members, seed=step)
        if single:
            y = {c: torch.randint(0, 10, (8,), generator=gen) for c in members}
            link.train_round({c: (x[c], y[c]) for c in members})
            for c in members:  # in client order, one at a time, as the server serves AdaSplit
                ref.train_round({c: (x[c], y[c])})
        else:
            link.forward_round(x)
            ref.forward_round(x)
            g = {c: torch.randn(8, *spec.output.sample_shape, generator=gen) for c in members}
            link.backward_round(g)
            ref.backward_round(g)

    def evaluate(sessions: dict[str, str]) -> dict[str, bytes]:
        body = save({"activation": probe.numpy()})
        return {c: httpx.post(f"{server.url}/v1/sessions/{sid}/evaluate", content=body, headers=ST).content
                for c, sid in sessions.items()}

    try:
        with HttpLink(server.url, names, TOKEN) as link:
            iteration(link, 0)
            link.end_round({}, {})  # a snapshot; the iterations after it are only in the log
            ref.end_round({}, {})
            iteration(link, 1)
            iteration(link, 2)
            sessions = {c: r.session_id for c, r in link.remotes.items()}
        before = evaluate(sessions)
        server.kill()  # SIGKILL: no final snapshot
        server.start()
        assert evaluate(sessions) == before  # B (and each session's AdaSplit mask) exactly as before the kill
        info = httpx.get(f"{server.url}/v1/strategy", headers=AUTH).json()
        assert info["round"] == 1 and info["next_iteration"] == 3
    finally:
        server.stop()
    saved = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)  # written at the clean stop
    assert saved["applied_steps"] == 3 if not single else saved["applied_steps"] == 6
    diff, where = max_abs_difference(saved["module"], ref.server.module.state_dict())  # type: ignore[union-attr]
    assert diff <= 1e-6, where
    if name == "adasplit":
        ucb = saved["strategy"]["strategy"]["ucb"]
        assert ucb["iterations"] == ref.orchestrator.iterations  # type: ignore[attr-defined]
        assert ucb["s"] == pytest.approx(dict(zip(sessions.values(),
                                                  (ref.orchestrator.s[c] for c in names), strict=True)))  # type: ignore[attr-defined]


def test_a_barrier_commits_every_device_in_one_transaction(mlp_bundle: Path, tmp_path: Path) -> None:
    """Group commit: when the backward barrier fires for three devices, their replies and step counters and the
    iteration's log entry reach state.db in one SQLite transaction (no snapshot of B per iteration)."""
    import sqlite3

    names = ["a", "b", "c"]
    x = activations(mlp_bundle, names)
    with threaded_server(mlp_bundle, tmp_path / "s", strategy="psl", num_clients=3) as (url, state), \
            HttpLink(url, names, TOKEN) as link:
        link.participants(0, names)
        out = link.forward_round(x)
        commits = state.store.commits
        back = link.backward_round({c: torch.ones_like(o) for c, o in out.items()})
        assert state.store.commits == commits + 1
        assert not (tmp_path / "s" / "checkpoint.pt").exists()  # B is not snapshotted per iteration
        sessions = {link.remotes[c].session_id: c for c in names}
        db = sqlite3.connect(tmp_path / "s" / "state.db")
        rows = db.execute("SELECT session_id, step, response FROM responses WHERE kind = 'backward'").fetchall()
        steps = dict(db.execute("SELECT id, next_step FROM sessions").fetchall())
        log = db.execute("SELECT kind, step FROM steps ORDER BY seq").fetchall()
        db.close()
    assert sorted(sessions[sid] for sid, _, _ in rows) == names
    for sid, step, response in rows:
        assert step == 0 and torch.equal(torch.from_numpy(load(response)["grad"].copy()), back[sessions[sid]])
    assert all(steps[sid] == 1 for sid in sessions)
    assert log == [("open", 0), ("iteration", 0)]
