"""B replicated over two torch.distributed ranks (gloo, loopback), each rank a real server process over HTTP.

8 devices (``HttpLink``, 4 redirected to each rank) train PSL (A | B | C) and SGLR (A | B); after every
iteration both ranks' B snapshots are bit-identical, and B, the cut gradients and the losses equal the
same strategy run in one process on all 8 devices' batches. A rank that dies mid-iteration makes the other
answer 503 ``replica_lost`` within the collective timeout, and a restarted job resumes every rank at the
same iteration with no step lost or doubled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from device_runtime import HttpLink, RemoteSegment, ServerClient
from splitexport import max_abs_difference
from tests._support import TOKEN, free_port, wait_until_healthy

from .test_strategies_http import AUTH, activations, reference

ITERATIONS = 8
CLIENTS = [f"client{i:02d}" for i in range(8)]


def two_ports() -> int:
    """A port P with P + 1 also free (rank r serves on P + r)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports")


@contextmanager
def ranks(bundle: Path, state_dir: Path, tmp: Path, strategy: str, clients: int, *args: str,
          faults: dict[int, str] | None = None, timeout_s: float = 20.0) -> Iterator[tuple[list[str], list[subprocess.Popen[bytes]]]]:
    """Two ranks of ``splitexport serve --distributed`` (as torchrun starts them), rank r on port P + r."""
    tokens = tmp / "tokens"
    tokens.write_text(TOKEN + "\n")
    port, master = two_ports(), free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "OMP_NUM_THREADS": "1"}
        env.pop("SPLITEXPORT_FAULT", None)
        if faults and rank in faults:
            env["SPLITEXPORT_FAULT"] = faults[rank]
        cmd = [sys.executable, "-m", "splitexport", "serve", str(bundle), "--distributed", "--strategy", strategy,
               "--clients", str(clients), "--port", str(port), "--state-dir", str(state_dir), "--tokens", str(tokens),
               "--threads", "1", "--collective-timeout", str(timeout_s), *args]
        log = tmp / f"rank{rank}-{len(list(tmp.glob(f'rank{rank}-*.log')))}.log"  # a pipe nobody reads could fill
        with log.open("wb") as err:
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err))
    urls = [f"http://127.0.0.1:{port + r}" for r in range(2)]
    try:
        for url, proc in zip(urls, procs, strict=True):
            wait_until_healthy(url, proc, timeout_s=120)
        yield urls, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def b_weights(state_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    snap = torch.load(state_dir / f"rank{rank}" / "checkpoint.pt", weights_only=True)
    return snap["module"]  # type: ignore[no-any-return]


def assert_identical(state_dir: Path) -> None:
    a, b = b_weights(state_dir, 0), b_weights(state_dir, 1)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("name", "bundle_name"), [("psl", "mlp_bundle"), ("sglr", "mlp_single_bundle")])
