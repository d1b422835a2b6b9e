"""Exporters of a bundle's device segments to phone formats."""

from ._layergraph import SUPPORTED_LAYERS as TF_SUPPORTED_LAYERS
from ._onnx import DeviceOptimizer, export_onnx, export_segment_onnx
from ._onnx_ops import UnsupportedOpError
from ._tfjs import export_tfjs_segment
from ._tflite import export_tflite_segment

__all__ = [
    "TF_SUPPORTED_LAYERS",
    "DeviceOptimizer",
    "UnsupportedOpError",
    "export_onnx",
    "export_segment_onnx",
    "export_tfjs_segment",
    "export_tflite_segment",
]
