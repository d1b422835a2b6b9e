"""Rewrite a segment into layers ONNX Runtime 1.19 can train, before ``torch.onnx.export``.

The segment (a bundle's TorchScript copy, or an fx ``GraphModule``) is read as one fx graph
of torch.nn leaf layers and functions (:func:`splitexport._loading.torchscript_to_fx`), and
each layer ORT cannot train as exported is replaced by an equivalent made of ops it can,
holding the *same* parameter objects under the same names (so the checkpoint keeps torch's
``state_dict`` names):

=====================================  ==========================================================
layer                                  becomes
=====================================  ==========================================================
``Hardswish`` / ``Hardsigmoid``        ``x * clip(x + 3, 0, 6) / 6`` / ``clip(x + 3, 0, 6) / 6``
                                       (ORT has no HardSwish / HardSigmoid gradient)
``GroupNorm``                          mean / variance over ``N x G x -1`` (ORT has no
                                       InstanceNormalization gradient)
``AvgPool2d``                          a depthwise convolution with constant ``1/k^2`` weights
                                       (AveragePool's gradient crashes ORT with a dynamic batch)
``GRU`` / ``LSTM`` (one layer)         the cell equations unrolled over the (fixed) sequence
                                       (the fused ONNX op renames and re-lays out the weights)
scripted ``TransformerEncoderLayer``   the same layer in Python (the scripted forward's
/ ``MultiheadAttention``               fast-path checks use ``aten::format``, which cannot export)
``Dropout`` (p > 0) in a segment       ``x * mask`` with the mask a new model input
trained on a received gradient         (``dropout_mask_<k>``), so the forward pass and the
                                       training step that recomputes it use the same mask
``TransformerEncoderLayer`` /          the layer written out (attention per head) with its
``MultiheadAttention`` with dropout    dropouts as ``nn.Dropout`` calls, then masks as above
> 0 in such a segment                  (``MaskableEncoderLayer`` / ``MaskableAttention``)
=====================================  ==========================================================

Every rewrite is checked: the rewritten segment must give the original's output (inference
mode) on the example input, or the export stops. A segment that needs no rewrite is exported
as it is; one that does is exported as Python layers (scripted torch.nn layers are rebuilt in
Python, since legacy ONNX tracing cannot call them from a Python graph).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .._errors import ExportError
from .._loading import torchscript_to_fx
from ._onnx_ops import UnsupportedOpError

MASK_PREFIX = "dropout_mask_"
_MOVE = "cut the model so that this layer runs on the server"


@dataclass(frozen=True)
class DropoutMask:
    """A dropout mask input: ``mask`` of shape ``[batch, *shape]``, 0 or ``1 / (1 - p)`` elementwise."""

    name: str
    p: float
    shape: tuple[int, ...]
    layer: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "p": self.p, "shape": ["batch", *self.shape], "layer": self.layer}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DropoutMask:
        return cls(str(data["name"]), float(data["p"]), tuple(int(d) for d in data["shape"][1:]), str(data["layer"]))


def draw_mask(rng: np.random.Generator, batch: int, mask: DropoutMask) -> np.ndarray:
    """A fresh inverted-dropout mask: each element kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``."""
    keep = rng.random((batch, *mask.shape)) >= mask.p
    return (keep / (1.0 - mask.p)).astype(np.float32)


@dataclass
class Prepared:
    """The segment to export for training (``train``, with mask inputs) and for inference (``eval``)."""

    train: nn.Module
    eval: nn.Module
    masks: list[DropoutMask] = field(default_factory=list)
    rewritten: dict[str, str] = field(default_factory=dict)
    """Qualified layer name -> what it was rewritten as."""


def class_name(module: nn.Module) -> str:
    return str(getattr(module, "original_name", type(module).__name__))


def _is_torch_nn(module: nn.Module, name: str) -> bool:
    """Whether ``module`` is torch.nn's ``name`` (Python or scripted), not a user class of that name."""
    if isinstance(module, torch.jit.ScriptModule):
        qualified = str(module._c._type().qualified_name())
        return qualified.startswith("__torch__.torch.nn.") and qualified.endswith("." + name)
    cls = getattr(nn, name, None)
    return cls is not None and type(module) is cls