def test_two_replicas_equal_one_process_on_every_iteration(name: str, bundle_name: str, digits, tmp_path: Path,
                                                           request: pytest.FixtureRequest) -> None:
    bundle = request.getfixturevalue(bundle_name)
    config = {"alpha": 0.5, "phi": 1.0} if name == "sglr" else {}
    flags = ["--alpha", "0.5", "--phi", "1.0"] if name == "sglr" else []
    ref = reference(bundle, name, num_clients=8, **config)
    state_dir = tmp_path / "state"
    gen = torch.Generator().manual_seed(7)
    with ranks(bundle, state_dir, tmp_path, name, 8, "--round-timeout", "30", *flags) as (urls, _), \
            HttpLink(urls[0], CLIENTS, TOKEN) as link:
        placed = {c: str(r.client.http.base_url).rstrip("/") for c, r in link.remotes.items()}
        assert sorted(placed.values()) == sorted(urls * 4)  # round-robin: 4 devices on each replica
        assert all(r.session_id.startswith(f"r{urls.index(placed[c])}-") for c, r in link.remotes.items())
        for it in range(ITERATIONS):
            if it == ITERATIONS // 2:  # a round end in the middle: one collective over both ranks
                assert link.end_round({}, {}) == {}
                ref.end_round({}, {})
            assert link.participants(link.round, CLIENTS) == CLIENTS
            x = activations(bundle, CLIENTS, seed=it)
            if name == "psl":
                out = link.forward_round(x)
                ref_out = ref.forward_round(x)
                grads = {c: torch.randn(o.shape, generator=gen) for c, o in out.items()}
                back, ref_back = link.backward_round(grads), ref.backward_round(grads)
                for c in CLIENTS:
                    assert torch.allclose(out[c], ref_out[c], rtol=1e-5, atol=2e-5), (it, c)
                    assert torch.allclose(back[c], ref_back[c], rtol=1e-5, atol=2e-5), (it, c)
            else:
                batch = {c: (x[c], torch.as_tensor(digits.y_train[(it * 8 + i) * 8:(it * 8 + i + 1) * 8]))
                         for i, c in enumerate(CLIENTS)}
                replies, ref_replies = link.train_round(batch), ref.train_round(batch)
                assert link.last_broadcast == frozenset(CLIENTS) == ref.last_broadcast  # phi = 1: one mean for all
                for c in CLIENTS:
                    got, want = replies[c], ref_replies[c]
                    assert got.grad is not None and want.grad is not None
                    assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=2e-5), (it, c)
                    assert got.loss == pytest.approx(want.loss, abs=1e-5)
            assert_identical(state_dir)  # every replica took the same step
        diff, where = max_abs_difference(b_weights(state_dir, 0), ref.server.module.state_dict())
        print(f"{name}: max abs difference of B from one process after {ITERATIONS} iterations: {diff:.3g}")
        assert diff <= 1e-6, (diff, where)
        infos = [httpx.get(f"{u}/v1/strategy", headers=AUTH).json() for u in urls]
        assert [i["next_iteration"] for i in infos] == [ITERATIONS] * 2 and [i["round"] for i in infos] == [1, 1]
        replicas = httpx.get(f"{urls[1]}/v1/replicas", headers=AUTH).json()
        assert replicas["rank"] == 1 and replicas["replicas"] == urls and replicas["lost"] is None


def test_splitavg_samples_among_every_replicas_devices(mlp_single_bundle: Path, digits, tmp_path: Path) -> None:
    """SGLR with phi = 0.5: each iteration floor(0.5 x 8) = 4 devices, drawn from both replicas, get one gradient,
    the mean of their own cut gradients (PSL's, which B's step does not depend on); the others get their own."""
    ref = reference(mlp_single_bundle, "psl", num_clients=8)
    state_dir = tmp_path / "state"
    with ranks(mlp_single_bundle, state_dir, tmp_path, "sglr", 8, "--round-timeout", "30", "--phi", "0.5") \
            as (urls, _), HttpLink(urls[0], CLIENTS, TOKEN) as link:
        drawn: set[str] = set()
        for it in range(4):
            assert link.participants(0, CLIENTS) == CLIENTS
            x = activations(mlp_single_bundle, CLIENTS, seed=it)
            batch = {c: (x[c], torch.as_tensor(digits.y_train[(it * 8 + i) * 8:(it * 8 + i + 1) * 8]))
                     for i, c in enumerate(CLIENTS)}
            replies, own = link.train_round(batch), ref.train_round(batch)
            shared = sorted(link.last_broadcast)
            assert len(shared) == 4
            drawn |= set(shared)
            mean = torch.stack([own[c].grad for c in shared]).mean(dim=0)  # type: ignore[misc]
            for c in CLIENTS:
                got, want = replies[c].grad, (mean if c in shared else own[c].grad)
                assert got is not None and want is not None and torch.allclose(got, want, atol=1e-6), (it, c)
            assert_identical(state_dir)
        diff, _ = max_abs_difference(b_weights(state_dir, 0), ref.server.module.state_dict())
        assert diff <= 1e-6, diff
        rank_of = {c: str(r.client.http.base_url).rstrip("/") for c, r in link.remotes.items()}
        assert {rank_of[c] for c in drawn} == set(urls)  # the draws span both replicas

