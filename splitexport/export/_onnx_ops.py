"""Export-time check of a segment's ONNX graph against what ONNX Runtime 1.19 can train.

Each problem is reported with the ONNX op, the torch layer it came from and a
way out, instead of failing later on the phone.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from .._errors import ExportError


class UnsupportedOpError(ExportError):
    """A segment contains an op that ONNX Runtime cannot train (as exported)."""

    def __init__(self, message: str, *, op: str, layer: str) -> None:
        super().__init__(message)
        self.op = op
        self.layer = layer


@dataclass(frozen=True)
class _Rule:
    why: str
    fix: str
    classes: tuple[str, ...]
    """torch module classes that export to the op (to name the layer)."""


_NO_GRADIENT = "ONNX Runtime has no gradient for it"
_MOVE = "cut the model so that this layer runs on the server, or replace it"

_RULES: dict[str, _Rule] = {
    "HardSwish": _Rule(
        _NO_GRADIENT,
        f"{_MOVE} (e.g. nn.Hardswish by x * nn.ReLU6()(x + 3) / 6, or nn.SiLU)",
        ("Hardswish",),
    ),
    "HardSigmoid": _Rule(_NO_GRADIENT, f"{_MOVE} (e.g. by nn.ReLU6()(x + 3) / 6)", ("Hardsigmoid",)),
    "Resize": _Rule(
        f"{_NO_GRADIENT} (no ResizeGrad kernel on CPU)",
        f"{_MOVE} (e.g. upsample with nn.ConvTranspose2d)",
        ("Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d"),
    ),
}


_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "HardSwish": ("hardswish",),
    "HardSigmoid": ("hardsigmoid",),
    "Resize": ("interpolate", "upsample"),
    "AveragePool": ("avg_pool", "adaptive_avg_pool"),
    "LayerNormalization": ("layer_norm",),
    "Dropout": ("dropout",),
}
"""torch functions that export to an op (to find the layer whose forward calls one)."""


def torch_layer_for(node: onnx.NodeProto, modules: Mapping[str, nn.Module], classes: tuple[str, ...] = ()) -> str:
    """The torch layer an ONNX node came from.

    The exporter names nodes after the module scope (``/block/act/HardSwish``);
    TorchScript exports keep only the innermost attribute name, which is
    matched against the ends of the qualified names. A node with no scope comes
    from a function call (``F.interpolate``): the layer whose own forward calls
    such a function is named.
    """
    kinds = {q: _class_name(m) for q, m in modules.items()}
    scope = [s for s in node.name.split("/")[1:-1] if s]
    candidates: list[str] = []
    for n in range(len(scope), 0, -1):
        suffix = ".".join(scope[-n:])
        candidates = [q for q in kinds if q and (q == suffix or q.endswith("." + suffix))]
        if candidates:
            break
    if not scope:
        words = _FUNCTIONS.get(node.op_type, ())
        candidates = [q for q, m in modules.items() if words and any(w in _own_source(m) for w in words)]
    if len(candidates) > 1 and classes:
        typed = [q for q in candidates if kinds[q] in classes]
        candidates = typed or candidates
    if len(candidates) == 1:
        q = candidates[0]
        if q:
            return f"layer {q!r} ({kinds[q]})"
        called = next(w for w in _FUNCTIONS[node.op_type] if w in _own_source(modules[q]))
        return f"the call of {called}() in the segment's forward (ONNX node {node.name!r})"
    if candidates:
        return "one of the layers " + ", ".join(repr(q) for q in candidates)
    if scope:
        return f"layer {'.'.join(scope)!r}"
    return f"a function call in the segment's forward (ONNX node {node.name or node.op_type!r})"


def _class_name(module: nn.Module) -> str:
    return str(getattr(module, "original_name", type(module).__name__))


def _own_source(module: nn.Module) -> str:
    """The module's own forward code (TorchScript ``code`` or the Python source)."""
    if isinstance(module, torch.jit.ScriptModule):
        try:
            return str(module.code)
        except Exception:  # noqa: BLE001 - a scripted module without a forward
            return ""
    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return ""


def check_trainable(
    model: onnx.ModelProto,
    modules: Mapping[str, nn.Module],
    *,
    segment: str,
    opset: int,
    dynamic_batch: bool,
    trains_on_gradient: bool,
) -> None:
    """Raise :class:`UnsupportedOpError` for the first op ONNX Runtime cannot train in this setting."""
    for node in model.graph.node:
        op = node.op_type
        rule = _RULES.get(op)
        if rule is not None:
            _raise(node, modules, segment, f"{rule.why}; {rule.fix}", rule.classes)
        if op == "AveragePool" and dynamic_batch:
            _raise(
                node,
                modules,
                segment,
                "its gradient crashes ONNX Runtime (SIGFPE) when the batch dimension is dynamic; export with a "
                "fixed batch (`--batch-size N`), use nn.AdaptiveAvgPool2d(1) (exported as GlobalAveragePool), "
                "or cut the model so that this layer runs on the server",
                ("AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d"),
            )
        if op == "Dropout" and trains_on_gradient and _dropout_ratio(model, node) != 0.0:
            _raise(
                node,
                modules,
                segment,
                "the forward pass that produces the activation to send and the training step would draw "
                "different dropout masks, so the step would not be exact; move the dropout to the last segment "
                "or the server, or set p=0",
                ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"),
            )


def _raise(
    node: onnx.NodeProto, modules: Mapping[str, nn.Module], segment: str, why: str, classes: tuple[str, ...]
) -> None:
    layer = torch_layer_for(node, modules, classes)
    raise UnsupportedOpError(
        f"segment {segment}: cannot export {layer} for on-device training with ONNX Runtime: it becomes the "
        f"ONNX op {node.op_type} and {why}",
        op=node.op_type,
        layer=layer,
    )


def _dropout_ratio(model: onnx.ModelProto, node: onnx.NodeProto) -> float | None:
    """The constant ratio of a Dropout node (``None`` when it is not a constant)."""
    if len(node.input) < 2 or not node.input[1]:
        return 0.5
    name = node.input[1]
    for init in model.graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init))
    for n in model.graph.node:
        if n.op_type == "Constant" and name in n.output:
            for attr in n.attribute:
                if attr.name == "value":
                    return float(numpy_helper.to_array(helper.get_attribute_value(attr)))
    return None
