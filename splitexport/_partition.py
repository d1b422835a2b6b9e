"""Graph splitting: trace a model, find valid cut points, cut it into segments.

A cut "after X" (X a name from ``named_modules()``) is placed after the last
graph node that runs inside X. It is valid only where exactly one tensor
crosses it; a skip connection over the cut, the model input used after the
cut, or a module whose weights are used on both sides make it invalid.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from ._errors import InvalidCutError, PartitionError, UnknownLayerError, UntraceableModelError

Role = Literal["device", "server"]
SplitKind = Literal["single", "double", "multi"]
_COMPUTE_OPS = ("call_module", "call_function", "call_method")
INPUT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
"""Model input dtypes (``--input-dtype``): float32, or int64/int32 token ids for a model that embeds them."""


def example_input(shape: Sequence[int], dtype: str = "float32") -> torch.Tensor:
    """An example model input: zeros of ``dtype`` (a valid token id for integer inputs)."""
    if dtype not in INPUT_DTYPES:
        raise PartitionError(f"unknown input dtype {dtype!r}; use one of {', '.join(INPUT_DTYPES)}")
    return torch.zeros(tuple(shape), dtype=INPUT_DTYPES[dtype])


@dataclass(frozen=True)
class CutPoint:
    """A valid cut after ``name``, with what crosses it and the cost on each side."""

    name: str
    output_shape: tuple[int, ...]
    dtype: torch.dtype
    bytes_per_sample: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass
class Segment:
    """One piece of a partitioned model: a GraphModule with one tensor in and one out."""

    name: str
    role: Role
    module: fx.GraphModule
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: torch.dtype
    """The output's dtype."""
    is_last: bool
    modules: tuple[str, ...] = field(default_factory=tuple)
    """Top-level module paths that run in this segment, in forward order."""
    input_dtype: torch.dtype = torch.float32
    """The input's dtype (int64/int32 for a first segment that embeds token ids)."""

    @property
    def trains_with(self) -> Literal["labels", "gradient"]:
        """The last segment trains on labels; every other on a gradient from downstream."""
        return "labels" if self.is_last else "gradient"

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


@dataclass
class Partition:
    """The segments of a model cut at ``cuts``, in forward order."""

    segments: list[Segment]
    cuts: tuple[str, ...]

    @property
    def split(self) -> SplitKind:
        return {1: "single", 2: "double"}.get(len(self.cuts), "multi")  # type: ignore[return-value]

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(f"no segment {name!r}; segments are {[s.name for s in self.segments]}")


def segment_names(num_cuts: int) -> list[str]:
    """``A, B`` for one cut, ``A, B, C`` for two, ``S0 .. Sn`` beyond."""
    if num_cuts == 1:
        return ["A", "B"]
    if num_cuts == 2:
        return ["A", "B", "C"]
    return [f"S{i}" for i in range(num_cuts + 1)]


def segment_roles(num_cuts: int) -> list[Role]:
    """Single split: A on the device, B (with labels) on the server. Otherwise the
    first and last segments stay on the device and the middle ones run on the server."""
    if num_cuts == 1:
        return ["device", "server"]
    middle: list[Role] = ["server"] * (num_cuts - 1)
    return ["device", *middle, "device"]


