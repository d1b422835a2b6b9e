"""Device runtimes: the reference (Python) implementations of what runs on the phone."""

from ._client import RemoteSegment, ServerClient, ServerError
from ._ort import OrtArtifacts, OrtRuntimeError, OrtSegment
from ._ort_runner import OrtRunner
from ._tflite import TfliteRuntimeError, TfliteSegment

__all__ = ["OrtArtifacts", "OrtRunner", "OrtRuntimeError", "OrtSegment", "RemoteSegment", "ServerClient", "ServerError", "TfliteRuntimeError", "TfliteSegment"]
