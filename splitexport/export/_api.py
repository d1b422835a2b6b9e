"""``export(bundle, format, options)``: one entry point for every device format.

One loop over the bundle's device segments for TF.js and TFLite (ONNX through
:func:`._onnx.export_onnx`); the artifacts land in the bundle with their sha256.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ExportError
from ._options import ExportOptions, Format, OnnxOptions, TfjsOptions, TfliteOptions

if TYPE_CHECKING:
    from .._bundle import Bundle

__all__ = ["FORMATS", "export"]

FORMATS: tuple[Format, ...] = ("onnx", "tfjs", "tflite")
_OPTIONS: dict[str, type] = {"onnx": OnnxOptions, "tfjs": TfjsOptions, "tflite": TfliteOptions}


def export(bundle: Bundle | str | Path, fmt: Format, options: ExportOptions | None = None) -> Bundle:
    """Export every device segment of ``bundle`` to ``fmt`` and record the files in its manifest.

    ``options`` is the format's options class (:class:`OnnxOptions`, :class:`TfjsOptions`,
    :class:`TfliteOptions`; ``None``: defaults). Their ``optimizer`` (``None``: the bundle's)
    is what the device trains with. Raises :class:`~splitexport.ExportError` before any
    artifact is recorded when a segment cannot be exported.
    """
    from .._bundle import Bundle, load_bundle

    if fmt not in _OPTIONS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    opts: ExportOptions = options if options is not None else _OPTIONS[fmt]()
    if not isinstance(opts, _OPTIONS[fmt]):
        raise ExportError(f"the {fmt} export takes {_OPTIONS[fmt].__name__}, not {type(opts).__name__}")
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    optimizer = opts.optimizer or b.manifest.optimizer
    if fmt != "onnx" and b.manifest.defence.active:
        raise ExportError(f"the bundle's defence (nopeek={b.manifest.defence.nopeek:g}, activation_noise="
                          f"{b.manifest.defence.activation_noise:g}) is exported to ONNX Runtime only: the {fmt} "
                          "training graph and device runtime have no distance-correlation term or noise input yet")
    if isinstance(opts, OnnxOptions):
        from ._onnx import export_onnx

        return export_onnx(b, optimizer=optimizer, ort_format=opts.ort_format, opset=opts.opset,
                           batch_size=opts.batch_size)
    opt_json = optimizer.model_dump(mode="json")
    if isinstance(opts, TfjsOptions):
        from ._tfjs import export_tfjs_segment

        _device_segments(b, "tfjs", export_tfjs_segment, {"format": "layers-model", "keras": "tf_keras"},
                         optimizer=optimizer)
        return b
    assert isinstance(opts, TfliteOptions)
    from ._tflite import VARIANTS, export_tflite_segment

    bad = [v for v in opts.variants if v not in VARIANTS]
    if bad or not opts.variants:
        raise ExportError(f"unknown TFLite variant(s) {bad}; expected a subset of {VARIANTS}")
    _device_segments(b, "tflite", export_tflite_segment,
                     {"variants": list(opts.variants), "batch_size": opts.batch_size, "optimizer": opt_json},
                     optimizer=optimizer, variants=tuple(opts.variants), batch_size=opts.batch_size)
    return b


def _device_segments(bundle: Bundle, fmt: str, export_segment: Callable[..., dict[str, Path]],
                     options: dict[str, object], **kwargs: Any) -> dict[str, dict[str, Path]]:
    """``export_segment(module, input_shape, out_dir, is_last=, loss=, input_dtype=, **kwargs)`` for every device segment, in a
    temporary directory; the files are recorded in the bundle under ``fmt`` with ``options``."""
    m = bundle.manifest
    files: dict[str, dict[str, Path]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in m.device_segments:
            files[spec.name] = export_segment(bundle.torch_segment(spec.name), (1, *spec.input.sample_shape),
                                              Path(tmp) / spec.name, is_last=spec.is_last, loss=m.loss.kind,
                                              input_dtype=spec.input.dtype, **kwargs)
        bundle.add_artifacts(fmt, files, options)
    return files
