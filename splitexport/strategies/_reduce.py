"""The cross-replica parts of a strategy step, on ``torch.distributed`` (used by the replicated server).

With B replicated over ranks, each rank runs a global iteration on its own devices' batches. The
results equal one process running the iteration over every device's batch because:

* **B's gradient**: rank ``r`` computed ``g_r``, the gradient of its mean loss over its ``n_r`` samples
  (SGLR eq. 4 with ``delta_i = n_i / n_r``). The single-process gradient over all ``N = sum n_r`` samples
  is ``sum_r n_r g_r / N``: one ``all_reduce`` of ``[n_r g_r, n_r]`` (in float64), then every rank takes
  the same optimizer step on the same gradient.
* **SplitAvg** (SGLR): the iteration's clients are the concatenation of every rank's clients in rank
  order; every rank draws the same sample from the strategy's generator (same seed, same draws), and
  the mean of the sampled clients' cut gradients is one ``all_reduce`` of their local sums.
* **Round-end averages** (SplitFed): the sample-weighted sums and the sample count are all-reduced.

Every collective goes through a :class:`Collectives`; its failure (a dead or silent rank: the process
group's timeout) raises :class:`CollectiveError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ._base import DeviceState

if TYPE_CHECKING:
    from ._base import Strategy
    from ._sglr import SGLR


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank is gone (or stalled past the timeout)."""


class Collectives:
    """The collectives of one rank, each one turning any failure into :class:`CollectiveError`.

    ``device``: where B's tensors live; CPU tensors go over gloo, CUDA tensors over NCCL
    (the process group is made with ``"cpu:gloo,cuda:nccl"`` when B is on a GPU).
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, device: torch.device | str = "cpu") -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timedelta(seconds=timeout_s)
        self.device = torch.device(device)

    def _run(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            work = fn(*args, async_op=True, **kw)
            work.wait(self.timeout)
            return work
        except Exception as exc:  # gloo/NCCL raise RuntimeError or DistBackendError subclasses
            raise CollectiveError(f"{what} across {self.world_size} replicas failed: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                                  ) from exc

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        self._run("all_reduce", dist.all_reduce, t, op=op)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small picklable values), by rank; with a timeout."""
        import pickle

        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._run("all_gather (sizes)", dist.all_gather, sizes, size)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:data.numel()] = data
        out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self._run("all_gather", dist.all_gather, out, padded)
        return [pickle.loads(bytes(o[:int(s)].numpy())) for o, s in zip(out, sizes, strict=True)]

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``obj`` of rank ``src`` on every rank (a state dict at startup)."""
        import io

        if self.rank == src:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._run("broadcast (size)", dist.broadcast, size, src=src)
        if self.rank != src:
            data = torch.zeros(int(size), dtype=torch.uint8)
        self._run("broadcast", dist.broadcast, data, src=src)
        return torch.load(io.BytesIO(bytes(data.numpy())), weights_only=False)

    # -- the strategy's collectives ------------------------------------------------------------

    def reduce_gradients(self, params: Sequence[torch.Tensor], batch: int) -> None:
        """Replace each parameter's gradient (of this rank's mean loss over ``batch`` samples) by the gradient
        of the mean loss over every rank's samples: ``sum_r n_r g_r / sum_r n_r``."""
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double() * batch
                 for p in params]
        flat = torch.cat([*parts, torch.tensor([float(batch)], dtype=torch.float64, device=self.device)])
        self.all_reduce(flat)
        total = float(flat[-1])
        if total <= 0:
            raise CollectiveError("no replica had samples in this iteration")
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                p.grad = (flat[offset:offset + n] / total).reshape(p.shape).to(p.dtype)
                offset += n

    def split_avg(self, strategy: SGLR, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SGLR's SplitAvg over the iteration's clients on every rank (see ``SGLR.combine_gradients``)."""
        described = self.all_gather_object([(c, tuple(g.shape)) for c, g in local.items()])
        everyone = [(r, c, shape) for r, part in enumerate(described) for c, shape in part]
        strategy.last_broadcast = frozenset()
        if not everyone:
            return local
        shapes = [s for _, _, s in everyone]
        common = max(set(shapes), key=lambda s: (shapes.count(s), s))
        candidates = [(r, c) for r, c, s in everyone if s == common]
        k = min(len(candidates), math.floor(round(strategy.params.phi * len(everyone), 9)))
        if k < 2:
            return local
        pick = torch.randperm(len(candidates), generator=strategy._generator)[:k].tolist()
        mine = [c for r, c in (candidates[i] for i in sorted(pick)) if r == self.rank]
        total = torch.zeros(common, dtype=torch.float64)
        for c in mine:
            total += local[c].double()
        self.all_reduce(total)
        dtype = next(iter(local.values())).dtype if local else torch.float32
        mean = (total / k).to(dtype)
        strategy.last_broadcast = frozenset(mine)
        return {c: (mean if c in strategy.last_broadcast else g) for c, g in local.items()}

    def average_states(self, states: Mapping[str, Mapping[str, torch.Tensor]],
                       weights: Mapping[str, int]) -> DeviceState:
        """:func:`~._base.average_states` over every rank's clients (float: weighted mean; integer: maximum)."""
        if not states:
            raise CollectiveError("a round end with no device state on this replica")
        first = next(iter(states.values()))
        floats = [k for k, v in first.items() if v.is_floating_point()]
        ints = [k for k, v in first.items() if not v.is_floating_point()]
        sums = [sum((s[k].double().reshape(-1) * weights[c] for c, s in states.items()),
                    torch.zeros(first[k].numel(), dtype=torch.float64)) for k in floats]
        flat = torch.cat([*sums, torch.tensor([float(sum(weights[c] for c in states))], dtype=torch.float64)])
        self.all_reduce(flat)
        total = float(flat[-1])
        out: DeviceState = {}
        offset = 0
        for k in floats:
            n = first[k].numel()
            out[k] = (flat[offset:offset + n] / total).reshape(first[k].shape).to(first[k].dtype)
            offset += n
        for k in ints:
            top = torch.stack([s[k] for s in states.values()]).max(dim=0).values.to(torch.int64)
            out[k] = self.all_reduce(top, dist.ReduceOp.MAX).to(first[k].dtype)
        return {k: out[k] for k in first}

    def empty_step(self, strategy: Strategy) -> None:
        """This rank's part of an iteration in which it has no device: the same collectives with nothing of
        its own (zero gradient, no samples, no SplitAvg candidate), and the same optimizer step."""
        server = strategy.server
        if server is not None:
            params = [p for group in server.optimizer.param_groups for p in group["params"]]
            server.optimizer.zero_grad(set_to_none=True)
            for p in params:
                p.grad = torch.zeros_like(p)
            self.reduce_gradients(params, 0)
            server.optimizer.step()
            server.optimizer.zero_grad(set_to_none=True)
        strategy.combine_gradients({})
