"""Device runtimes: the reference (Python) implementations of what runs on the phone."""

from ._client import RemoteSegment, ServerClient, ServerError
from ._multiclient_http import HttpLink, client_names
from ._ort import OrtArtifacts, OrtRuntimeError, OrtSegment
from ._ort_runner import OrtRunner
from ._tflite import TfliteRuntimeError, TfliteSegment
from ._tflite_runner import TfliteRunner
from ._train import build_split_model

__all__ = [
    "HttpLink",
    "OrtArtifacts",
    "OrtRunner",
    "OrtRuntimeError",
    "OrtSegment",
    "RemoteSegment",
    "ServerClient",
    "ServerError",
    "TfliteRunner",
    "TfliteRuntimeError",
    "TfliteSegment",
    "build_split_model",
    "client_names",
]
