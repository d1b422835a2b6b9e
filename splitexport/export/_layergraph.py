"""A torch segment as a small layer graph: the common IR of the Keras, TF.js and TFLite exports.

Reads a segment given as a ``torch.fx.GraphModule`` (what :func:`splitexport.partition`
returns) or as the TorchScript module a bundle stores, checks every layer against
the supported set, and records each layer with its weights already in TensorFlow
layout. Inside the graph image tensors are NHWC; the segment's boundary stays NCHW
(the exporters transpose at entry and exit). Anything outside the supported set is
an :class:`~splitexport._errors.ExportError` naming the layer.
"""

from __future__ import annotations

import operator
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .._errors import ExportError
from ._seqops import SEQ_MODULES, seq_module

if TYPE_CHECKING:
    from .._bundle import Bundle

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

SUPPORTED_LAYERS = (
    "Conv2d (groups 1 or depthwise, zero padding, dilation 1)",
    "BatchNorm2d / BatchNorm1d (affine, running stats, fixed momentum)",
    "ReLU, GELU (exact), Sigmoid, Tanh",
    "MaxPool2d (no padding, dilation 1, floor mode)",
    "AdaptiveAvgPool2d(1) (global average pool)",
    "Flatten (start_dim=1)",
    "Linear",
    "Dropout",
    "Identity",
    "residual add (a + b, same shapes)",
    "torch.cat along a non-batch dimension",
)
"""What :func:`layer_graph` accepts; everything else is an export-time error."""

_NCHW_TO_NHWC_AXIS = {1: 3, 2: 1, 3: 2}


@dataclass
class Layer:
    """One layer of the graph, with its weights in TensorFlow layout.

    ``kind`` is one of input, conv2d, depthwise2d, batchnorm, relu, gelu, sigmoid,
    tanh, maxpool2d, gap, flatten, linear, dropout, add, concat. ``shape`` is the
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
        """Weight keys updated by the optimizer (BN moving statistics are not)."""
        return [k for k in self.weights if not k.startswith("moving_")]


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
                transform = lyr.kind if key in ("kernel", "depthwise_kernel") else "identity"
                if lyr.kind == "depthwise2d" and key == "depthwise_kernel":
                    transform = f"depthwise2d:{lyr.attrs['multiplier']}"
                out[f"{lyr.name}/{key}"] = [tname, transform]
        return out


def torch_to_tf_layout(value: np.ndarray, transform: str) -> np.ndarray:
    """The export's layout of a torch weight (inverse of :func:`tf_to_torch_layout`)."""
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
    """Undo the weight layout change of the export: ``transform`` is conv2d, depthwise2d[:m], linear or identity."""
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