def train_call(url: str, session_id: str, step: int, x: torch.Tensor, y: torch.Tensor) -> httpx.Response:
    from safetensors.torch import save

    body = save({"activation": x.contiguous(), "labels": y.to(torch.int64).contiguous()})
    return httpx.post(f"{url}/v1/sessions/{session_id}/steps/{step}/train", content=body, timeout=60,
                      headers={**AUTH, "Content-Type": "application/vnd.safetensors"})


def test_a_dead_rank_makes_the_other_answer_503(mlp_single_bundle: Path, digits, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed in iteration 0 (after the all-reduce, while writing its snapshot); rank 0's devices then
    get 503 ``replica_lost`` in iteration 1 within the collective timeout. The restarted job resumes both ranks at
    iteration 1 (rank 1 takes rank 0's B), and iteration 1 then equals the in-process second step."""
    names = CLIENTS[:4]
    timeout_s = 4.0
    state_dir = tmp_path / "state"
    ref = reference(mlp_single_bundle, "psl", num_clients=4)
    xs = [activations(mlp_single_bundle, names, seed=s) for s in range(2)]
    ys = [{c: torch.as_tensor(digits.y_train[(s * 4 + i) * 8:(s * 4 + i + 1) * 8]) for i, c in enumerate(names)}
          for s in range(2)]
    with ranks(mlp_single_bundle, state_dir, tmp_path, "psl", 4, "--round-timeout", "30",
               faults={1: "in_snapshot:1"}, timeout_s=timeout_s) as (urls, procs):
        link = HttpLink(urls[0], names, TOKEN, max_wait_s=2)
        sessions = {c: (str(r.client.http.base_url).rstrip("/"), r.session_id) for c, r in link.remotes.items()}
        rank_of = {c: urls.index(url) for c, (url, _) in sessions.items()}
        assert link.participants(0, names) == names
        replies: dict[str, httpx.Response | None] = {}

        def call(c: str, step: int) -> None:
            url, sid = sessions[c]
            try:
                replies[c] = train_call(url, sid, step, xs[step][c], ys[step][c])
            except httpx.TransportError:  # rank 1 died under this call
                replies[c] = None

        threads = [threading.Thread(target=call, args=(c, 0)) for c in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert procs[1].wait(timeout=30) == -signal.SIGKILL
        on_rank0 = [c for c in names if sessions[c][0] == urls[0]]
        assert all((r := replies[c]) is not None and r.status_code == 200 for c in on_rank0)  # rank 0 finished iteration 0 and replied
        ref.train_round({c: (xs[0][c], ys[0][c]) for c in names})

        replies.clear()
        t0 = time.monotonic()
        threads = [threading.Thread(target=call, args=(c, 1)) for c in on_rank0]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        print(f"rank 0 answered 503 replica_lost {elapsed:.2f} s after its devices called (timeout {timeout_s} s)")
        for c in on_rank0:
            r = replies[c]
            assert r is not None and r.status_code == 503, r
            assert r.json()["error"]["code"] == "replica_lost"
        assert elapsed < timeout_s + 5, elapsed
        health = httpx.get(f"{urls[0]}/v1/replicas", headers=AUTH)
        assert health.status_code == 503 and health.json()["error"]["code"] == "replica_lost"
        link.close()

    with ranks(mlp_single_bundle, state_dir, tmp_path, "psl", 4, "--round-timeout", "30",
               timeout_s=timeout_s) as (urls, _):
        infos = [httpx.get(f"{u}/v1/strategy", headers=AUTH).json() for u in urls]
        assert [i["next_iteration"] for i in infos] == [1, 1]
        resumed = httpx.get(f"{urls[1]}/v1/replicas", headers=AUTH).json()["resumed"]
        assert resumed["from_rank"] == 0 and resumed["positions"][1][1] == 0  # rank 1 was one iteration behind
        assert_identical(state_dir)
        diff, _ = max_abs_difference(b_weights(state_dir, 1), ref.server.module.state_dict())
        assert diff <= 1e-6, diff  # iteration 0 is in B exactly once
        remotes = {c: RemoteSegment(ServerClient(urls[rank_of[c]], TOKEN), sessions[c][1]) for c in names}
        out: dict[str, torch.Tensor] = {}

        failed: dict[str, BaseException] = {}

        def step1(c: str) -> None:
            try:
                remotes[c].participates(1)
                _, grad, _ = remotes[c].train_with_labels(xs[1][c], ys[1][c])
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                failed[c] = exc
                return
            assert grad is not None
            out[c] = grad

        threads = [threading.Thread(target=step1, args=(c,)) for c in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ref_replies = ref.train_round({c: (xs[1][c], ys[1][c]) for c in names})
        assert set(out) == set(names), failed
        for c in names:
            want = ref_replies[c].grad
            assert want is not None and torch.allclose(out[c], want, atol=1e-6)
        assert_identical(state_dir)
        diff, _ = max_abs_difference(b_weights(state_dir, 0), ref.server.module.state_dict())
        assert diff <= 1e-6, diff


def test_a_stalled_rank_makes_the_other_answer_503_after_the_collective_timeout(mlp_single_bundle: Path, digits,
                                                                                tmp_path: Path) -> None:
    """Rank 1 is stopped (SIGSTOP: alive, silent); rank 0's collective gives up after the timeout, not never."""
    names = CLIENTS[:4]
    timeout_s = 3.0
    x = activations(mlp_single_bundle, names)
    y = {c: torch.as_tensor(digits.y_train[i * 8:(i + 1) * 8]) for i, c in enumerate(names)}
    with ranks(mlp_single_bundle, tmp_path / "state", tmp_path, "psl", 4, "--round-timeout", "30",
               timeout_s=timeout_s) as (urls, procs), HttpLink(urls[0], names, TOKEN) as link:
        sessions = {c: (str(r.client.http.base_url).rstrip("/"), r.session_id) for c, r in link.remotes.items()}
        on_rank0 = [c for c in names if sessions[c][0] == urls[0]]
        procs[1].send_signal(signal.SIGSTOP)
        try:
            replies: dict[str, httpx.Response] = {}

            def call(c: str) -> None:
                replies[c] = train_call(*sessions[c], 0, x[c], y[c])

            t0 = time.monotonic()
            threads = [threading.Thread(target=call, args=(c,)) for c in on_rank0]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
        finally:
            procs[1].send_signal(signal.SIGCONT)
        print(f"rank 0 answered 503 replica_lost {elapsed:.2f} s after its devices called (timeout {timeout_s} s)")
        for c in on_rank0:
            assert replies[c].status_code == 503 and replies[c].json()["error"]["code"] == "replica_lost"
        assert timeout_s - 0.5 <= elapsed < timeout_s + 10, elapsed

def test_replicas_refuse_strategies_that_need_one_sequential_b(mlp_bundle: Path, tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from splitexport._cli import main

    base = ["serve", str(mlp_bundle), "--state-dir", str(tmp_path / "s"), "--port", str(free_port())]
    cases = {("--replicas", "2"): "--replicas needs a strategy with global iterations",
             ("--replicas", "2", "--strategy", "ssl", "--clients", "4"): "--replicas does not support --strategy ssl",
             ("--replicas", "2", "--strategy", "adasplit", "--clients", "4"): "--strategy adasplit",
             ("--replicas", "2", "--strategy", "psl", "--clients", "1"): "needs at least as many devices",
             ("--device", "gpu"): "is not cpu, cuda or cuda:N"}
    if not torch.cuda.is_available():
        cases[("--device", "cuda")] = "torch sees no CUDA device"
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    cases[("--strategy", "psl", "--clients", "2", "--distributed")] = "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"
    for extra, message in cases.items():
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_replica_without_devices_in_an_iteration_still_takes_its_step(mlp_single_bundle: Path, digits,
                                                                        tmp_path: Path) -> None:
    """SplitFed, 4 devices: in iteration 1 only rank 0's devices have a batch; rank 1's devices end the round at
    once (real devices act independently), so rank 1 takes part in iteration 1 with no samples of its own. The
    round end then gives every device the sample-weighted average over both replicas."""
    from splitexport.strategies import average_states

    names = CLIENTS[:4]
    state_dir = tmp_path / "state"
    ref = reference(mlp_single_bundle, "sfl", num_clients=4)
    xs = [activations(mlp_single_bundle, names, seed=s) for s in range(2)]
    ys = [{c: torch.as_tensor(digits.y_train[(s * 4 + i) * 8:(s * 4 + i + 1) * 8]) for i, c in enumerate(names)}
          for s in range(2)]
    gen = torch.Generator().manual_seed(3)
    states = {c: {"A.w": torch.randn(3, 2, generator=gen), "A.n": torch.tensor(i)} for i, c in enumerate(names)}
    counts = {c: 10 * (i + 1) for i, c in enumerate(names)}
    with ranks(mlp_single_bundle, state_dir, tmp_path, "sfl", 4, "--round-timeout", "30") as (urls, _), \
            HttpLink(urls[0], names, TOKEN) as link:
        rank_of = {c: urls.index(str(r.client.http.base_url).rstrip("/")) for c, r in link.remotes.items()}
        first, second = [c for c in names if rank_of[c] == 0], [c for c in names if rank_of[c] == 1]
        assert link.participants(0, names) == names
        link.train_round({c: (xs[0][c], ys[0][c]) for c in names})
        ref.train_round({c: (xs[0][c], ys[0][c]) for c in names})
        assert link.participants(0, first) == first  # rank 1's devices leave the round's iterations
        got: dict[str, dict[str, torch.Tensor]] = {}

        def end(c: str) -> None:
            got[c] = link.remotes[c].end_round(0, states[c], counts[c])

        early = [threading.Thread(target=end, args=(c,)) for c in second]
        for t in early:
            t.start()
        link.train_round({c: (xs[1][c], ys[1][c]) for c in first})
        ref.train_round({c: (xs[1][c], ys[1][c]) for c in first})
        late = [threading.Thread(target=end, args=(c,)) for c in first]
        for t in late:
            t.start()
        for t in early + late:
            t.join()
        assert_identical(state_dir)
        diff, _ = max_abs_difference(b_weights(state_dir, 1), ref.server.module.state_dict())
        assert diff <= 1e-6, diff
        want = average_states(states, counts)
        assert set(got) == set(names)
        for c in names:
            assert torch.allclose(got[c]["A.w"], want["A.w"], atol=1e-6)
            assert torch.equal(got[c]["A.n"].reshape(-1), want["A.n"].reshape(-1))  # the wire sends a 0-d tensor as [1]
        infos = [httpx.get(f"{u}/v1/strategy", headers=AUTH).json() for u in urls]
        assert [(i["round"], i["next_iteration"]) for i in infos] == [(1, 2), (1, 2)]


def test_a_rank_whose_peers_never_come_exits_with_one_line(mlp_bundle: Path, tmp_path: Path) -> None:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    res = subprocess.run([sys.executable, "-m", "splitexport", "serve", str(mlp_bundle), "--distributed", "--strategy",
                          "psl", "--clients", "2", "--port", str(free_port()), "--state-dir", str(tmp_path / "s"),
                          "--collective-timeout", "2"], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if "fresh start" not in ln]
    assert len(lines) == 1 and "rank 0 could not join the process group at 127.0.0.1:" in lines[0], res.stderr
