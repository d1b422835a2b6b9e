"""Refused steps and failures under a multi-client strategy, over real HTTP: the iteration's devices get the
documented code, and B, its optimizer, the strategy's state and the step counter are exactly as before."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load, save
from torch import nn

from splitexport import OptimizerSpec, TorchSegment, load_bundle, max_abs_difference
from splitexport.protocol import ErrorCode
from splitexport.strategies import AdaSplit, Strategy, StrategyConfig, make_strategy
from tests._support import TOKEN, threaded_server
from tests._support.bundles import build_bundle

from .test_error_codes import _clone, refused, same

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ST = {**AUTH, "Content-Type": "application/vnd.safetensors"}


def _reference(bundle_path: Path, name: str, **config: Any) -> Strategy:
    """The same strategy in process around a fresh copy of the bundle's B."""
    bundle = load_bundle(bundle_path)
    m, spec = bundle.manifest, bundle.manifest.server_segments[0]
    seg = TorchSegment(bundle.torch_segment(spec.name), m.optimizer, loss=m.loss.kind, input_grad=True)
    return make_strategy(name, seg, StrategyConfig(client_lr=m.optimizer.lr, **config))


def _weights(strategy: Strategy) -> dict[str, torch.Tensor]:
    assert strategy.server is not None
    return strategy.server.module.state_dict()


def _all(calls: dict[str, tuple[str, bytes]], url: str) -> dict[str, httpx.Response]:
    """POST every ``client -> (path, body)`` at once (an iteration's barrier waits for all of them)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {c: pool.submit(httpx.post, url + p, content=b, headers=ST, timeout=60) for c, (p, b) in calls.items()}
        return {c: f.result() for c, f in futures.items()}


def _b(state: Any) -> dict[str, Any]:
    """B (weights, BatchNorm statistics), its optimizer, the strategy's state (round, sampling RNG) and counters."""
    rounds = state.rounds
    return {"module": _clone(state.segment.module.state_dict()), "optimizer": _clone(state.segment.optimizer.state_dict()),
            "strategy": _clone(rounds.strategy.state_dict()), "applied": state.applied_steps,
            "round": rounds.strategy.round}


def test_a_double_split_strategy_step_that_would_make_b_non_finite_is_refused(resnet_bundle: Path,
                                                                             tmp_path: Path) -> None:
    """SplitFed (PSL family) on the BatchNorm ResNet, two devices: in iteration 1 one device sends a finite 3e38
    gradient; both backward calls answer 422 non_finite_update and B, its BatchNorm statistics, its optimizer and
    the strategy's state are exactly as before the iteration's forward. The devices go on at iteration 2, which
    equals the in-process strategy's second step bit for bit (the refused iteration left no trace)."""
    names = ["a", "b"]
    gen = torch.Generator().manual_seed(0)
    x = {c: torch.randn(4, 16, 8, 8, generator=gen) for c in names}
    small = {c: torch.full((4, 32, 4, 4), 1e-3 * (i + 1)) for i, c in enumerate(names)}
    ref = _reference(resnet_bundle, "sfl", num_clients=2)
    with threaded_server(resnet_bundle, tmp_path / "s", strategy="sfl", num_clients=2, round_timeout_s=30) as (url,
                                                                                                             state):
        sid = {c: str(httpx.post(f"{url}/v1/sessions", headers=AUTH).json()["session_id"]) for c in names}

        def step(n: int, grads: dict[str, torch.Tensor]) -> dict[str, httpx.Response]:
            fwd = _all({c: (f"/v1/sessions/{sid[c]}/steps/{n}/forward", save({"activation": x[c].numpy()}))
                        for c in names}, url)
            assert all(r.status_code == 200 for r in fwd.values()), {c: r.text for c, r in fwd.items()}
            return _all({c: (f"/v1/sessions/{sid[c]}/steps/{n}/backward", save({"grad": grads[c].numpy()}))
                         for c in names}, url)

        assert all(r.status_code == 200 for r in step(0, small).values())
        assert state.segment.optimizer.state_dict()["state"], "B's optimizer has momentum buffers"
        before = _b(state)
        refusals = step(1, {"a": small["a"], "b": torch.full((4, 32, 4, 4), 3e38)})
        for r in refusals.values():
            assert "non-finite" in refused(r, ErrorCode.NON_FINITE_UPDATE)["message"]
        assert same(_b(state), before)
        assert all(torch.isfinite(v).all() for v in state.segment.module.state_dict().values() if v.is_floating_point())
        for c in names:  # the iteration is over for everyone; the devices continue at the next one
            assert httpx.get(f"{url}/v1/sessions/{sid[c]}", headers=AUTH).json()["next_step"] == 2
        replies = step(2, small)
        assert all(r.status_code == 200 for r in replies.values()), {c: r.text for c, r in replies.items()}
        assert state.applied_steps == 2
        for _ in range(2):
            ref.forward_round(x)
            ref_back = ref.backward_round(small)
        diff, where = max_abs_difference(state.segment.module.state_dict(), _weights(ref))
        assert diff == 0.0, (diff, where)
        for c in names:
            assert torch.equal(torch.from_numpy(load(replies[c].content)["grad"]), ref_back[c]), c


