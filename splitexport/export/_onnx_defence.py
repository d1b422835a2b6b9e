"""The privacy defences in A's ONNX Runtime training artifacts (:mod:`splitexport.defence`, docs/privacy.md).

- Activation noise: the forward model (what produces the activation to send) takes one more input,
  ``activation_noise`` (standard normal, shaped like the output, drawn by the device runtime) and returns
  ``output + S * activation_noise``. The training model is unchanged: the gradient of ``sum(out * g)`` at ``out``
  is ``g`` with or without the added noise. A runtime that does not know the defence cannot run the forward model
  without feeding the noise, so it cannot silently send clean activations.
- NoPeek: the training model's loss becomes ``sum(output * grad_output) + W * dCor(input, output)``, built from
  plain ONNX ops that ORT can differentiate, op for op as :func:`splitexport.defence.distance_correlation`.

The forward model's metadata ``splitexport.defence`` records both (read by ``device_runtime.OrtSegment``).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .._manifest import DefenceSpec
from ..defence import EPS
from . import _onnx_graph as graph

NOISE_INPUT = "activation_noise"
DEFENCE_METADATA = "splitexport.defence"
"""Forward-model metadata: JSON ``{"nopeek", "activation_noise", "noise_input", "noise_shape"}``."""


def _const(g: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    g.node.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
    return name


def add_activation_noise(model: onnx.ModelProto, spec: DefenceSpec) -> None:
    """Forward model: ``output`` becomes ``output + S * activation_noise``; records the defence in the metadata."""
    g = model.graph
    out = next(o for o in g.output if o.name == graph.OUTPUT)
    shape = [d.dim_value for d in out.type.tensor_type.shape.dim[1:]]
    if spec.activation_noise > 0:
        clean = "nopeek_clean_output"
        for node in g.node:
            node.output[:] = [clean if o == graph.OUTPUT else o for o in node.output]
            node.input[:] = [clean if i == graph.OUTPUT else i for i in node.input]
        noise = helper.make_tensor_value_info(NOISE_INPUT, TensorProto.FLOAT, [out.type.tensor_type.shape.dim[0].dim_param
                                                                             or out.type.tensor_type.shape.dim[0].dim_value,
                                                                             *shape])
        g.input.append(noise)
        scale = _const(g, "activation_noise_scale", np.array(spec.activation_noise, dtype=np.float32))
        g.node.append(helper.make_node("Mul", [NOISE_INPUT, scale], ["activation_noise_scaled"]))
        g.node.append(helper.make_node("Add", [clean, "activation_noise_scaled"], [graph.OUTPUT]))
    meta = {p.key: p.value for p in model.metadata_props}
    meta[DEFENCE_METADATA] = json.dumps({"nopeek": spec.nopeek, "activation_noise": spec.activation_noise,
                                         "noise_input": NOISE_INPUT if spec.activation_noise > 0 else None,
                                         "noise_shape": shape})
    helper.set_model_props(model, meta)


def _mean(g: onnx.GraphProto, src: str, dst: str, axes: list[int] | None, opset: int) -> str:
    """ReduceMean over ``axes`` (keepdims) or over everything (a scalar), in the form of ``opset``."""
    keep = 1 if axes is not None else 0
    if axes is None:
        g.node.append(helper.make_node("ReduceMean", [src], [dst], keepdims=0))
    elif opset >= 18:
        ax = _const(g, dst + "_axes", np.array(axes, dtype=np.int64))
        g.node.append(helper.make_node("ReduceMean", [src, ax], [dst], keepdims=keep))
    else:
        g.node.append(helper.make_node("ReduceMean", [src], [dst], axes=axes, keepdims=keep))
    return dst


def _distances(g: onnx.GraphProto, src: str, tag: str, eps: str) -> str:
    """``sqrt(|r_i - r_j|^2 + EPS)`` between the rows of ``src`` (flattened)."""
    n = f"nopeek_{tag}"
    g.node.append(helper.make_node("Flatten", [src], [n + "_flat"], axis=1))
    ax1 = _const(g, n + "_ax1", np.array([1], dtype=np.int64))
    ax0 = _const(g, n + "_ax0", np.array([0], dtype=np.int64))
    ax2 = _const(g, n + "_ax2", np.array([2], dtype=np.int64))
    g.node.append(helper.make_node("Unsqueeze", [n + "_flat", ax1], [n + "_rows"]))
    g.node.append(helper.make_node("Unsqueeze", [n + "_flat", ax0], [n + "_cols"]))
    g.node.append(helper.make_node("Sub", [n + "_rows", n + "_cols"], [n + "_diff"]))
    g.node.append(helper.make_node("Mul", [n + "_diff", n + "_diff"], [n + "_diff2"]))
    g.node.append(helper.make_node("ReduceSum", [n + "_diff2", ax2], [n + "_sq"], keepdims=0))
    g.node.append(helper.make_node("Add", [n + "_sq", eps], [n + "_sqe"]))
    g.node.append(helper.make_node("Sqrt", [n + "_sqe"], [n + "_dist"]))
    return n + "_dist"


def _centred(g: onnx.GraphProto, d: str, opset: int) -> str:
    m0 = _mean(g, d, d + "_m0", [0], opset)
    m1 = _mean(g, d, d + "_m1", [1], opset)
    m = _mean(g, d, d + "_m", None, opset)
    g.node.append(helper.make_node("Sub", [d, m0], [d + "_c0"]))
    g.node.append(helper.make_node("Sub", [d + "_c0", m1], [d + "_c1"]))
    g.node.append(helper.make_node("Add", [d + "_c1", m], [d + "_centred"]))
    return d + "_centred"


def add_nopeek(g: onnx.GraphProto, loss: str, *, weight: float, opset: int) -> str:
    """Append ``loss + weight * dCor(input, output)`` to the training graph ``g``; returns the new loss name."""
    eps = _const(g, "nopeek_eps", np.array(EPS, dtype=np.float32))
    dx = _distances(g, graph.INPUT, "x", eps)
    dz = _distances(g, graph.OUTPUT, "z", eps)
    a, b = _centred(g, dx, opset), _centred(g, dz, opset)
    for name, (p, q) in {"xz": (a, b), "xx": (a, a), "zz": (b, b)}.items():
        g.node.append(helper.make_node("Mul", [p, q], [f"nopeek_prod_{name}"]))
        _mean(g, f"nopeek_prod_{name}", f"nopeek_dcov_{name}", None, opset)
    g.node.append(helper.make_node("Mul", ["nopeek_dcov_xx", "nopeek_dcov_zz"], ["nopeek_vv"]))
    g.node.append(helper.make_node("Add", ["nopeek_vv", eps], ["nopeek_vve"]))
    g.node.append(helper.make_node("Sqrt", ["nopeek_vve"], ["nopeek_norm"]))
    g.node.append(helper.make_node("Div", ["nopeek_dcov_xz", "nopeek_norm"], ["nopeek_ratio"]))
    g.node.append(helper.make_node("Relu", ["nopeek_ratio"], ["nopeek_dcor2"]))
    g.node.append(helper.make_node("Add", ["nopeek_dcor2", eps], ["nopeek_dcor2e"]))
    g.node.append(helper.make_node("Sqrt", ["nopeek_dcor2e"], ["nopeek_dcor"]))
    w = _const(g, "nopeek_weight", np.array(weight, dtype=np.float32))
    g.node.append(helper.make_node("Mul", ["nopeek_dcor", w], ["nopeek_term"]))
    g.node.append(helper.make_node("Add", [loss, "nopeek_term"], ["nopeek_loss"]))
    return "nopeek_loss"
