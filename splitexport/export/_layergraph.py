"""A torch segment as a small layer graph: the common IR of the Keras, TF.js and TFLite exports.

Reads a segment given as a ``torch.fx.GraphModule`` (what :func:`splitexport.partition`
returns) or as the TorchScript module a bundle stores (first rebuilt as fx by
:func:`splitexport._loading.torchscript_to_fx`, so one reader keys every graph by the
op table), checks every layer against the supported set, and records each layer with its weights already in TensorFlow
layout. Inside the graph image tensors are NHWC; the segment's boundary stays NCHW
(the exporters transpose at entry and exit). Anything outside the supported set is
an :class:`~splitexport._errors.ExportError` naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import torch
from torch import fx, nn

from .._errors import ExportError
from .ops import REGISTRY

__all__ = [
    "SUPPORTED_LAYERS",
    "Layer",
    "LayerGraph",
    "layer_graph",
    "segment_exporter",
    "tf_to_torch_layout",
    "torch_to_tf_layout",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")

SUPPORTED_LAYERS = tuple(
    f"{op.name} ({op.restrictions})" if op.restrictions else op.name
    for op in REGISTRY.ops
    if op.tfjs.status != "refused"
)
"""What :func:`layer_graph` accepts (from the op table); everything else is an export-time error."""


@dataclass
class Layer:
    """One layer of the graph, with its weights in TensorFlow layout.

    ``kind`` is ``input`` or a kind of the op table (``ops.REGISTRY.kinds``). ``shape`` is the
    output shape without the batch dimension in the internal layout (HWC for
    images). ``weights`` are keyed by the Keras weight names (``kernel``, ``bias``,
    ``depthwise_kernel``, ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``);
    ``torch_names`` maps the same keys to the segment's state-dict keys.
    """

    name: str
    kind: str
    inputs: list[str]
    shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    torch_names: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def trainable(self) -> list[str]:
        """Weight keys updated by the optimizer (not BN moving statistics or dropout seeds)."""
        return [k for k in self.weights if not k.startswith("moving_") and k != "seed"]


@dataclass
class LayerGraph:
    """Layers in topological order; ``layers[0]`` is the input, ``output`` names the result."""

    layers: list[Layer]
    output: str
    input_shape: tuple[int, ...]
    """Per-sample input shape in torch layout (C, H, W) or (F,)."""
    output_shape: tuple[int, ...]
    """Per-sample output shape in torch layout."""

    def layer(self, name: str) -> Layer:
        for lyr in self.layers:
            if lyr.name == name:
                return lyr
        raise KeyError(name)

    def weight_names(self) -> list[str]:
        """``layer/key`` for every weight, in layer order (Keras / TF.js variable names)."""
        return [f"{lyr.name}/{k}" for lyr in self.layers for k in lyr.weights]

    def weights(self) -> dict[str, np.ndarray]:
        """Every weight in TensorFlow layout keyed by ``layer/key``."""
        return {f"{lyr.name}/{k}": v for lyr in self.layers for k, v in lyr.weights.items()}

    def users(self, name: str) -> list[str]:
        return [lyr.name for lyr in self.layers if name in lyr.inputs]

    def to_torch_state(self, tf_weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Convert ``layer/key`` weights in TensorFlow layout back to the segment's state-dict keys."""
        state: dict[str, torch.Tensor] = {}
        for lyr in self.layers:
            for key, tname in lyr.torch_names.items():
                value = np.asarray(tf_weights[f"{lyr.name}/{key}"], dtype=np.float32)
                state[tname] = torch.from_numpy(np.ascontiguousarray(_to_torch_layout(lyr, key, value)))
        return state

    def torch_name_map(self) -> dict[str, list[str]]:
        """``layer/key`` -> [torch state-dict key, layout transform] (see :func:`tf_to_torch_layout`)."""
        out: dict[str, list[str]] = {}
        for lyr in self.layers:
            for key, tname in lyr.torch_names.items():
                out[f"{lyr.name}/{key}"] = [tname, layout_of(lyr, key)]
        return out