def test_a_single_split_strategy_step_that_would_make_b_non_finite_is_refused(mlp_single_bundle: Path,
                                                                             tmp_path: Path) -> None:
    """SGLR (SplitAvg on, so the step also draws from the strategy's RNG) on a single split: one device's finite
    3e38 activations overflow B; every train call of the iteration answers 422 non_finite_update, and B, the
    optimizer, the RNG and the counter are unchanged; the next iteration equals the in-process second step."""
    names = ["a", "b"]
    gen = torch.Generator().manual_seed(0)
    x = {c: torch.randn(8, 64, generator=gen) for c in names}
    y = {c: torch.randint(0, 10, (8,), generator=gen) for c in names}
    ref = _reference(mlp_single_bundle, "sglr", num_clients=2, alpha=0.5, phi=1.0)
    with threaded_server(mlp_single_bundle, tmp_path / "s", strategy="sglr", num_clients=2, alpha=0.5, phi=1.0,
                         round_timeout_s=30) as (url, state):
        sid = {c: str(httpx.post(f"{url}/v1/sessions", headers=AUTH).json()["session_id"]) for c in names}

        def step(n: int, xs: dict[str, torch.Tensor]) -> dict[str, httpx.Response]:
            return _all({c: (f"/v1/sessions/{sid[c]}/steps/{n}/train",
                             save({"activation": xs[c].numpy(), "labels": y[c].numpy()})) for c in names}, url)

        assert all(r.status_code == 200 for r in step(0, x).values())
        before = _b(state)
        for r in step(1, {"a": x["a"], "b": torch.full((8, 64), 3e38)}).values():
            refused(r, ErrorCode.NON_FINITE_UPDATE)
        assert same(_b(state), before)
        replies = step(2, x)
        assert all(r.status_code == 200 for r in replies.values()), {c: r.text for c, r in replies.items()}
        for _ in range(2):
            ref_replies = ref.train_round({c: (x[c], y[c]) for c in names})
        diff, where = max_abs_difference(state.segment.module.state_dict(), _weights(ref))
        assert diff == 0.0, (diff, where)
        for c in names:
            grad = ref_replies[c].grad
            assert grad is not None and torch.equal(torch.from_numpy(load(replies[c].content)["grad"]), grad), c
        assert "shared" in load(replies["a"].content)  # SplitAvg ran in the accepted steps


def test_a_failing_round_end_is_strategy_failed_and_can_be_ended_again(mlp_bundle: Path, tmp_path: Path) -> None:
    """SplitFed's round average is weighted by the devices' ``num_samples``; when every device of the round
    reports 0 the strategy's ``end_round`` fails (a division by zero): every device of that round end gets 500
    strategy_failed, the round is not over (B, the round and the counters as before), and the devices end it
    again with their real counts."""
    names = ["a", "b"]
    dev = {c: {"A.w": np.full((3,), float(i + 1), np.float32)} for i, c in enumerate(names)}
    with threaded_server(mlp_bundle, tmp_path / "s", strategy="sfl", num_clients=2, round_timeout_s=30) as (url,
                                                                                                           state):
        sid = {c: str(httpx.post(f"{url}/v1/sessions", headers=AUTH).json()["session_id"]) for c in names}
        before = _b(state)

        def end(counts: dict[str, int]) -> dict[str, httpx.Response]:
            return _all({c: (f"/v1/sessions/{sid[c]}/rounds/0/end?num_samples={counts[c]}", save(dev[c]))
                         for c in names}, url)

        for r in end({"a": 0, "b": 0}).values():
            error = refused(r, ErrorCode.STRATEGY_FAILED)
            assert "ZeroDivisionError" in error["message"]
        assert same(_b(state), before)
        assert httpx.get(f"{url}/v1/strategy", headers=AUTH).json()["round"] == 0
        replies = end({"a": 1, "b": 3})
        assert all(r.status_code == 200 for r in replies.values()), {c: r.text for c, r in replies.items()}
        for r in replies.values():
            np.testing.assert_array_equal(load(r.content)["A.w"], np.full((3,), 1.75, np.float32))
        assert httpx.get(f"{url}/v1/strategy", headers=AUTH).json()["round"] == 1


