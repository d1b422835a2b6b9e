"""Wire format: safetensors-framed tensors, validated against the manifest before use."""

from __future__ import annotations

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from splitexport import TensorSpec
from splitexport.strategies import ServerReply

from ._errors import APIError
from ._timing import timed

MEDIA_TYPE = "application/vnd.safetensors"
ACCEPTED_MEDIA_TYPES = (MEDIA_TYPE, "application/octet-stream")
FLOAT_TRANSPORT = {"F32": np.float32, "F16": np.float16}


def decode(body: bytes) -> dict[str, np.ndarray]:
    """Parse a safetensors body; 400 if it is malformed or truncated."""
    if not body:
        raise APIError(400, "empty_body", "the request body is empty; send safetensors-encoded tensors")
    try:
        return st_load(body)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise APIError(400, "malformed_body", f"the body is not valid safetensors: {exc}") from exc


@timed("encode")
def encode(tensors: dict[str, torch.Tensor], float_dtype: type = np.float32) -> bytes:
    """Encode tensors; floating ones travel as ``float_dtype`` (float32 or float16)."""
    arrays = {}
    for name, t in tensors.items():
        a = t.detach().cpu().numpy()
        a = a.astype(float_dtype) if np.issubdtype(a.dtype, np.floating) else a
        arrays[name] = np.ascontiguousarray(a)  # safetensors writes the raw buffer
    return st_save(arrays)


def encode_reply(reply: ServerReply, float_dtype: type, extra: dict[str, torch.Tensor] | None = None) -> bytes:
    """A server step's answer to one device: ``extra``, then whichever of grad, loss, output it has."""
    tensors: dict[str, torch.Tensor] = dict(extra or {})
    if reply.grad is not None:
        tensors["grad"] = reply.grad
    if reply.loss is not None:
        tensors["loss"] = torch.tensor([reply.loss])
    if reply.output is not None:
        tensors["output"] = reply.output
    return encode(tensors, float_dtype)


@timed("decode")
def float_tensor(arrays: dict[str, np.ndarray], name: str, spec: TensorSpec, max_batch: int) -> tuple[torch.Tensor, type]:
    """The float tensor ``name`` checked against ``spec``; returns it as float32 and its transport dtype."""
    if name not in arrays:
        raise APIError(422, "missing_tensor", f"the body has no tensor {name!r}", expected=[name], got=sorted(arrays))
    a = arrays[name]
    if a.dtype not in (np.float32, np.float16):
        raise APIError(422, "wrong_dtype", f"{name} must be float32 (or float16 for transport), got {a.dtype}",
                       tensor=name, expected="float32", got=str(a.dtype))
    expected = list(spec.sample_shape)
    if a.ndim != len(expected) + 1 or list(a.shape[1:]) != expected:
        raise APIError(422, "wrong_shape", f"{name} must have shape [batch, {', '.join(map(str, expected))}], "
                       f"got {list(a.shape)}", tensor=name, expected=["batch", *expected], got=list(a.shape))
    if a.shape[0] < 1 or a.shape[0] > max_batch:
        raise APIError(422, "wrong_batch", f"{name} has batch {a.shape[0]}; allowed 1..{max_batch}", tensor=name)
    if not np.isfinite(a).all():
        raise APIError(422, "non_finite", f"{name} contains NaN or Inf values", tensor=name)
    return torch.from_numpy(a.astype(np.float32)), a.dtype.type


@timed("decode")
def label_tensor(arrays: dict[str, np.ndarray], batch: int, loss_kind: str, num_outputs: int) -> torch.Tensor:
    """The ``labels`` tensor: int64 class ids for cross-entropy, float targets for MSE."""
    if "labels" not in arrays:
        raise APIError(422, "missing_tensor", "the body has no tensor 'labels'", expected=["labels"], got=sorted(arrays))
    a = arrays["labels"]
    if a.shape[:1] != (batch,):
        raise APIError(422, "wrong_shape", f"labels must have batch {batch}, got shape {list(a.shape)}", tensor="labels")
    if loss_kind == "cross_entropy":
        if a.dtype not in (np.int64, np.int32) or a.ndim != 1:
            raise APIError(422, "wrong_dtype", f"labels must be a 1-d int64 tensor, got {a.dtype} {list(a.shape)}",
                           tensor="labels")
        if a.min() < 0 or a.max() >= num_outputs:
            raise APIError(422, "label_out_of_range", f"labels must be in [0, {num_outputs})", tensor="labels")
        return torch.from_numpy(a.astype(np.int64))
    if a.dtype not in (np.float32, np.float16) or not np.isfinite(a).all():
        raise APIError(422, "wrong_dtype", "regression labels must be finite float32", tensor="labels")
    return torch.from_numpy(a.astype(np.float32))