def _to_tf_layout(kind: str, key: str, w: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    if key == "kernel" and kind == "conv2d":
        return w.transpose(2, 3, 1, 0)
    if key == "depthwise_kernel":
        c, m = attrs["in_channels"], attrs["multiplier"]
        return w.reshape(c, m, w.shape[2], w.shape[3]).transpose(2, 3, 0, 1)
    if key == "kernel" and kind == "linear":
        return w.T
    return w


def _to_torch_layout(lyr: Layer, key: str, w: np.ndarray) -> np.ndarray:
    return tf_to_torch_layout(w, lyr.kind if key in ("kernel", "depthwise_kernel") else "identity")


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


_FX_FUNCTIONS: dict[Any, str] = {
    operator.add: "add",
    torch.add: "add",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.flatten: "flatten",
    torch.relu: "relu",
    F.relu: "relu",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.gelu: "gelu",
    operator.getitem: "getitem",
    getattr: "getattr",
    torch.arange: "arange",
}
_FX_METHODS = {"add": "add", "flatten": "flatten", "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "size": "size"}
_ATEN = {
    "aten::add": "add",
    "aten::cat": "cat",
    "aten::concat": "cat",
    "aten::flatten": "flatten",
    "aten::relu": "relu",
    "aten::sigmoid": "sigmoid",
    "aten::tanh": "tanh",
    "aten::gelu": "gelu",
    "aten::size": "size",
    "aten::__getitem__": "getitem",
    "prim::TupleIndex": "getitem",
    "aten::arange": "arange",
}
_ATEN_ARGS = {
    "add": ("input", "other", "alpha"),
    "cat": ("tensors", "dim"),
    "flatten": ("input", "start_dim", "end_dim"),
    "relu": ("input",),
    "sigmoid": ("input",),
    "tanh": ("input",),
    "gelu": ("input", "approximate"),
    "size": ("input", "dim"),
    "getitem": ("input", "index"),
    "arange": ("input",),
}


def _fx_nodes(gm: fx.GraphModule) -> tuple[str, list[_Node], str]:
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
        elif n.op == "get_attr":
            nodes.append(_Node(n.name, "param", [], {}, path=str(n.target)))
        elif n.op == "call_module":
            nodes.append(_Node(n.name, "module", args, kwargs, gm.get_submodule(str(n.target)), str(n.target)))
        elif n.op == "call_function":
            fname = _FX_FUNCTIONS.get(n.target)
            if fname is None:
                raise ExportError(
                    f"node {n.name!r} calls {getattr(n.target, '__name__', n.target)}, which has no export mapping"
                )
            nodes.append(_Node(n.name, fname, args, kwargs))
        elif n.op == "call_method":
            mname = _FX_METHODS.get(str(n.target))
            if mname is None:
                raise ExportError(f"node {n.name!r} calls the tensor method .{n.target}(), which has no export mapping")
            nodes.append(_Node(n.name, mname, args, kwargs))
        else:
            raise ExportError(
                f"node {n.name!r} ({n.op} {n.target}) has no export mapping (parameters used outside a layer?)"
            )
    return inp, nodes, out


def _script_nodes(sm: torch.jit.ScriptModule) -> tuple[str, list[_Node], str]:
    graph = sm.graph
    graph_inputs = list(graph.inputs())
    if len(graph_inputs) != 2:
        raise ExportError("the segment takes more than one input; exports need exactly one tensor input")
    paths: dict[str, str] = {graph_inputs[0].debugName(): ""}
    consts: dict[str, Any] = {}
    alias: dict[str, str] = {}
    counts: dict[str, int] = {}
    nodes: list[_Node] = []

    def value(v: torch._C.Value) -> Any:
        name = v.debugName()
        return consts[name] if name in consts else _Ref(alias.get(name, name))

    for node in graph.nodes():
        kind = node.kind()
        outs = list(node.outputs())
        ins = list(node.inputs())
        if kind == "prim::Constant":
            consts[outs[0].debugName()] = outs[0].toIValue()
        elif kind == "prim::ListConstruct":
            consts[outs[0].debugName()] = [value(v) for v in ins]
        elif kind == "prim::GetAttr":
            parent = paths.get(ins[0].debugName())
            if parent is None:
                raise ExportError(f"unsupported attribute access {node.s('name')!r} in the TorchScript segment")
            path = f"{parent}.{node.s('name')}" if parent else node.s("name")
            if outs[0].type().kind() == "TensorType":  # a parameter or buffer used as a tensor
                alias[outs[0].debugName()] = name = path.replace(".", "_")
                nodes.append(_Node(name, "param", [], {}, path=path))
            else:
                paths[outs[0].debugName()] = path
        elif kind == "prim::TupleUnpack":
            source = value(ins[0])
            for i, o in enumerate(outs):
                alias[o.debugName()] = name = f"{source}_item{i}"
                nodes.append(_Node(name, "getitem", [source], {"index": i}))
        elif kind == "prim::CallMethod":
            mpath = paths.get(ins[0].debugName())
            if not mpath or not node.s("name").startswith("forward"):
                raise ExportError(f"unsupported method call {node.s('name')!r} in the TorchScript segment")
            path = mpath
            module: Any = sm
            for atom in path.split("."):
                module = getattr(module, atom)
            name = path.replace(".", "_")
            alias[outs[0].debugName()] = name
            nodes.append(_Node(name, "module", [value(v) for v in ins[1:]], {}, module, path))
        elif kind in _ATEN:
            fname = _ATEN[kind]
            names = _ATEN_ARGS[fname]
            kwargs = {names[i]: value(v) for i, v in enumerate(ins) if i < len(names)}
            args = [kwargs.pop(names[0])]
            count = counts.get(fname, 0)
            counts[fname] = count + 1
            alias[outs[0].debugName()] = name = f"{fname}_{count}" if count else fname
            nodes.append(_Node(name, fname, args, kwargs))
        else:
            raise ExportError(f"TorchScript op {kind} has no export mapping")
    (ret,) = list(graph.return_node().inputs())
    return graph_inputs[1].debugName(), nodes, alias.get(ret.debugName(), ret.debugName())


# --------------------------------------------------------------------------- building the IR


def layer_graph(module: nn.Module, input_shape: Sequence[int], dtype: str = "float32") -> LayerGraph:
    """Map a segment (fx GraphModule or TorchScript module) to a :class:`LayerGraph`.

    ``input_shape`` is the segment's input shape in torch layout with the batch dimension:
    N x C x H x W images, N x T x F sequences, N x F features, or N x T integer ids
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
        inp, nodes, out = _script_nodes(module)
    elif isinstance(module, fx.GraphModule):
        inp, nodes, out = _fx_nodes(module)
    else:
        try:
            gm = fx.symbolic_trace(module)
        except Exception as exc:
            raise ExportError(f"cannot trace {type(module).__name__} with torch.fx: {exc}") from exc
        inp, nodes, out = _fx_nodes(gm)
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}
    graph = _Builder(state).build(inp, nodes, out, shape, dtype)
    return graph


class _Builder:
    def __init__(self, state: Mapping[str, np.ndarray]) -> None:
        self.state = state
        self.layers: dict[str, Layer] = {}
        self.alias: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        """Non-tensor values: shapes and ints, ``("arange", n)``, ``("param", path)``, ``("rows", path, n)``."""
        self.invalid: dict[str, str] = {}
        """Nodes whose use is an error (tuple parts of RNN outputs), with the message."""

    def tuple_output(self, node: _Node, lyr: Layer, message: str) -> None:
        """``node`` returns a tuple whose item 0 is ``lyr``; using any other item raises ``message``."""
        del self.alias[node.name]
        self.values[node.name] = ("tuple", lyr.name, message)

    def ref(self, a: Any, node: _Node) -> Layer:
        if not isinstance(a, _Ref):
            raise ExportError(f"{node.describe()}: expected a tensor argument, got {a!r}")
        if a in self.invalid:
            raise ExportError(f"{node.describe()}: {self.invalid[a]}")
        if a in self.values:
            raise ExportError(
                f"{node.describe()}: input {a!r} is not a layer output ({self.values[a][0]}); only the supported "
                "layers' outputs can be combined"
            )
        name = self.alias.get(a, a)
        if name not in self.layers:
            raise ExportError(f"{node.describe()}: input {a!r} is not produced by a supported layer")
        return self.layers[name]

    def add(self, node: _Node, kind: str, inputs: list[Layer], shape: tuple[int, ...], **attrs: Any) -> Layer:
        lyr = Layer(_safe_name(node.name), kind, [i.name for i in inputs], shape, dict(attrs), source=node.describe())
        if lyr.name in self.layers:
            raise ExportError(f"{node.describe()} runs twice (shared weights); every layer may run only once")
        self.layers[lyr.name] = lyr
        self.alias[node.name] = lyr.name
        return lyr

    def param(self, node: _Node, lyr: Layer, key: str, torch_key: str) -> None:
        full = f"{node.path}.{torch_key}" if node.path else torch_key
        if full not in self.state:
            raise ExportError(f"{node.describe()}: weight {full!r} not found in the segment's state dict")
        lyr.weights[key] = np.ascontiguousarray(_to_tf_layout(lyr.kind, key, self.state[full], lyr.attrs))
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
        if out not in self.alias:
            raise ExportError(f"the segment output {out!r} is not produced by a supported layer")
        if first.name == self.alias[out] and dtype != "float32":
            raise ExportError("a segment that returns its integer input unchanged cannot train")
        last = self.layers[self.alias[out]]
        out_shape = (last.shape[2], last.shape[0], last.shape[1]) if len(last.shape) == 3 else last.shape
        reachable = _reachable(self.layers, last.name)
        layers = [lyr for lyr in self.layers.values() if lyr.name in reachable or lyr.kind == "input"]
        return LayerGraph(layers, last.name, shape, out_shape)

    # -- modules
    def module(self, node: _Node) -> None:
        m = node.module
        mtype = _module_type(m)
        if mtype == "Embedding" and node.args and isinstance(node.args[0], _Ref):
            value = self.values.get(node.args[0])
            if value is not None and value[0] == "arange":
                self.values[node.name] = ("rows", f"{node.path}.weight", value[1])  # emb(arange(T)): positions
                return
        if mtype in SEQ_MODULES:
            seq_module(self, node, m, mtype)
            return
        if len(node.args) != 1 or node.kwargs:
            raise ExportError(f"{node.describe()}: called with {len(node.args)} arguments; one tensor expected")
        x = self.ref(node.args[0], node)
        handler: Callable[[_Node, Any, Layer], None] | None = getattr(self, f"_m_{mtype}", None)
        if handler is None:
            raise ExportError(
                f"{node.describe()} is not supported by the TF.js / TFLite export. Supported: "
                + "; ".join(SUPPORTED_LAYERS)
            )
        handler(node, m, x)

    def _m_Conv2d(self, node: _Node, m: Any, x: Layer) -> None:
        if len(x.shape) != 3:
            raise ExportError(f"{node.describe()}: expects an N x C x H x W input")
        if m.padding_mode != "zeros":
            raise ExportError(f"{node.describe()}: padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
        if tuple(m.dilation) != (1, 1):
            raise ExportError(f"{node.describe()}: dilation {tuple(m.dilation)} is not supported (only 1)")
        kh, kw = (int(k) for k in m.kernel_size)
        sh, sw = (int(s) for s in m.stride)
        if isinstance(m.padding, str):
            if m.padding == "valid":
                pads = (0, 0, 0, 0)
            else:
                th, tw = kh - 1, kw - 1
                pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            ph, pw = (int(p) for p in m.padding)
            pads = (ph, ph, pw, pw)
        cin, cout, groups = int(m.in_channels), int(m.out_channels), int(m.groups)
        h, w, _ = x.shape
        ho = (h + pads[0] + pads[1] - kh) // sh + 1
        wo = (w + pads[2] + pads[3] - kw) // sw + 1
        attrs = {"kernel": (kh, kw), "strides": (sh, sw), "pads": pads, "in_channels": cin, "out_channels": cout}
        if groups == 1:
            lyr = self.add(node, "conv2d", [x], (ho, wo, cout), **attrs)
            self.param(node, lyr, "kernel", "weight")
        elif groups == cin:
            lyr = self.add(node, "depthwise2d", [x], (ho, wo, cout), multiplier=cout // cin, **attrs)
            self.param(node, lyr, "depthwise_kernel", "weight")
        else:
            raise ExportError(
                f"{node.describe()}: groups={groups} is not supported (TF.js has no grouped convolution); "
                "use groups=1 or depthwise (groups=in_channels)"
            )
        if m.bias is not None:
            self.param(node, lyr, "bias", "bias")

    def _bn(self, node: _Node, m: Any, x: Layer, rank: int) -> None:
        if len(x.shape) != rank:
            raise ExportError(f"{node.describe()}: unsupported input rank {len(x.shape) + 1}")
        if not m.affine or not m.track_running_stats or m.momentum is None:
            raise ExportError(
                f"{node.describe()}: only BatchNorm with affine=True, track_running_stats=True and a fixed momentum "
                "is supported"
            )
        lyr = self.add(node, "batchnorm", [x], x.shape, epsilon=float(m.eps), momentum=float(m.momentum))
        for key, tkey in (
            ("gamma", "weight"),
            ("beta", "bias"),
            ("moving_mean", "running_mean"),
            ("moving_variance", "running_var"),
        ):
            self.param(node, lyr, key, tkey)

    def _m_BatchNorm2d(self, node: _Node, m: Any, x: Layer) -> None:
        self._bn(node, m, x, 3)

    def _m_BatchNorm1d(self, node: _Node, m: Any, x: Layer) -> None:
        self._bn(node, m, x, 1)

    def _m_ReLU(self, node: _Node, m: Any, x: Layer) -> None:
        self.add(node, "relu", [x], x.shape)

    def _m_Sigmoid(self, node: _Node, m: Any, x: Layer) -> None:
        self.add(node, "sigmoid", [x], x.shape)

    def _m_Tanh(self, node: _Node, m: Any, x: Layer) -> None:
        self.add(node, "tanh", [x], x.shape)

    def _m_GELU(self, node: _Node, m: Any, x: Layer) -> None:
        if m.approximate != "none":
            raise ExportError(f"{node.describe()}: approximate={m.approximate!r} is not supported (only 'none')")
        self.add(node, "gelu", [x], x.shape)

    def _m_Identity(self, node: _Node, m: Any, x: Layer) -> None:
        self.alias[node.name] = x.name

    def _m_Dropout(self, node: _Node, m: Any, x: Layer) -> None:
        self.add(node, "dropout", [x], x.shape, rate=float(m.p))

    def _m_MaxPool2d(self, node: _Node, m: Any, x: Layer) -> None:
        def pair(v: Any) -> tuple[int, int]:
            return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))

        k = pair(m.kernel_size)
        s = pair(m.stride if m.stride is not None else m.kernel_size)
        if pair(m.padding) != (0, 0) or pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
            raise ExportError(
                f"{node.describe()}: only MaxPool2d without padding, dilation, ceil_mode or return_indices is supported"
            )
        if len(x.shape) != 3:
            raise ExportError(f"{node.describe()}: expects an N x C x H x W input")
        h, w, c = x.shape
        self.add(node, "maxpool2d", [x], ((h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1, c), pool=k, strides=s)

    def _m_AdaptiveAvgPool2d(self, node: _Node, m: Any, x: Layer) -> None:
        size = m.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size != (1, 1) or len(x.shape) != 3:
            raise ExportError(f"{node.describe()}: only AdaptiveAvgPool2d(1) (global average pooling) is supported")
        self.add(node, "gap", [x], (1, 1, x.shape[2]))

    def _m_Flatten(self, node: _Node, m: Any, x: Layer) -> None:
        self.flatten(node, x, int(m.start_dim), int(m.end_dim))

    def _m_Linear(self, node: _Node, m: Any, x: Layer) -> None:
        if len(x.shape) != 1:
            raise ExportError(f"{node.describe()}: Linear is supported on N x F inputs only (flatten first)")
        lyr = self.add(node, "linear", [x], (int(m.out_features),))
        self.param(node, lyr, "kernel", "weight")
        if m.bias is not None:
            self.param(node, lyr, "bias", "bias")

    # -- functions
    def flatten(self, node: _Node, x: Layer, start: int, end: int) -> None:
        if start != 1 or end != -1:
            raise ExportError(f"{node.describe()}: only flatten(start_dim=1, end_dim=-1) is supported")
        if len(x.shape) == 1:
            self.alias[node.name] = x.name
            return
        self.add(node, "flatten", [x], (int(np.prod(x.shape)),))

    def _value(self, a: Any) -> Any:
        """A constant argument, or the value a shape / index / arange node computed."""
        if isinstance(a, _Ref):
            if a in self.invalid:
                return ("invalid", self.invalid[a])
            if a in self.values:
                return self.values[a]
            if self.alias.get(a, a) in self.layers:
                lyr = self.layers[self.alias.get(a, a)]
                return ("tensor", lyr)
            raise ExportError(f"value {a!r} is not available")
        return a

    def _positional(self, node: _Node, x: Layer, table: Any) -> None:
        """``x + table``: a trainable positional table (an nn.Parameter, or Embedding rows 0..T-1)."""
        path, rows = (table[1], table[2]) if table[0] == "rows" else (table[1], None)
        if path not in self.state:
            raise ExportError(f"{node.describe()}: {path!r} is not a parameter of the segment")
        w = self.state[path]
        if len(x.shape) != 2:
            raise ExportError(f"{node.describe()}: a parameter can only be added to an N x T x D sequence")
        t, d = x.shape
        ok = (rows == t and w.ndim == 2 and w.shape[1] == d and w.shape[0] >= t) if rows is not None else (
            tuple(w.shape) in ((t, d), (1, t, d)))
        if not ok:
            raise ExportError(
                f"{node.describe()}: adding {path!r} of shape {tuple(w.shape)} to a sequence of shape (N, {t}, {d}) is "
                "not supported; only positional tables of shape (T, D) / (1, T, D) or Embedding(arange(T))"
            )
        lyr = self.add(node, "positional", [x], x.shape)
        lyr.weights["embeddings"] = np.ascontiguousarray(w)
        lyr.torch_names["embeddings"] = path

    def function(self, node: _Node) -> None:
        op = node.op
        args = list(node.args)
        kw = dict(node.kwargs)
        if op == "param":
            self.values[node.name] = ("param", node.path)
        elif op in ("getattr", "size", "getitem", "arange"):
            self._shape_op(node, op, args, kw)
        elif op == "add" and any(isinstance(v, _Ref) and v in self.values
                                 for v in (args[0], kw.get("other", args[1] if len(args) > 1 else None))):
            a, b = self._value(args[0]), self._value(kw.get("other", args[1] if len(args) > 1 else None))
            if a[0] != "tensor":
                a, b = b, a
            if a[0] != "tensor" or b[0] not in ("param", "rows") or kw.get("alpha", 1) != 1:
                raise ExportError(f"{node.describe()}: only tensor + positional table is supported")
            self._positional(node, a[1], b)
        elif op in ("relu", "sigmoid", "tanh"):
            kw.pop("inplace", None)
            if len(args) > 1 and args[1] is False:
                args = args[:1]
            if len(args) != 1 or kw:
                raise ExportError(f"{node.describe()}: unsupported arguments")
            x = self.ref(args[0], node)
            self.add(node, op, [x], x.shape)
        elif op == "gelu":
            approx = kw.pop("approximate", args[1] if len(args) > 1 else "none")
            if approx != "none":
                raise ExportError(f"{node.describe()}: approximate={approx!r} is not supported (only 'none')")
            x = self.ref(args[0], node)
            self.add(node, "gelu", [x], x.shape)
        elif op == "flatten":
            start = kw.pop("start_dim", args[1] if len(args) > 1 else 0)
            end = kw.pop("end_dim", args[2] if len(args) > 2 else -1)
            self.flatten(node, self.ref(args[0], node), int(start), int(end))
        elif op == "add":
            other = kw.pop("other", args[1] if len(args) > 1 else None)
            alpha = kw.pop("alpha", args[2] if len(args) > 2 else 1)
            a, b = self.ref(args[0], node), self.ref(other, node)
            if alpha != 1 or a.shape != b.shape:
                raise ExportError(f"{node.describe()}: only a + b of two tensors with the same shape is supported")
            self.add(node, "add", [a, b], a.shape)
        elif op == "cat":
            tensors = args[0]
            dim = int(kw.pop("dim", args[1] if len(args) > 1 else 0))
            ins = [self.ref(t, node) for t in tensors]
            rank = len(ins[0].shape) + 1
            dim = dim + rank if dim < 0 else dim
            if dim == 0 or any(len(i.shape) + 1 != rank for i in ins):
                raise ExportError(f"{node.describe()}: only concatenation of same-rank tensors along a non-batch dim")
            axis = _NCHW_TO_NHWC_AXIS[dim] if rank == 4 else dim
            shape = list(ins[0].shape)
            shape[axis - 1] = sum(i.shape[axis - 1] for i in ins)
            self.add(node, "concat", ins, tuple(shape), axis=axis, sizes=[i.shape[axis - 1] for i in ins])
        else:  # pragma: no cover - the readers only produce the ops above
            raise ExportError(f"{node.describe()} has no export mapping")

    def _shape_op(self, node: _Node, op: str, args: list[Any], kw: dict[str, Any]) -> None:
        """Shape arithmetic that feeds ``torch.arange`` (``x.shape[1]``, ``x.size(1)``) and tuple indexing."""
        src = self._value(args[0]) if args else None
        if op == "getattr" and src and src[0] == "tensor" and args[1] == "shape":
            self.values[node.name] = ("shape", (None, *_torch_shape(src[1])))
        elif op == "getattr" and src and src[0] == "tensor" and args[1] in ("device", "dtype"):
            self.values[node.name] = ("meta", args[1])  # only arange's device / dtype use it
        elif op == "size" and src and src[0] == "tensor":
            shape = (None, *_torch_shape(src[1]))
            dim = kw.get("dim", args[1] if len(args) > 1 else None)
            self.values[node.name] = ("shape", shape) if dim is None else ("int", shape[int(dim)])
        elif op == "getitem" and src and src[0] == "shape":
            idx = int(self._value(kw.get("index", args[1] if len(args) > 1 else None)))
            if src[1][idx] is None:
                raise ExportError(f"{node.describe()}: the batch size is not a constant of the exported segment")
            self.values[node.name] = ("int", src[1][idx])
        elif op == "getitem" and src and src[0] == "invalid":
            self.invalid[node.name] = src[1]
        elif op == "getitem" and src and src[0] == "tuple":
            idx = int(self._value(kw.get("index", args[1] if len(args) > 1 else None)))
            if idx == 0:
                self.alias[node.name] = src[1]
            else:
                self.invalid[node.name] = src[2]
        elif op == "arange" and src is not None:
            end = src[1] if isinstance(src, tuple) and src[0] == "int" else src
            dtype = kw.get("dtype")
            if not isinstance(end, int) or len(args) > 1 or (dtype is not None and not isinstance(dtype, _Ref)
                                                             and dtype not in (torch.int64, torch.int32)):
                raise ExportError(f"{node.describe()}: only torch.arange(T) feeding an Embedding is supported")
            self.values[node.name] = ("arange", end)
        else:
            raise ExportError(f"{node.describe()}: this use of {op} has no export mapping")


def _torch_shape(lyr: Layer) -> tuple[int, ...]:
    s = lyr.shape
    return (s[2], s[0], s[1]) if len(s) == 3 else s


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


def cli_optimizer(bundle: Bundle, args: Any) -> dict[str, Any]:
    """The bundle's optimizer as export options, with the CLI's ``--lr`` override."""
    opt = bundle.manifest.optimizer.model_dump()
    if getattr(args, "lr", None):
        opt["lr"] = float(args.lr)
    return opt


def export_device_segments(bundle: Bundle, fmt: str, export: Callable[..., dict[str, Path]],
                           options: dict[str, object], **kwargs: Any) -> dict[str, dict[str, Path]]:
    """``export(module, input_shape, out_dir, is_last=, loss=, **kwargs)`` for every device segment, in a
    temporary directory; the files are recorded in the bundle under ``fmt`` with ``options``."""
    m = bundle.manifest
    files: dict[str, dict[str, Path]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in m.device_segments:
            files[spec.name] = export(bundle.torch_segment(spec.name), (1, *spec.input.sample_shape),
                                      Path(tmp) / spec.name, is_last=spec.is_last, loss=m.loss.kind,
                                      input_dtype=spec.input.dtype, **kwargs)
        bundle.add_artifacts(fmt, files, options)
    return files