def test_a_strategy_step_above_max_grad_norm_is_refused(mlp_single_bundle: Path, tmp_path: Path) -> None:
    """``max_grad_norm`` holds under a strategy too: a PSL iteration whose gradient norm is above it answers 422
    gradient_too_large to each of its devices and changes nothing; the limit names itself in the message."""
    names = ["a", "b"]
    gen = torch.Generator().manual_seed(0)
    x = {c: torch.randn(8, 64, generator=gen) for c in names}
    y = {c: torch.randint(0, 10, (8,), generator=gen) for c in names}
    with threaded_server(mlp_single_bundle, tmp_path / "s", strategy="psl", num_clients=2, max_grad_norm=1e-6,
                         round_timeout_s=30) as (url, state):
        sid = {c: str(httpx.post(f"{url}/v1/sessions", headers=AUTH).json()["session_id"]) for c in names}
        before = _b(state)
        replies = _all({c: (f"/v1/sessions/{sid[c]}/steps/0/train",
                            save({"activation": x[c].numpy(), "labels": y[c].numpy()})) for c in names}, url)
        for r in replies.values():
            assert "max_grad_norm=1e-06" in refused(r, ErrorCode.GRADIENT_TOO_LARGE)["message"]
        assert same(_b(state), before)


class _LargeWeights(nn.Module):
    """A 4 -> 4 -> 3 MLP whose last layer (B, after the cut at ``relu1``) has weights of magnitude 8: above the
    masks' initial 1, so a client's mask gets a gradient 8 times B's (AdaSplit: ``W * g`` against ``m * g``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu1, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)
        with torch.no_grad():
            self.fc2.weight.copy_(8 * torch.tensor([[1.0, -1, 1, -1], [-1, 1, -1, 1], [1, 1, -1, -1]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu1(self.fc1(x)))


@pytest.fixture(scope="module")
def large_weights_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:class:`_LargeWeights` cut at ``relu1`` (A | B), trained with Adam."""
    return build_bundle(tmp_path_factory.mktemp("b") / "large", _LargeWeights, ["relu1"],
                        OptimizerSpec(name="adam", lr=0.01), sample_shape=(4,)).path


ADASPLIT: dict[str, Any] = {"num_clients": 2, "eta": 1.0, "kappa": 0.0}
"""Both clients in every iteration, from the first round."""


def _adasplit_batches() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = {c: torch.rand(8, 4, generator=gen) for c in "ab"}
    return x, {c: torch.randint(0, 3, (8,), generator=gen) for c in "ab"}


