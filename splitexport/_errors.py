"""Exception types: every user-facing failure is a :class:`SplitExportError` with a clear message."""

from __future__ import annotations


class SplitExportError(Exception):
    """Base class of all errors splitexport reports to users."""


class ModelLoadError(SplitExportError):
    """A model file could not be loaded (unknown kind, missing ``--arch``, bad state dict)."""


class UnsafePickleError(ModelLoadError):
    """The file is a pickled object and loading it would run code; ``--trust-pickle`` was not given."""


class PartitionError(SplitExportError):
    """The model cannot be cut as asked."""


class UnknownLayerError(PartitionError):
    """A cut names no submodule of the model."""


class InvalidCutError(PartitionError):
    """More than one tensor (e.g. a skip connection) crosses the cut, or cuts are out of order."""


class UntraceableModelError(PartitionError):
    """torch.fx / torch.export could not trace the model into a graph."""


class BundleError(SplitExportError):
    """A bundle is missing, malformed, or cannot be written."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing or does not match the sha256 in the manifest."""


class ExportError(SplitExportError):
    """A segment cannot be exported to a device format (unsupported op or layer)."""
