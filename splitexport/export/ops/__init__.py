"""The one op table: every torch op the exports know, per family module.

``REGISTRY.ops`` lists :class:`OpSpec` entries (torch forms, ONNX / TF.js / TFLite flex /
TFLite builtin handling, restrictions, IR mapping); ``REGISTRY.kinds`` the IR layer kinds
with their Keras layer, TensorFlow forward and builtin-ops backward. Adding an op family
means adding a module that calls :func:`register` and naming it in :data:`FAMILIES`.
``python -m splitexport.export.ops`` rewrites the generated table in ``docs/ops.md``.
"""

from __future__ import annotations

import importlib

from ._registry import (
    REGISTRY,
    FormatSupport,
    KerasContext,
    LayerKind,
    OpSpec,
    Registry,
    decomposed,
    native,
    refused,
    register,
)

FAMILIES = ("conv", "linear", "norm", "activation", "pool", "shape", "elementwise", "dropout",
            "embedding", "recurrent", "attention", "structural")
"""Family modules, in the order of the generated table."""

for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")

__all__ = [
    "FAMILIES",
    "REGISTRY",
    "FormatSupport",
    "KerasContext",
    "LayerKind",
    "OpSpec",
    "Registry",
    "decomposed",
    "native",
    "refused",
    "register",
]
