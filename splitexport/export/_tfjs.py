"""TF.js export: trainable layers-model artifacts for the device segments.

Each segment becomes ``model.json`` (format ``layers-model``: Keras topology +
weights manifest) with little-endian float32 weight shards, written by
``tensorflowjs`` from the tf_keras model of :mod:`._keras`, plus
``splitexport.json``: what the JS device runtime (``device_runtime/js``) needs to
train it (role, loss, optimizer, shapes, weight-name map back to torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._errors import ExportError
from .._manifest import OptimizerSpec
from ._keras import check_device_segment, keras_model
from ._layergraph import LayerGraph, segment_exporter
from ._options import optimizer_spec

META_FORMAT = "splitexport-tfjs/1"
META_FILE = "splitexport.json"

__all__ = ["META_FILE", "META_FORMAT", "export_tfjs_segment", "write_tfjs"]


def write_tfjs(
    graph: LayerGraph,
    out_dir: str | Path,
    *,
    is_last: bool,
    loss: str = "cross_entropy",
    optimizer: OptimizerSpec | Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the TF.js artifacts of ``graph`` into ``out_dir``; returns artifact kind -> file."""
    # tensorflowjs imports tensorflow_decision_forests, whose welcome message imports IPython
    # (not installed) whenever stdout is not a terminal: CI, pipes, pytest.
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    import tensorflowjs as tfjs

    if loss not in ("cross_entropy", "mse"):
        raise ExportError(f"unknown loss kind {loss!r}; expected cross_entropy or mse")
    opt = optimizer_spec(optimizer).model_dump(mode="json")
    check_device_segment(graph, is_last)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tfjs.converters.save_keras_model(keras_model(graph), str(out))
    manifest = json.loads((out / "model.json").read_text())
    files: dict[str, Path] = {"model": out / "model.json"}
    for group in manifest["weightsManifest"]:
        for rel in group["paths"]:
            files[f"weights:{rel}"] = out / rel
    meta = {
        "format": META_FORMAT,
        "is_last": is_last,
        "trains_with": "labels" if is_last else "gradient",
        "loss": loss,
        "optimizer": opt,
        "input_shape": list(graph.input_shape),
        "input_dtype": "float32" if graph.layers[0].attrs.get("dtype", "float32") == "float32" else "int32",
        "output_shape": list(graph.output_shape),
        "torch_names": graph.torch_name_map(),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    files["meta"] = out / META_FILE
    return files


export_tfjs_segment = segment_exporter(
    write_tfjs, "Export one device segment (fx GraphModule or TorchScript) as TF.js artifacts."
)
