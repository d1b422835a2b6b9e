"""Exporters of a bundle's device segments to phone formats: ``export(bundle, "onnx" | "tfjs" | "tflite", options)``.

The op table behind the TF.js / TFLite mapping (and the support matrix of every format) is
:mod:`splitexport.export.ops`.
"""

from ._api import FORMATS, export
from ._layergraph import SUPPORTED_LAYERS as TF_SUPPORTED_LAYERS
from ._layergraph import tf_to_torch_layout
from ._onnx import DeviceOptimizer, export_onnx, export_segment_onnx
from ._onnx_ops import UnsupportedOpError
from ._options import ExportOptions, OnnxOptions, TfjsOptions, TfliteOptions
from ._tfjs import export_tfjs_segment
from ._tflite import export_tflite_segment

__all__ = [
    "FORMATS",
    "TF_SUPPORTED_LAYERS",
    "DeviceOptimizer",
    "ExportOptions",
    "OnnxOptions",
    "TfjsOptions",
    "TfliteOptions",
    "UnsupportedOpError",
    "export",
    "export_onnx",
    "export_segment_onnx",
    "export_tfjs_segment",
    "export_tflite_segment",
    "tf_to_torch_layout",
]