# --------------------------------------------------------------------------- replacements


def _param(t: Any) -> Any:
    """The same storage as a Parameter (a loaded TorchScript archive hands out plain tensors)."""
    if t is None or isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t, requires_grad=t.requires_grad)


class Hardswish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


class Hardsigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


class GroupNorm(nn.Module):
    """``nn.GroupNorm`` written with reshape, mean and variance (same parameters)."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.num_groups = int(layer.num_groups)
        self.eps = float(layer.eps)
        self.weight = _param(layer.weight)
        self.bias = _param(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(x.shape[0], self.num_groups, -1)
        mean = y.mean(dim=-1, keepdim=True)
        centred = y - mean
        var = (centred * centred).mean(dim=-1, keepdim=True)
        out = (centred / torch.sqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            view = [1, -1] + [1] * (x.dim() - 2)
            out = out * self.weight.reshape(view) + self.bias.reshape(view)
        return out


class AvgPool2d(nn.Module):
    """``nn.AvgPool2d`` (zero padding counted) as a depthwise convolution with constant weights."""

    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel
        channels = int(x.shape[1])  # static: a constant in the export
        weight = torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype)
        return F.conv2d(x, weight, None, self.stride, self.padding, 1, channels)


class UnrolledRNN(nn.Module):
    """A single-layer, one-direction ``nn.GRU`` / ``nn.LSTM`` as its cell equations over time (torch's gate order)."""

    def __init__(self, kind: str, layer: Any) -> None:
        super().__init__()
        self.kind = kind
        self.batch_first = bool(layer.batch_first)
        self.hidden = int(layer.hidden_size)
        self.weight_ih_l0 = _param(layer.weight_ih_l0)
        self.weight_hh_l0 = _param(layer.weight_hh_l0)
        self.bias_ih_l0 = _param(getattr(layer, "bias_ih_l0", None))
        self.bias_hh_l0 = _param(getattr(layer, "bias_hh_l0", None))

    def forward(self, x: torch.Tensor, hx: object = None) -> tuple[torch.Tensor, object]:
        if hx is not None:
            raise ExportError("an initial hidden state given to a GRU/LSTM is not supported for export")
        if not self.batch_first:
            x = x.transpose(0, 1)
        h_ = self.hidden
        xw = F.linear(x, self.weight_ih_l0, self.bias_ih_l0)
        h = torch.zeros_like(xw[:, 0, :h_])
        c = torch.zeros_like(h)
        outs = []
        for t in range(int(x.shape[1])):
            xt = xw[:, t]
            hw = F.linear(h, self.weight_hh_l0, self.bias_hh_l0)
            if self.kind == "gru":
                r = torch.sigmoid(xt[:, :h_] + hw[:, :h_])
                z = torch.sigmoid(xt[:, h_ : 2 * h_] + hw[:, h_ : 2 * h_])
                n = torch.tanh(xt[:, 2 * h_ :] + r * hw[:, 2 * h_ :])
                h = (1 - z) * n + z * h
            else:
                gates = xt + hw
                i = torch.sigmoid(gates[:, :h_])
                f = torch.sigmoid(gates[:, h_ : 2 * h_])
                g = torch.tanh(gates[:, 2 * h_ : 3 * h_])
                o = torch.sigmoid(gates[:, 3 * h_ :])
                c = f * c + i * g
                h = o * torch.tanh(c)
            outs.append(h)
        out = torch.stack(outs, dim=1)
        if not self.batch_first:
            out = out.transpose(0, 1)
        state: object = h.unsqueeze(0) if self.kind == "gru" else (h.unsqueeze(0), c.unsqueeze(0))
        return out, state


def _python_attention(layer: Any, qname: str) -> nn.MultiheadAttention:
    if not bool(layer._qkv_same_embed_dim):
        raise _unsupported(qname, "MultiheadAttention", "a scripted MultiheadAttention with kdim/vdim != embed_dim")
    attn = nn.MultiheadAttention(
        int(layer.embed_dim),
        int(layer.num_heads),
        dropout=float(layer.dropout),
        bias=layer.in_proj_bias is not None,
        add_bias_kv=layer.bias_k is not None,
        batch_first=bool(layer.batch_first),
    )
    attn.load_state_dict(layer.state_dict())
    return attn


def _python_encoder_layer(layer: Any, qname: str) -> nn.Module:
    kind = int(layer.activation_relu_or_gelu)
    activation: str | nn.Module
    if kind in (1, 2):
        activation = "relu" if kind == 1 else "gelu"
    else:
        act = getattr(layer, "activation", None)
        if not isinstance(act, nn.Module):
            raise _unsupported(qname, "TransformerEncoderLayer", "a scripted TransformerEncoderLayer with a custom activation")
        activation = act
    attn = layer.self_attn
    py = nn.TransformerEncoderLayer(
        int(attn.embed_dim),
        int(attn.num_heads),
        dim_feedforward=int(layer.linear1.out_features),
        dropout=float(layer.dropout.p),
        activation=activation,
        layer_norm_eps=float(layer.norm1.eps),
        batch_first=bool(attn.batch_first),
        norm_first=bool(layer.norm_first),
        bias=layer.linear1.bias is not None,
    )
    py.self_attn = _python_attention(attn, qname + ".self_attn")
    py.load_state_dict(layer.state_dict())
    return py


class MaskableAttention(nn.Module):
    """Batch-first self-attention written out, its attention-weight dropout an ``nn.Dropout`` (same parameters).

    fx traces through it, so the dropout becomes a mask input in a segment trained on a received gradient.
    """

    def __init__(self, layer: Any, qname: str) -> None:
        super().__init__()
        if not layer._qkv_same_embed_dim or layer.bias_k is not None or layer.add_zero_attn or not layer.batch_first:
            raise _unsupported(qname, "MultiheadAttention", "attention dropout before the server needs batch_first "
                               f"self-attention without kdim/vdim, bias_k/v or add_zero_attn; set its dropout to 0, or {_MOVE}")
        self.heads = int(layer.num_heads)
        self.head_dim = int(layer.embed_dim) // self.heads
        self.in_proj_weight = _param(layer.in_proj_weight)
        self.in_proj_bias = _param(layer.in_proj_bias)
        self.out_proj = layer.out_proj
        self.attn_dropout = nn.Dropout(float(layer.dropout))

    def forward(
        self,
        query: torch.Tensor,
        key: object = None,
        value: object = None,
        key_padding_mask: object = None,
        need_weights: bool = True,
        attn_mask: object = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """Self-attention ``attn(x, x, x)``: a different key/value shows in the export's output check."""
        if key_padding_mask is not None or attn_mask is not None:
            raise ExportError("attention masks are not supported for export")
        e, d = self.heads * self.head_dim, self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        heads = []
        for h in range(self.heads):  # per head: plain MatMuls, no head reshapes
            q, k, v = (
                F.linear(query, w[i * e + h * d : i * e + (h + 1) * d], None if b is None else b[i * e + h * d : i * e + (h + 1) * d])
                for i in range(3)
            )
            weights = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
            heads.append(self.attn_dropout(weights) @ v)
        out = torch.cat(heads, dim=-1)
        return self.out_proj(out), None


class MaskableEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch_first) written out with ``MaskableAttention`` (same parameter names)."""

    def __init__(self, layer: Any, qname: str) -> None:
        super().__init__()
        self.self_attn = MaskableAttention(layer.self_attn, qname + ".self_attn")
        self.linear1, self.linear2, self.norm1, self.norm2 = layer.linear1, layer.linear2, layer.norm1, layer.norm2
        self.dropout, self.dropout1, self.dropout2 = layer.dropout, layer.dropout1, layer.dropout2
        self.norm_first = bool(layer.norm_first)
        act = layer.activation
        self.activation = act if isinstance(act, nn.Module) else None
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = act if not isinstance(act, nn.Module) else F.relu

    def _sa(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout1(self.self_attn(x)[0])

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)
        h = self.activation(h) if self.activation is not None else self.act_fn(h)
        return self.dropout2(self.linear2(self.dropout(h)))

    def forward(self, src: torch.Tensor, src_mask: object = None, src_key_padding_mask: object = None,
                is_causal: bool = False) -> torch.Tensor:
        if src_mask is not None or src_key_padding_mask is not None:
            raise ExportError("attention masks are not supported for export")
        if self.norm_first:
            src = src + self._sa(self.norm1(src))
            return src + self._ff(self.norm2(src))
        src = self.norm1(src + self._sa(src))
        return self.norm2(src + self._ff(src))


def _maskable(layer: Any, qname: str) -> nn.Module:
    """The layer with its inner dropouts as traceable ``nn.Dropout`` calls (a scripted one rebuilt first)."""
    kind = class_name(layer)
    if kind == "TransformerEncoderLayer":
        py: Any = _python_encoder_layer(layer, qname) if isinstance(layer, torch.jit.ScriptModule) else layer
        if not bool(py.self_attn.batch_first):
            raise _unsupported(qname, kind, f"dropout before the server needs batch_first=True; set its dropout to 0, or {_MOVE}")
        return MaskableEncoderLayer(py, qname)
    py = _python_attention(layer, qname) if isinstance(layer, torch.jit.ScriptModule) else layer
    return MaskableAttention(py, qname)


def _avg_pool(layer: Any, qname: str) -> nn.Module | None:
    def pair(v: object) -> tuple[int, int]:
        return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))  # type: ignore[index]

    kernel, padding = pair(layer.kernel_size), pair(layer.padding)
    stride = pair(layer.stride if layer.stride else layer.kernel_size)
    if layer.ceil_mode or layer.divisor_override or (not layer.count_include_pad and padding != (0, 0)):
        return None  # left as AveragePool: refused with a dynamic batch (_onnx_ops)
    return AvgPool2d(kernel, stride, padding)


def _rnn(kind: str) -> Callable[[nn.Module, str], nn.Module]:
    def build(layer: Any, qname: str) -> nn.Module:
        if int(layer.num_layers) != 1 or bool(layer.bidirectional) or int(getattr(layer, "proj_size", 0)):
            raise _unsupported(
                qname,
                kind.upper(),
                f"a {kind.upper()} with several layers, two directions or a projection is not supported; "
                f"stack single-layer nn.{kind.upper()}s, or {_MOVE}",
            )
        return UnrolledRNN(kind, layer)

    return build


_REWRITES: dict[str, Callable[[nn.Module, str], nn.Module | None]] = {
    "Hardswish": lambda m, q: Hardswish(),
    "Hardsigmoid": lambda m, q: Hardsigmoid(),
    "GroupNorm": lambda m, q: GroupNorm(m),
    "AvgPool2d": _avg_pool,
    "GRU": _rnn("gru"),
    "LSTM": _rnn("lstm"),
}
_SCRIPTED_ONLY: dict[str, Callable[[nn.Module, str], nn.Module | None]] = {
    "TransformerEncoderLayer": _python_encoder_layer,
    "MultiheadAttention": _python_attention,
}
_MASKABLE = ("TransformerEncoderLayer", "MultiheadAttention")
_DESCRIBE = {
    "Hardswish": "x * clip(x + 3, 0, 6) / 6",
    "Hardsigmoid": "clip(x + 3, 0, 6) / 6",
    "GroupNorm": "mean/variance ops",
    "AvgPool2d": "depthwise conv",
    "GRU": "unrolled GRU cells",
    "LSTM": "unrolled LSTM cells",
    "TransformerEncoderLayer": "Python TransformerEncoderLayer",
    "MultiheadAttention": "Python MultiheadAttention",
}


def _unscript(module: torch.jit.ScriptModule) -> nn.Module | None:
    """A Python instance of the torch.nn class a scripted layer was made from (same parameter objects).

    Legacy ONNX tracing cannot call scripted layers from a Python graph; the attributes the
    Python forward needs are those its ``__init__`` sets and its ``__constants__``.
    """
    qualified = str(module._c._type().qualified_name()).split(".")
    path = ".".join(p for p in qualified[1:-1] if not p.startswith("___torch_mangle"))
    try:
        cls = getattr(importlib.import_module(path), qualified[-1])
    except (ImportError, AttributeError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return None
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or not (isinstance(klass, type) and issubclass(klass, nn.Module)):
            continue
        names |= set(getattr(klass, "__constants__", ()))
        try:
            names |= set(re.findall(r"self\.(\w+)\s*(?::[^=\n]+)?=", inspect.getsource(klass.__init__)))
        except (OSError, TypeError):
            pass
    for name, p in module.named_parameters(recurse=False):  # a loaded archive's are plain tensors
        obj.register_parameter(name, _param(p))
    for name, b in module.named_buffers(recurse=False):
        obj.register_buffer(name, b)
    for name, child in module.named_children():
        py = _unscript(child) if isinstance(child, torch.jit.ScriptModule) else child
        if py is None:
            return None
        obj.add_module(name, py)
    for name in sorted(names - set(obj._parameters) - set(obj._buffers) - set(obj._modules) - {"training"}):
        try:
            value = getattr(module, name)
        except (AttributeError, RuntimeError):
            continue
        if not callable(value) or isinstance(value, nn.Module):
            object.__setattr__(obj, name, value) if name in ("_parameters", "_buffers") else setattr(obj, name, value)
    obj.train(module.training)
    return obj


def _unsupported(qname: str, op: str, why: str) -> UnsupportedOpError:
    layer = f"layer {qname!r} ({op})"
    return UnsupportedOpError(f"cannot export {layer} for on-device training with ONNX Runtime: {why}", op=op, layer=layer)


# --------------------------------------------------------------------------- the pass


def _as_graph(module: nn.Module) -> fx.GraphModule | None:
    if isinstance(module, torch.jit.ScriptModule):
        try:
            return torchscript_to_fx(module)
        except Exception:  # noqa: BLE001 - exported as it is (the ONNX checks still apply)
            return None
    if isinstance(module, fx.GraphModule):
        return copy.deepcopy(module)
    try:
        return fx.symbolic_trace(copy.deepcopy(module))
    except Exception:  # noqa: BLE001
        return None


def _replace(root: nn.Module, qname: str, new: nn.Module) -> None:
    parent_name, _, attr = qname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _dropout_p(node: fx.Node, gm: fx.GraphModule) -> tuple[float, str] | None:
    """(p, layer) of a training-mode dropout node with p > 0, else None."""
    if node.op == "call_module":
        mod: Any = gm.get_submodule(str(node.target))
        if _is_torch_nn(mod, "Dropout") and float(mod.p) > 0:
            return float(mod.p), str(node.target)
        return None
    if node.op == "call_function" and node.target in (F.dropout, torch.dropout, torch.ops.aten.dropout):
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", node.kwargs.get("train", True))
        if isinstance(p, (int, float)) and p > 0 and train is not False:
            return float(p), f"the dropout call {node.name!r} in the segment's forward"
    return None


def _inner_dropout(module: nn.Module) -> bool:
    """Whether a (non-Dropout) layer applies dropout with p > 0 inside itself."""
    sub: Any
    for sub in module.modules():
        if _is_torch_nn(sub, "Dropout") and float(sub.p) > 0:
            return True
        p = getattr(sub, "dropout", None)
        if isinstance(p, float) and p > 0:
            return True
    return False


def prepare(module: nn.Module, example: torch.Tensor, *, trains_on_gradient: bool) -> Prepared:
    """The segment rewritten for ORT training (see the module docstring); ``module`` is not changed."""
    gm = _as_graph(module)
    if gm is None:
        return Prepared(module, module)
    rewritten: dict[str, str] = {}
    leaves = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for qname, mod in list(gm.named_modules()):
        if not qname or not any(qname == leaf or leaf.startswith(qname + ".") for leaf in leaves):
            continue
        kind = class_name(mod)
        build = _REWRITES.get(kind) if _is_torch_nn(mod, kind) else None
        if build is None and isinstance(mod, torch.jit.ScriptModule) and _is_torch_nn(mod, kind):
            build = _SCRIPTED_ONLY.get(kind)
        if build is None:
            continue
        new = build(mod, qname)
        if new is not None:
            _replace(gm, qname, new)
            rewritten[qname] = _DESCRIBE[kind]
    inner = [
        str(n.target) for n in gm.graph.nodes
        if trains_on_gradient and n.op == "call_module" and class_name(gm.get_submodule(str(n.target))) in _MASKABLE
        and _inner_dropout(gm.get_submodule(str(n.target)))
    ]
    needs_masks = bool(inner) or trains_on_gradient and any(_dropout_p(n, gm) is not None for n in gm.graph.nodes)
    if not rewritten and not needs_masks:
        return Prepared(module, module)  # nothing to rewrite: exported as it is
    for qname in sorted(leaves):
        try:
            mod = gm.get_submodule(qname)
        except AttributeError:
            continue  # inside a layer replaced above
        if isinstance(mod, torch.jit.ScriptModule):
            py = _unscript(mod)
            if py is None:
                return Prepared(module, module)  # exported as scripted (the ONNX checks still apply)
            _replace(gm, qname, py)
            rewritten.setdefault(qname, "Python " + class_name(mod))
    gm.recompile()
    for qname in inner:  # dropout inside attention: traced through, each nn.Dropout becomes a mask input
        _replace(gm, qname, _maskable(gm.get_submodule(qname), qname))
        rewritten[qname] = "attention with mask inputs for its dropouts"
    if inner:
        gm = fx.symbolic_trace(gm)
    eval_gm = gm
    masks: list[DropoutMask] = []
    if trains_on_gradient:
        gm, masks = _dropout_to_masks(gm, example)
    _check_same_output(module, eval_gm, example, rewritten)
    return Prepared(gm.train(), eval_gm.train(), masks, rewritten)


def _dropout_to_masks(gm: fx.GraphModule, example: torch.Tensor) -> tuple[fx.GraphModule, list[DropoutMask]]:
    sites = []
    for node in gm.graph.nodes:
        found = _dropout_p(node, gm)
        if found is not None:
            sites.append((node, *found))
        elif node.op == "call_module" and _inner_dropout(gm.get_submodule(str(node.target))):
            qname = str(node.target)
            raise _unsupported(
                qname,
                class_name(gm.get_submodule(qname)),
                "it applies dropout inside itself, and in a segment that trains on a received gradient the "
                "forward pass and the training step must use the same mask; set its dropout to 0, or "
                + _MOVE,
            )
    if not sites:
        return gm, []
    probe = copy.deepcopy(gm)
    ShapeProp(probe).propagate(example)
    shapes = {n.name: n.meta["tensor_meta"].shape for n in probe.graph.nodes if "tensor_meta" in n.meta}
    result = copy.deepcopy(gm)
    nodes = {n.name: n for n in result.graph.nodes}
    last_placeholder = [n for n in result.graph.nodes if n.op == "placeholder"][-1]
    masks = []
    for k, (site, p, layer) in enumerate(sites):
        node = nodes[site.name]
        name = f"{MASK_PREFIX}{k}"
        with result.graph.inserting_after(last_placeholder):
            mask = result.graph.placeholder(name)
        last_placeholder = mask
        with result.graph.inserting_after(node):
            product = result.graph.call_function(operator.mul, (node.args[0], mask))
        node.replace_all_uses_with(product)
        result.graph.erase_node(node)
        masks.append(DropoutMask(name, p, tuple(int(d) for d in shapes[site.name][1:]), layer))
    result.graph.lint()
    result.recompile()
    return result, masks


def _check_same_output(original: nn.Module, rewritten: nn.Module, example: torch.Tensor, what: dict[str, str]) -> None:
    if not what:
        return
    was = original.training
    try:
        with torch.no_grad():
            ref = original.eval()(example)
            out = rewritten.eval()(example)
    finally:
        original.train(was)
        rewritten.train()
    if isinstance(ref, tuple):
        ref, out = ref[0], out[0]
    diff = float((ref - out).abs().max()) if ref.shape == out.shape else float("inf")
    if not diff <= 1e-4 * max(1.0, float(ref.abs().max())):
        raise ExportError(
            f"internal error: rewriting {', '.join(f'{q!r} as {w}' for q, w in what.items())} changed the "
            f"segment's output by {diff:.2e}; please report this model"
        )
