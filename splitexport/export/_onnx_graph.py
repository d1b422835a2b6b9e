"""ONNX graph surgery for on-device training artifacts (pure ``onnx``; no torch, no ORT).

Three facts of ONNX Runtime training 1.19 shape this module:

* A training-mode ``BatchNormalization`` writes its running-statistics outputs
  into the buffers of its running-statistics *inputs* (the kernel aliases
  outputs 1/2 to inputs 3/4), so a running mean fed from the checkpoint is
  updated in place by every step that runs the node. It uses the biased batch
  variance where torch uses the unbiased one.
* The training API hides graph outputs whose names end in ``_grad`` and
  expects a gradient-accumulation buffer for every gradient it builds.
* Models newer than IR version 10 are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MAX_IR_VERSION = 10

INPUT = "input"
"""The segment's input in every artifact."""
OUTPUT = "output"
"""The segment's output (activation or logits) in the forward and eval models."""
GRAD_OUTPUT = "grad_output"
"""Training-model input of a segment that trains on a received gradient: ``dL/d(output)``."""
LABELS = "labels"
"""Training-model input of the last segment: class indices (cross-entropy) or targets (MSE)."""
INPUT_GRADIENT = "input_gradient"
"""Training-model output of the last segment: ``dL/d(input)`` (a name not ending in ``_grad``)."""