class _TracedModel:
    """A traced model with per-node module paths, shapes, parameter counts and FLOPs."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self.gm = _trace(model)
        self.example_input = example_input
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise PartitionError(
                f"the model's forward takes {len(placeholders)} inputs; splitexport needs exactly one tensor input"
            )
        self.input_node = placeholders[0]
        self.output_node = next(n for n in graph.nodes if n.op == "output")
        self.compute = [n for n in graph.nodes if n.op in _COMPUTE_OPS]
        self.index = {n: i for i, n in enumerate(self.compute)}
        self.paths = {n: _module_paths(n) for n in self.compute}
        self._propagate(example_input)

    def _propagate(self, example_input: torch.Tensor) -> None:
        """Shapes and per-node FLOPs from one forward pass on a copy (BN stats untouched)."""
        probe = copy.deepcopy(self.gm)
        flops: dict[str, int] = {}

        current: list[fx.Node] = []

        class _Counting(ShapeProp):
            def run_node(self, n: fx.Node) -> Any:
                current[:] = [n]
                with FlopCounterMode(display=False) as counter:
                    result = super().run_node(n)
                flops[n.name] = counter.get_total_flops()
                return result

        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # fx prints a traceback on failure
                _Counting(probe).propagate(example_input)
        except Exception as exc:
            inner: BaseException = exc
            while inner.__cause__ is not None or inner.__context__ is not None:  # ShapeProp wraps the real error
                inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
            lines = [ln for ln in str(inner).splitlines() if ln.strip() and not ln.startswith(" ")]
            first = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else type(inner).__name__)
            dtype = str(example_input.dtype).removeprefix("torch.")
            hint = " (token ids for an Embedding need --input-dtype int64)" if "indices" in first else ""
            where = f" at {current[0].target}" if current and current[0].op == "call_module" else ""
            raise PartitionError(
                f"running the model on an input of shape {tuple(example_input.shape)} and dtype {dtype} failed{where}: "
                f"{first}. Check --input-shape and --input-dtype{hint}."
            ) from exc
        meta = {pn.name: pn.meta.get("tensor_meta") for pn in probe.graph.nodes}
        self.tensor_meta = {n: meta.get(n.name) for n in self.gm.graph.nodes}
        self.flops = [flops.get(n.name, 0) for n in self.compute]
        params = []
        seen: set[int] = set()
        for n in self.compute:
            count = 0
            if n.op == "call_module":
                for p in self.gm.get_submodule(str(n.target)).parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        count += p.numel()
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    t = _fetch_attr(self.gm, str(a.target))
                    if isinstance(t, nn.Parameter) and id(t) not in seen:
                        seen.add(id(t))
                        count += t.numel()
            params.append(count)
        self.params = params

    def module_names(self) -> list[str]:
        """Module paths that run in the forward, in order of first use."""
        seen: dict[str, None] = {}
        for n in self.compute:
            for p in self.paths[n]:
                seen.setdefault(p, None)
        return list(seen)

    def position(self, name: str) -> int:
        """Index of the last compute node that runs inside module ``name``."""
        idx = [self.index[n] for n in self.compute if name in self.paths[n]]
        if not idx:
            raise self.unknown(name)
        return max(idx)

    def unknown(self, name: str) -> UnknownLayerError:
        names = self.module_names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return UnknownLayerError(
            f"no layer named {name!r} runs in the model's forward.{hint} "
            f"Run `splitexport inspect` to list the valid cut points."
        )

    def segment_of(self, positions: Sequence[int], node: fx.Node) -> int:
        """Which segment (0..len(positions)) a compute node falls in."""
        i = self.index[node]
        return sum(1 for p in positions if i > p)

    def crossing(self, position: int) -> list[tuple[fx.Node, fx.Node]]:
        """(producer, consumer) edges from nodes at or before ``position`` to nodes after it."""
        edges = []
        for n in self.compute[: position + 1]:
            for user in n.users:
                if user.op == "output" or self.index.get(user, -1) > position:
                    edges.append((n, user))
        for user in self.input_node.users:
            if user.op == "output" or self.index.get(user, -1) > position:
                edges.append((self.input_node, user))
        return edges

    def check_cut(self, name: str, position: int) -> fx.Node:
        """The single tensor crossing a cut after ``name``; raises if the cut is invalid."""
        if position >= len(self.compute) - 1:
            raise InvalidCutError(f"cut after {name!r} leaves nothing after it: {name!r} is the model's last layer")
        edges = self.crossing(position)
        producers = list(dict.fromkeys(p for p, _ in edges))
        if len(producers) != 1:
            shown = "; ".join(
                f"{_describe(self, p)} -> {_describe(self, u)}" for p, u in edges if p is not producers[-1]
            )
            raise InvalidCutError(
                f"cannot cut after {name!r}: {len(producers)} tensors cross the cut, exactly one may. "
                f"Edges over the cut besides the main one: {shown}. "
                f"Nearest valid cuts: {', '.join(repr(c) for c in self.nearest_valid(position)) or 'none'}."
            )
        tm = self.tensor_meta.get(producers[0])
        if tm is None or not hasattr(tm, "shape"):
            raise InvalidCutError(f"cannot cut after {name!r}: the value crossing it is not a single tensor")
        owners = self.shared_owners([position])
        if owners:
            raise InvalidCutError(
                f"cannot cut after {name!r}: module(s) {', '.join(sorted(owners))} would run on both sides "
                "(their weights would be split between segments)"
            )
        return producers[0]

    def shared_owners(self, positions: Sequence[int]) -> set[str]:
        """Modules / attributes with state used by nodes in more than one segment."""
        where: dict[str, set[int]] = {}
        for n in self.compute:
            seg = self.segment_of(positions, n)
            owners = [str(n.target)] if n.op == "call_module" else []
            owners += [str(a.target) for a in n.all_input_nodes if a.op == "get_attr"]
            for owner in owners:
                where.setdefault(owner, set()).add(seg)
        return {o for o, segs in where.items() if len(segs) > 1}

    def is_valid(self, name: str) -> bool:
        try:
            self.check_cut(name, self.position(name))
        except PartitionError:
            return False
        return True

    def nearest_valid(self, position: int) -> list[str]:
        """The closest valid cut before and after ``position``."""
        before: tuple[int, str] | None = None
        after: tuple[int, str] | None = None
        for name in self.module_names():
            p = self.position(name)
            if p == position or not self._valid_at(p):
                continue
            if p < position and (before is None or p > before[0]):
                before = (p, name)
            if p > position and (after is None or p < after[0]):
                after = (p, name)
        return [c[1] for c in (before, after) if c is not None]

    def _valid_at(self, position: int) -> bool:
        if position >= len(self.compute) - 1:
            return False
        producers = {p for p, _ in self.crossing(position)}
        return len(producers) == 1 and not self.shared_owners([position])


def _trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        for n in list(gm.graph.nodes):  # torch.export's runtime guard call has no users
            if n.op == "call_module" and str(n.target).startswith("_guards_fn") and not n.users:
                gm.graph.erase_node(n)
        gm.recompile()
        return gm
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        raise UntraceableModelError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Models with data-dependent control flow cannot be split; make the forward a static graph "
            "(or wrap the dynamic part in a module that stays whole inside one segment)."
        ) from exc


def _module_paths(node: fx.Node) -> tuple[str, ...]:
    """Every module path (outermost first) that ``node`` runs inside."""
    stack = node.meta.get("nn_module_stack") or {}
    paths: list[str] = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else str(key)
        if path:
            paths.append(path)
    if node.op == "call_module":
        target = str(node.target)
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in paths:
                paths.append(prefix)
    return tuple(paths)


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _describe(traced: _TracedModel, node: fx.Node) -> str:
    if node.op == "output":
        return "the model output"
    if node.op == "placeholder":
        return "the model input"
    paths = traced.paths.get(node) or ()
    where = f" (in {paths[-1]})" if paths else ""
    return f"{node.name!r}{where}"


def list_cut_points(model: nn.Module, example_input: torch.Tensor) -> list[CutPoint]:
    """Every valid cut point of ``model`` with its output shape, bytes per sample, params and FLOPs."""
    traced = _TracedModel(model, example_input)
    total_params = sum(traced.params)
    total_flops = sum(traced.flops)
    batch = max(int(example_input.shape[0]), 1)
    points = []
    for name in traced.module_names():
        if not traced.is_valid(name):
            continue
        pos = traced.position(name)
        producer = traced.check_cut(name, pos)
        tm = traced.tensor_meta[producer]
        assert tm is not None
        shape = tuple(int(s) for s in tm.shape)
        dtype = tm.dtype
        per_sample = (torch.Size(shape).numel() // batch) * torch.empty((), dtype=dtype).element_size()
        params_before = sum(traced.params[: pos + 1])
        flops_before = sum(traced.flops[: pos + 1]) // batch
        points.append(
            CutPoint(
                name=name,
                output_shape=shape,
                dtype=dtype,
                bytes_per_sample=per_sample,
                params_before=params_before,
                params_after=total_params - params_before,
                flops_before=flops_before,
                flops_after=total_flops // batch - flops_before,
            )
        )
    return points


def partition(model: nn.Module, cuts: Sequence[str], example_input: torch.Tensor) -> Partition:
    """Cut ``model`` after each named layer in ``cuts`` (in forward order).

    One cut gives A | B (single split), two give A | B | C (U-shaped), more give
    S0 | ... | Sn. The segments are independent copies: the model is not changed.
    """
    if not cuts:
        raise PartitionError("give at least one cut (a layer name from `splitexport inspect`)")
    traced = _TracedModel(model, example_input)
    positions = [traced.position(name) for name in cuts]
    for (n1, p1), (n2, p2) in zip(zip(cuts, positions), zip(cuts[1:], positions[1:])):
        if p2 == p1:
            raise InvalidCutError(f"cuts {n1!r} and {n2!r} are at the same place; they would make an empty segment")
        if p2 < p1:
            raise InvalidCutError(
                f"cuts out of order: {n2!r} comes before {n1!r} in the model's forward; "
                f"give the cuts in forward order ({n2!r} first)"
            )
    boundary = [traced.check_cut(name, pos) for name, pos in zip(cuts, positions)]
    owners = traced.shared_owners(positions)
    if owners:
        raise InvalidCutError(f"modules {', '.join(sorted(owners))} would run in more than one segment")

    out_arg = traced.output_node.args[0]
    if isinstance(out_arg, (tuple, list)) and len(out_arg) == 1:  # torch.export returns a 1-tuple
        out_arg = out_arg[0]
    if not isinstance(out_arg, fx.Node) or not hasattr(traced.tensor_meta.get(out_arg), "shape"):
        raise PartitionError("the model must return a single tensor (e.g. logits)")

    root = copy.deepcopy(traced.gm)
    names = segment_names(len(cuts))
    roles = segment_roles(len(cuts))
    segments = []
    inputs: list[fx.Node] = [traced.input_node, *boundary]
    outputs: list[fx.Node] = [*boundary, out_arg]
    for k, (seg_name, role) in enumerate(zip(names, roles)):
        nodes = [n for n in traced.compute if traced.segment_of(positions, n) == k]
        gm = _build_segment(root, nodes, inputs[k], outputs[k])
        in_meta = traced.tensor_meta[inputs[k]]
        out_meta = traced.tensor_meta[outputs[k]]
        assert in_meta is not None and out_meta is not None
        top = list(dict.fromkeys(traced.paths[n][0] for n in nodes if traced.paths[n]))
        segments.append(
            Segment(
                name=seg_name,
                role=role,
                module=gm,
                input_shape=tuple(int(s) for s in in_meta.shape),
                output_shape=tuple(int(s) for s in out_meta.shape),
                dtype=out_meta.dtype,
                is_last=k == len(names) - 1,
                modules=tuple(top),
                input_dtype=in_meta.dtype,
            )
        )
    return Partition(segments=segments, cuts=tuple(cuts))


def _build_segment(root: fx.GraphModule, nodes: list[fx.Node], inp: fx.Node, out: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {inp: graph.placeholder("input")}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise PartitionError(f"internal error: {n.name} used before it is defined in a segment")
            env[n] = graph.get_attr(str(n.target))
        return env[n]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[out])
    for n in graph.nodes:
        n.type = None  # fx's annotations (e.g. `_torch_Tensor_`) break torch.jit.script
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm
