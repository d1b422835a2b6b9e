"""Wire format: safetensors-framed tensors, validated against the manifest before use."""

from __future__ import annotations

import numpy as np
import torch

from splitexport import TensorSpec, protocol
from splitexport.protocol import ACCEPTED_MEDIA_TYPES, MEDIA_TYPE, ErrorCode, ProtocolError, ServerReply

from ._errors import APIError
from ._timing import timed

__all__ = ["ACCEPTED_MEDIA_TYPES", "MEDIA_TYPE", "check_targets", "decode", "encode", "encode_exact", "encode_reply",
           "float_tensor", "label_tensor"]


def decode(body: bytes) -> dict[str, np.ndarray]:
    """Parse a safetensors body (:func:`splitexport.protocol.decode`: header size, tensor count and dtypes are
    checked before anything is parsed); 400/413/422 if it breaks the contract."""
    try:
        return protocol.decode(body)
    except ProtocolError as exc:
        raise APIError.from_protocol(exc) from exc


@timed("encode")
def encode(tensors: dict[str, torch.Tensor], float_dtype: type = np.float32) -> bytes:
    """Encode tensors; floating ones travel as ``float_dtype`` (float32 or float16)."""
    return protocol.encode({name: t.detach().cpu().numpy() for name, t in tensors.items()}, float_dtype)


def encode_exact(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors as safetensors in their own dtypes (a step's inputs for the step log; ``safetensors.torch.load``
    reads them back). Through numpy: a third of ``safetensors.torch.save``'s time for a step's tensors."""
    return protocol.encode({name: t.detach().cpu().numpy() for name, t in tensors.items()})


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
        raise APIError.of(ErrorCode.MISSING_TENSOR, f"the body has no tensor {name!r}", expected=[name],
                          got=sorted(arrays))
    a = arrays[name]
    if a.dtype not in (np.float32, np.float16):
        raise APIError.of(ErrorCode.WRONG_DTYPE, f"{name} must be float32 (or float16 for transport), got {a.dtype}",
                       tensor=name, expected="float32", got=str(a.dtype))
    expected = list(spec.sample_shape)
    if a.ndim != len(expected) + 1 or list(a.shape[1:]) != expected:
        raise APIError.of(ErrorCode.WRONG_SHAPE, f"{name} must have shape [batch, {', '.join(map(str, expected))}], "
                       f"got {list(a.shape)}", tensor=name, expected=["batch", *expected], got=list(a.shape))
    if a.shape[0] < 1 or a.shape[0] > max_batch:
        raise APIError.of(ErrorCode.WRONG_BATCH, f"{name} has batch {a.shape[0]}; allowed 1..{max_batch}", tensor=name)
    if not np.isfinite(a).all():
        raise APIError.of(ErrorCode.NON_FINITE, f"{name} contains NaN or Inf values", tensor=name)
    return torch.from_numpy(a.astype(np.float32)), a.dtype.type


@timed("decode")
def label_tensor(arrays: dict[str, np.ndarray], batch: int, loss_kind: str, num_outputs: int) -> torch.Tensor:
    """The ``labels`` tensor: int64 class ids for cross-entropy, float targets for MSE."""
    if "labels" not in arrays:
        raise APIError.of(ErrorCode.MISSING_TENSOR, "the body has no tensor 'labels'", expected=["labels"],
                          got=sorted(arrays))
    a = arrays["labels"]
    if a.shape[:1] != (batch,):
        raise APIError.of(ErrorCode.WRONG_SHAPE, f"labels must have batch {batch}, got shape {list(a.shape)}",
                          tensor="labels")
    if loss_kind == "cross_entropy":
        if a.dtype not in (np.int64, np.int32):
            raise APIError.of(ErrorCode.WRONG_DTYPE, f"labels must be int64 class ids, got {a.dtype}", tensor="labels")
        if a.ndim != 1:
            raise APIError.of(ErrorCode.WRONG_SHAPE, f"labels must have shape [batch], got {list(a.shape)}",
                              tensor="labels")
        if a.min() < 0 or a.max() >= num_outputs:
            raise APIError.of(ErrorCode.LABEL_OUT_OF_RANGE, f"labels must be in [0, {num_outputs})", tensor="labels")
        return torch.from_numpy(a.astype(np.int64))
    if a.dtype not in (np.float32, np.float16):
        raise APIError.of(ErrorCode.WRONG_DTYPE, f"MSE targets must be float32, got {a.dtype}", tensor="labels")
    if not np.isfinite(a).all():
        raise APIError.of(ErrorCode.NON_FINITE, "labels contains NaN or Inf values", tensor="labels")
    return torch.from_numpy(a.astype(np.float32))


def check_targets(arrays: dict[str, np.ndarray], output: TensorSpec, loss_kind: str) -> None:
    """MSE targets must have exactly the shape of B's output, ``[batch, *output]`` (422 wrong_shape).

    Checked before B runs, so a refused call leaves B (and its BatchNorm statistics) as it was.
    """
    if loss_kind != "mse" or "labels" not in arrays or "activation" not in arrays:
        return  # the other checks of the call name what is missing
    labels, batch = arrays["labels"], arrays["activation"].shape[:1]
    expected = [*batch, *output.sample_shape]
    if list(labels.shape) != expected:
        raise APIError.of(ErrorCode.WRONG_SHAPE, f"MSE targets must have the output's shape {expected}, got "
                          f"{list(labels.shape)}", tensor="labels", expected=["batch", *output.sample_shape],
                          got=list(labels.shape))