def ensure_ir_version(model: onnx.ModelProto, limit: int = MAX_IR_VERSION) -> None:
    """Lower the IR version stamp to what ONNX Runtime 1.19 loads (the content is unchanged)."""
    model.ir_version = min(model.ir_version, limit)


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {init.name for init in model.graph.initializer}


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes none of whose outputs reach a graph output (e.g. TorchScript's batch-size checks)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o and o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # outer-scope names used by subgraphs
                for sub in _subgraphs(attr):
                    needed.update(_outer_names(sub))
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:
        for attr in n.attribute:
            for sub in _subgraphs(attr):
                used |= _outer_names(sub)
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    names = {i for n in graph.node for i in n.input if i}
    for n in graph.node:
        for attr in n.attribute:
            for sub in _subgraphs(attr):
                names |= _outer_names(sub)
    return names


def batchnorm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Training-mode BatchNormalization nodes whose running statistics are initializers."""
    inits = initializer_names(model)
    return [
        n
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
        and _attr(n, "training_mode", 0) == 1
        and len(n.input) >= 5
        and n.input[3] in inits
        and n.input[4] in inits
    ]


def running_statistics(model: onnx.ModelProto) -> list[str]:
    """Names of the BatchNorm running means and variances (checkpoint entries without gradient)."""
    names: list[str] = []
    for n in batchnorm_nodes(model):
        names += [n.input[3], n.input[4]]
    return names


def isolate_batchnorm_statistics(model: onnx.ModelProto, *, update: bool) -> None:
    """Stop training-mode BatchNorm nodes from writing to the checkpoint's running statistics.

    Each node gets private scratch buffers for inputs 3/4 (its normalised output
    does not depend on them in training mode). With ``update=True`` a second,
    statistics-only BatchNorm node per layer reads the real running statistics
    and the batch rescaled by ``sqrt(n / (n - 1))`` about its mean, so the
    in-place update ONNX Runtime performs is torch's: ``(1 - m) * r + m * mean``
    and ``(1 - m) * r + m * unbiased_var``. Nothing consumes that node's output,
    so no gradient flows through it.
    """
    graph = model.graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    bn_outputs = {n.output[0] for n in batchnorm_nodes(model)}
    new_nodes: list[onnx.NodeProto] = []
    for original in graph.node:
        node = copy.deepcopy(original)
        new_nodes.append(node)
        if node.output[0] not in bn_outputs:
            continue
        prefix = f"{node.name or node.output[0]}/stats"
        mean_name, var_name = node.input[3], node.input[4]
        stats_node = copy.deepcopy(node)
        for k, fill in ((3, 0.0), (4, 1.0)):
            scratch = f"{prefix}/scratch{k}"
            graph.initializer.append(
                numpy_helper.from_array(np.full(shapes[node.input[k]], fill, dtype=np.float32), scratch)
            )
            node.input[k] = scratch
        if not update:
            continue
        x = node.input[0]
        rank = _rank_of(model, x)
        axes = [0, *range(2, rank)]
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(axes, dtype=np.int64), f"{prefix}/axes"),
                numpy_helper.from_array(np.array(1.0, dtype=np.float32), f"{prefix}/one"),
            ]
        )
        p = prefix
        new_nodes += [
            helper.make_node("Size", [x], [f"{p}/size"], name=f"{p}/Size"),
            helper.make_node("Shape", [x], [f"{p}/channels"], start=1, end=2, name=f"{p}/Shape"),
            helper.make_node("Div", [f"{p}/size", f"{p}/channels"], [f"{p}/n_int"], name=f"{p}/DivN"),
            helper.make_node("Cast", [f"{p}/n_int"], [f"{p}/n"], to=TensorProto.FLOAT, name=f"{p}/Cast"),
            helper.make_node("Sub", [f"{p}/n", f"{p}/one"], [f"{p}/n_minus_1"], name=f"{p}/SubOne"),
            helper.make_node("Div", [f"{p}/n", f"{p}/n_minus_1"], [f"{p}/bessel"], name=f"{p}/Bessel"),
            helper.make_node("Sqrt", [f"{p}/bessel"], [f"{p}/scale"], name=f"{p}/Sqrt"),
            helper.make_node("ReduceSum", [x, f"{p}/axes"], [f"{p}/sum"], keepdims=1, name=f"{p}/ReduceSum"),
            helper.make_node("Div", [f"{p}/sum", f"{p}/n"], [f"{p}/mean"], name=f"{p}/Mean"),
            helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/centred"], name=f"{p}/Centre"),
            helper.make_node("Mul", [f"{p}/centred", f"{p}/scale"], [f"{p}/scaled"], name=f"{p}/Scale"),
            helper.make_node("Add", [f"{p}/scaled", f"{p}/mean"], [f"{p}/rescaled"], name=f"{p}/Shift"),
        ]
        stats_node.name = f"{p}/BatchNormalization"
        stats_node.input[0] = f"{p}/rescaled"
        stats_node.input[3], stats_node.input[4] = mean_name, var_name
        del stats_node.output[:]
        stats_node.output.extend([f"{p}/y", f"{p}/running_mean", f"{p}/running_var"])
        new_nodes.append(stats_node)
    del graph.node[:]
    graph.node.extend(new_nodes)


def _rank_of(model: onnx.ModelProto, name: str) -> int:
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return 4


def to_inference_mode(model: onnx.ModelProto) -> None:
    """BatchNorm uses its running statistics and Dropout is the identity."""
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            for attr in node.attribute:
                if attr.name == "training_mode":
                    attr.i = 0
            del node.output[1:]
        elif node.op_type == "Dropout":
            del node.input[2:]  # training_mode defaults to false
            del node.output[1:]


def move_initializers_to_inputs(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Turn the named initializers into graph inputs (the training API feeds them from the checkpoint)."""
    wanted = set(names)
    keep = []
    for init in model.graph.initializer:
        if init.name in wanted:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def expose_input_gradient(model: onnx.ModelProto, input_name: str = INPUT, output_name: str = INPUT_GRADIENT) -> None:
    """Return ``d(loss)/d(input)`` from a training model built with the input in ``requires_grad``.

    The artifact generator treats the input like a parameter: it accumulates the
    gradient into a buffer the training API never provides. Drop the
    accumulator and its buffer, and route the raw gradient to a new graph output.
    """
    graph = model.graph
    grad = f"{input_name}_grad"
    buffer = f"{grad}.accumulation.buffer"
    flag = f"{grad}.accumulation.out"
    accumulators = [n for n in graph.node if n.op_type == "InPlaceAccumulatorV2" and buffer in n.input]
    if len(accumulators) != 1 or not any(grad in n.output for n in graph.node):
        raise ValueError(f"training model has no gradient for {input_name!r} to expose")
    graph.node.remove(accumulators[0])
    _remove_named(graph.input, buffer)
    _remove_named(graph.output, flag)
    graph.node.append(helper.make_node("Identity", [grad], [output_name], name=f"{output_name}/Identity"))
    source = next(i for i in graph.input if i.name == input_name)
    out = copy.deepcopy(source)
    out.name = output_name
    graph.output.insert(1, out)


def _remove_named(container: object, name: str) -> None:
    items = list(container)  # type: ignore[call-overload]
    for item in items:
        if item.name == name:
            container.remove(item)  # type: ignore[attr-defined]


def complete_layer_norm_outputs(model: onnx.ModelProto) -> None:
    """Give every LayerNormalization node its optional Mean and InvStdDev outputs, and every Dropout its mask.

    ONNX Runtime 1.19's LayerNormalization and Dropout gradient builders read them; without
    them artifact generation fails an output-count assertion (opset >= 17; a Dropout inside
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` exports without its mask).
    """
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            base = node.name or node.output[0]
            node.output.extend([f"{base}/saved_mean", f"{base}/saved_inv_std_dev"])
        elif node.op_type == "Dropout" and len(node.output) == 1:
            node.output.append(f"{node.name or node.output[0]}/mask")


def keep_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Make ``names`` the graph outputs and drop what no longer feeds them."""
    by_name = {o.name: o for o in model.graph.output}
    del model.graph.output[:]
    model.graph.output.extend(by_name[n] for n in names)
    remove_dead_nodes(model)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return default