def torch_to_tf_layout(value: np.ndarray, transform: str) -> np.ndarray:
    """The export's layout of a torch weight (inverse of :func:`tf_to_torch_layout`)."""
    if transform.startswith(("conv2d1d", "depthwise2d1d")):  # Conv1d weights (co, ci, k) as height-1 kernels
        return torch_to_tf_layout(value[:, :, None, :], transform.replace("1d", "", 1))
    if transform == "conv2d":
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if transform.startswith("depthwise2d"):
        m = int(transform.partition(":")[2] or 1)
        cm, _, kh, kw = value.shape
        return np.ascontiguousarray(value.reshape(cm // m, m, kh, kw).transpose(2, 3, 0, 1))
    if transform == "linear":
        return np.ascontiguousarray(value.T)
    if transform == "identity":
        return value
    raise ValueError(f"unknown layout transform {transform!r}")


def tf_to_torch_layout(value: np.ndarray, transform: str) -> np.ndarray:
    """Undo the weight layout change of the export: ``transform`` is conv2d, depthwise2d[:m], linear or identity
    (``conv2d1d`` / ``depthwise2d1d[:m]``: a Conv1d weight stored as a height-1 kernel)."""
    if transform.startswith(("conv2d1d", "depthwise2d1d")):
        return tf_to_torch_layout(value, transform.replace("1d", "", 1))[:, :, 0, :]
    if transform == "conv2d":
        return value.transpose(3, 2, 0, 1)
    if transform.startswith("depthwise2d"):
        kh, kw, c, m = value.shape
        return value.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw)
    if transform == "linear":
        return value.T
    if transform == "identity":
        return value
    raise ValueError(f"unknown layout transform {transform!r}")


def layout_of(lyr: Layer, key: str) -> str:
    """The layout transform of weight ``key`` of ``lyr`` (from its kind in the op table)."""
    return REGISTRY.kind(lyr.kind).layout(lyr, key)


def _to_torch_layout(lyr: Layer, key: str, w: np.ndarray) -> np.ndarray:
    return tf_to_torch_layout(w, layout_of(lyr, key))


# --------------------------------------------------------------------------- reading torch graphs


@dataclass
class _Node:
    """A torch graph node reduced to what the mapper needs."""

    name: str
    op: str  # "module" or a canonical function name
    args: list[Any]
    kwargs: dict[str, Any]
    module: Any = None  # nn.Module or RecursiveScriptModule for op == "module"
    path: str = ""

    def describe(self) -> str:
        if self.op == "module":
            return f"layer {self.path!r} ({_module_type(self.module)})"
        return f"node {self.name!r} ({self.op})"


class _Ref(str):
    """A reference to another node's output (distinct from string constants)."""


def _module_type(m: Any) -> str:
    if isinstance(m, torch.jit.ScriptModule):
        return str(m.original_name)
    return type(m).__name__


_WAY_OUT = "cut so that it runs on the server"


def _fx_nodes(gm: fx.GraphModule) -> tuple[str, list[_Node], str]:
    """The nodes of an fx graph keyed by the op table: modules by class, functions and tensor methods by
    their torch forms, ``torch.ops.aten`` calls (a TorchScript segment read by ``torchscript_to_fx``)
    by their aten op."""

    def conv(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return _Ref(a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        return a

    inp = ""
    out = ""
    nodes: list[_Node] = []
    for n in gm.graph.nodes:
        args = [conv(a) for a in n.args]
        kwargs = {k: conv(v) for k, v in n.kwargs.items()}
        if n.op == "placeholder":
            if inp:
                raise ExportError("the segment takes more than one input; exports need exactly one tensor input")
            inp = n.name
        elif n.op == "output":
            res = n.args[0]
            if not isinstance(res, fx.Node):
                raise ExportError("the segment must return a single tensor")
            out = res.name
        elif n.op == "get_attr":  # a parameter used as a tensor (e.g. a positional table)
            nodes.append(_Node(n.name, "param", [], {}, path=str(n.target)))
        elif n.op == "call_module":
            nodes.append(_Node(n.name, "module", args, kwargs, gm.get_submodule(str(n.target)), str(n.target)))
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            spec = REGISTRY.for_aten(n.target)
            if spec is None:
                raise ExportError(f"node {n.name!r} calls {n.target}, which has no export mapping; {_WAY_OUT}")
            nodes.append(_Node(n.name, spec.fn, *_aten_arguments(n.target, spec.aten_args, args, kwargs)))
        elif n.op == "call_function":
            spec = REGISTRY.for_function(n.target)
            if spec is None:
                name = getattr(n.target, "__name__", n.target)
                raise ExportError(f"node {n.name!r} calls {name}, which has no export mapping; {_WAY_OUT}")
            nodes.append(_Node(n.name, spec.fn, args, kwargs))
        elif n.op == "call_method":
            spec = REGISTRY.for_method(str(n.target))
            if spec is None:
                raise ExportError(
                    f"node {n.name!r} calls the tensor method .{n.target}(), which has no export mapping; {_WAY_OUT}"
                )
            nodes.append(_Node(n.name, spec.fn, args, kwargs))
        else:
            raise ExportError(
                f"node {n.name!r} ({n.op} {n.target}) has no export mapping (parameters used outside a layer?)"
            )
    return inp, nodes, out


def _aten_arguments(op: torch._ops.OpOverload, names: Sequence[str], args: list[Any],
                    kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """An aten call's arguments as the op's builder reads them: the tensor first, the others by the op table's
    ``aten_args`` names (given in the schema's order; arguments past them are not read)."""
    named: dict[str, Any] = {}
    for i, (arg, name) in enumerate(zip(op._schema.arguments, names)):
        if i < len(args):
            named[name] = args[i]
        elif arg.name in kwargs:
            named[name] = kwargs[arg.name]
    return [named.pop(names[0])], named


def _script_as_fx(sm: torch.jit.ScriptModule) -> fx.GraphModule:
    """A TorchScript segment (what a bundle stores) as the fx graph the partitioner reads it as."""
    from .._errors import UntraceableModelError
    from .._loading import torchscript_to_fx

    try:
        return torchscript_to_fx(sm, way_out=_WAY_OUT)
    except UntraceableModelError as exc:
        raise ExportError(str(exc)) from None


# --------------------------------------------------------------------------- building the IR


def layer_graph(module: nn.Module, input_shape: Sequence[int], dtype: str = "float32") -> LayerGraph:
    """Map a segment (fx GraphModule or TorchScript module) to a :class:`LayerGraph`.

    ``input_shape`` is the segment's input shape in torch layout with the batch dimension:
    N x C x H x W images, N x T x F sequences (or N x C x L), N x F features, or N x T integer ids
    (``dtype`` int64 / int32). Raises :class:`ExportError` on any unsupported layer.
    """
    shape = tuple(int(s) for s in input_shape)[1:]
    if dtype not in ("float32", "int64", "int32"):
        raise ExportError(f"segment input dtype {dtype}: only float32, int64 and int32 inputs are supported")
    if len(shape) not in (1, 2, 3) or (dtype != "float32" and len(shape) != 1):
        raise ExportError(
            f"segment input of shape {tuple(input_shape)} ({dtype}): only N x C x H x W, N x T x F or N x F float "
            "inputs and N x T integer ids are supported"
        )
    if isinstance(module, torch.jit.ScriptModule):
        module = _script_as_fx(module)
    if isinstance(module, fx.GraphModule):
        inp, nodes, out = _fx_nodes(module)
    else:
        try:
            gm = fx.symbolic_trace(module)
        except Exception as exc:
            raise ExportError(f"cannot trace {type(module).__name__} with torch.fx: {exc}") from exc
        inp, nodes, out = _fx_nodes(gm)
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}
    return _Builder(state).build(inp, nodes, out, shape, dtype)


class _Builder:
    def __init__(self, state: Mapping[str, np.ndarray]) -> None:
        self.state = state
        self.layers: dict[str, Layer] = {}
        self.alias: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        """Non-tensor results of nodes by node name: ``x.size(d)`` (ops.shape.Size) and the tagged tuples of the
        sequence ops: ``("shape", dims)``, ``("arange", n)``, ``("param", path)``, ``("rows", path, n)`` (Embedding
        rows 0..n-1), ``("tuple", layer, message)`` (an RNN / attention output), ``("meta", attr)``."""
        self.invalid: dict[str, str] = {}
        """Nodes whose use is an error (the state parts of an RNN's output tuple), with the message."""

    def tuple_output(self, node: _Node, lyr: Layer, message: str) -> None:
        """``node`` returns a tuple whose item 0 is ``lyr``; using another item raises ``message``."""
        del self.alias[node.name]
        self.values[node.name] = ("tuple", lyr.name, message)

    def lookup(self, a: Any) -> Any:
        """A constant argument, a :attr:`values` entry, ``("invalid", message)`` or ``("tensor", layer)``."""
        if not isinstance(a, _Ref):
            return a
        if a in self.invalid:
            return ("invalid", self.invalid[a])
        if a in self.values:
            return self.values[a]
        if self.alias.get(a, a) in self.layers:
            return ("tensor", self.layers[self.alias.get(a, a)])
        raise ExportError(f"value {a!r} is not produced by a supported layer")

    def ref(self, a: Any, node: _Node) -> Layer:
        if not isinstance(a, _Ref):
            raise ExportError(f"{node.describe()}: expected a tensor argument, got {a!r}")
        if a in self.invalid:
            raise ExportError(f"{node.describe()}: {self.invalid[a]}")
        if a in self.values:
            v = self.values[a]
            raise ExportError(
                f"{node.describe()}: input {a!r} is not a layer output ({v[0] if isinstance(v, tuple) else v!r}); "
                "only the supported layers' outputs can be combined"
            )
        name = self.alias.get(a, a)
        if name not in self.layers:
            raise ExportError(f"{node.describe()}: input {a!r} is not produced by a supported layer")
        return self.layers[name]

    def value(self, a: Any) -> Any:
        """``a`` with references to non-tensor node results (``values``) replaced by those results."""
        if isinstance(a, _Ref) and a in self.values:
            return self.values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        return a

    def add(self, node: _Node, kind: str, inputs: list[Layer], shape: tuple[int, ...], *, suffix: str = "",
            **attrs: Any) -> Layer:
        """Add a layer for ``node`` (``suffix`` names the extra layers of a node mapped to several)."""
        lyr = Layer(_safe_name(node.name) + suffix, kind, [i.name for i in inputs], shape, dict(attrs),
                    source=node.describe())
        if lyr.name in self.layers:
            raise ExportError(f"{node.describe()} runs twice (shared weights); every layer may run only once")
        self.layers[lyr.name] = lyr
        self.alias[node.name] = lyr.name
        return lyr

    def param(self, node: _Node, lyr: Layer, key: str, torch_key: str) -> None:
        full = f"{node.path}.{torch_key}" if node.path else torch_key
        if full not in self.state:
            raise ExportError(f"{node.describe()}: weight {full!r} not found in the segment's state dict")
        lyr.weights[key] = torch_to_tf_layout(self.state[full], layout_of(lyr, key))
        lyr.torch_names[key] = full

    def build(self, inp: str, nodes: list[_Node], out: str, shape: tuple[int, ...], dtype: str) -> LayerGraph:
        internal = (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape
        first = Layer("input", "input", [], internal, {"dtype": dtype}, source="the segment input")
        self.layers["input"] = first
        self.alias[inp] = "input"
        for node in nodes:
            if node.op == "module":
                self.module(node)
            else:
                self.function(node)
        if out in self.invalid:
            raise ExportError(f"the segment output {out!r}: {self.invalid[out]}")
        if out not in self.alias:
            raise ExportError(f"the segment output {out!r} is not produced by a supported layer")
        if self.alias[out] == "input" and dtype != "float32":
            raise ExportError("a segment that returns its integer input unchanged cannot train")
        last = self.layers[self.alias[out]]
        out_shape = (last.shape[2], last.shape[0], last.shape[1]) if len(last.shape) == 3 else last.shape
        reachable = _reachable(self.layers, last.name)
        layers = [lyr for lyr in self.layers.values() if lyr.name in reachable or lyr.kind == "input"]
        return LayerGraph(layers, last.name, shape, out_shape)

    def same(self, node: _Node, x: Layer) -> None:
        """``node`` passes ``x`` through unchanged (Identity, flatten of a flat tensor)."""
        self.alias[node.name] = x.name

    def module(self, node: _Node) -> None:
        m = node.module
        mtype = _module_type(m)
        first = self.lookup(node.args[0]) if node.args else None
        if mtype == "Embedding" and isinstance(first, tuple) and first[0] == "arange":
            self.values[node.name] = ("rows", f"{node.path}.weight", first[1])  # emb(arange(T)): positional rows
            return
        # further arguments must be defaults (None / flags, which the op's mapping checks) or the same tensor (q, k, v)
        extra = [*node.args[1:], *node.kwargs.values()]
        if not node.args or any(
            not (v is None or isinstance(v, bool) or (isinstance(v, _Ref) and v == node.args[0])) for v in extra
        ):
            raise ExportError(
                f"{node.describe()}: called with further tensor arguments (masks, states or distinct q / k / v); "
                "only calls on one tensor are supported: cut so that it runs on the server"
            )
        x = self.ref(node.args[0], node)
        spec = REGISTRY.for_module(mtype)
        if spec is None or spec.build_module is None:
            raise ExportError(
                f"{node.describe()} is not supported by the TF.js / TFLite export. Supported: "
                + "; ".join(SUPPORTED_LAYERS)
            )
        spec.build_module(self, node, m, x)

    def function(self, node: _Node) -> None:
        if node.op == "param":  # a parameter used as a tensor: only a positional table (see ops.embedding)
            self.values[node.name] = ("param", node.path)
            return
        if node.op == "add":  # x + a positional table (nn.Parameter or Embedding rows 0..T-1)
            other = node.kwargs.get("other", node.args[1] if len(node.args) > 1 else None)
            a, b = self.lookup(node.args[0]), self.lookup(other)
            if isinstance(a, tuple) and a[0] in ("param", "rows"):
                a, b = b, a
            if isinstance(b, tuple) and b[0] in ("param", "rows"):
                spec = REGISTRY.for_fn("positional")
                if spec is None or spec.build_function is None:  # pragma: no cover - registered by ops.embedding
                    raise ExportError(f"{node.describe()} has no export mapping")
                spec.build_function(self, node)
                return
        spec = REGISTRY.for_fn(node.op)
        if spec is None or spec.build_function is None:  # pragma: no cover - the readers only produce table ops
            raise ExportError(f"{node.describe()} has no export mapping")
        spec.build_function(self, node)


def _safe_name(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out and not out[0].isdigit() else f"l_{out}"


def _reachable(layers: Mapping[str, Layer], out: str) -> set[str]:
    seen: set[str] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(layers[n].inputs)
    return seen


def segment_exporter(
    write: Callable[Concatenate[LayerGraph, _P], _R], doc: str
) -> Callable[Concatenate[nn.Module, Sequence[int], _P], _R]:
    """``write(graph, ...)`` as ``export(module, input_shape, ..., input_dtype="float32")``: maps the segment first."""

    def export(module: nn.Module, input_shape: Sequence[int], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        dtype = str(kwargs.pop("input_dtype", "float32"))
        return write(layer_graph(module, input_shape, dtype), *args, **kwargs)

    export.__doc__ = doc
    return export