def test_an_adasplit_step_that_would_make_a_clients_mask_non_finite_is_refused(large_weights_bundle: Path,
                                                                              tmp_path: Path) -> None:
    """AdaSplit trains a mask per client beside B, in the same step. Adam, both clients in every iteration: in
    iteration 1 device b's finite activations of 1e21 keep B finite but overflow its mask's Adam state
    (``exp_avg_sq`` of gradients 8 times B's); b gets 422 non_finite_update naming its mask, and B, its optimizer,
    every mask and mask optimizer, the UCB orchestrator (statistics and RNG) and the counters are exactly as
    before; a retry of step 1 is 409 wrong_step, and a's step of iteration 1 is served. b continues at iteration 2,
    where 1e22 overflows B itself: refused the same way, after a's step (the refusal closes the iteration). Iteration 3's replies, B and the masks equal the
    in-process strategy's, which never saw b's two steps."""
    names = ["a", "b"]
    x, y = _adasplit_batches()
    ref = _reference(large_weights_bundle, "adasplit", **ADASPLIT)
    assert isinstance(ref, AdaSplit)
    with threaded_server(large_weights_bundle, tmp_path / "s", strategy="adasplit", round_timeout_s=30,
                         **ADASPLIT) as (url, state):
        sid = {c: str(httpx.post(f"{url}/v1/sessions", headers=AUTH).json()["session_id"]) for c in names}

        def train(c: str, n: int, xs: torch.Tensor) -> httpx.Response:
            body = save({"activation": xs.numpy(), "labels": y[c].numpy()})
            return httpx.post(f"{url}/v1/sessions/{sid[c]}/steps/{n}/train", content=body, headers=ST, timeout=60)

        def refused_b(n: int, scale: float, what: str) -> None:
            before = _b(state)
            error = refused(train("b", n, x["b"] * scale), ErrorCode.NON_FINITE_UPDATE)
            assert f"optimizer state 'exp_avg_sq' of parameter 0 of {what} non-finite" in error["message"], error
            assert same(_b(state), before)
            assert httpx.get(f"{url}/v1/sessions/{sid['b']}", headers=AUTH).json()["next_step"] == n + 1
            again = train("b", n, x["b"])
            assert again.status_code == 409 and again.json()["error"]["code"] == "wrong_step", again.text

        for c in names:
            assert train(c, 0, x[c]).status_code == 200
        opened = httpx.get(f"{url}/v1/sessions/{sid['b']}/steps/1", headers=AUTH)  # the orchestrator's selection
        assert opened.status_code == 200 and opened.json()["open"], opened.text
        refused_b(1, 1e21, f"the mask of client {sid['b']!r}")  # iteration 1 stays open for a
        assert train("a", 1, x["a"]).status_code == 200
        assert state.rounds is not None and isinstance(state.rounds.strategy, AdaSplit)
        masks = state.rounds.strategy.masks
        assert all(torch.isfinite(t).all() for c in masks.optimizers for st in masks.optimizers[c].state.values()
                   for t in st.values())
        assert train("a", 2, x["a"]).status_code == 200
        refused_b(2, 1e22, "B")  # the last of iteration 2: the refusal closes it
        assert httpx.get(f"{url}/v1/strategy", headers=AUTH).json()["next_iteration"] == 3
        replies = {c: train(c, 3, x[c]) for c in names}
        assert all(r.status_code == 200 for r in replies.values()), {c: r.text for c, r in replies.items()}
        assert state.applied_steps == 6
        for n, steps in enumerate([names, ["a"], ["a"], names]):
            assert ref.participants(0, names) == names, n
            ref_replies = {c: ref.train_round({c: (x[c], y[c])})[c] for c in steps}
        diff, where = max_abs_difference(state.segment.module.state_dict(), _weights(ref))
        assert diff == 0.0, (diff, where)
        assert same(_clone(masks.state_dict()["masks"]),
                    _clone({sid[c]: ref.masks.state_dict()["masks"][c] for c in names}))
        for c in names:
            got, output = load(replies[c].content), ref_replies[c].output
            assert output is not None and torch.equal(torch.from_numpy(got["output"]), output), c
            assert float(got["loss"][0]) == np.float32(ref_replies[c].loss), c


def test_an_adasplit_mask_gradient_above_max_grad_norm_is_refused(large_weights_bundle: Path,
                                                                  tmp_path: Path) -> None:
    """``max_grad_norm`` bounds the gradient of the client's mask as well as B's: with the limit between the
    norms of B's gradient and the mask's (measured on the in-process strategy's first step), the first step is
    422 gradient_too_large naming the mask, and nothing changed (B, optimizers, masks, UCB state, counters)."""
    x, y = _adasplit_batches()
    ref = _reference(large_weights_bundle, "adasplit", **ADASPLIT)
    assert isinstance(ref, AdaSplit) and ref.server is not None
    ref.participants(0, ["a"])
    ref.train_round({"a": (x["a"], y["a"])})  # the step leaves its gradients on B and the mask

    def norm(params: Any) -> float:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.double())
                                                            for p in params])))

    b_norm, mask_norm = norm(ref.server.module.parameters()), norm(ref.masks.masks["a"].values())
    assert mask_norm > 2 * b_norm, (b_norm, mask_norm)
    limit = (b_norm * mask_norm) ** 0.5
    with threaded_server(large_weights_bundle, tmp_path / "s", strategy="adasplit", round_timeout_s=30,
                         max_grad_norm=limit, **ADASPLIT) as (url, state):
        sid = [str(httpx.post(f"{url}/v1/sessions", headers=AUTH).json()["session_id"]) for _ in "ab"]
        opened = httpx.get(f"{url}/v1/sessions/{sid[0]}/steps/0", headers=AUTH)  # the orchestrator's selection
        assert opened.status_code == 200 and opened.json()["participate"], opened.text
        before = _b(state)
        r = httpx.post(f"{url}/v1/sessions/{sid[0]}/steps/0/train", headers=ST,
                       content=save({"activation": x["a"].numpy(), "labels": y["a"].numpy()}))
        message = refused(r, ErrorCode.GRADIENT_TOO_LARGE)["message"]
        assert f"the parameters of the mask of client {sid[0]!r} is" in message and f"{limit:g}" in message
        assert same(_b(state), before)
