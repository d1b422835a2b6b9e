"""splitexport: cut a torch model into segments that train on phones and a server exactly as one.

The core API: cut points and partitions, bundles and manifests, the segment trainers and the update rule,
the example dataset, and the errors. Elsewhere: :mod:`splitexport.export` (phone formats),
:mod:`splitexport.protocol` (the wire contract), :mod:`splitexport.strategies` (multi-client algorithms),
:mod:`splitexport.models` (example models), :mod:`splitexport.data` and :mod:`splitexport.plots` (the
harness's data and figures); the harnesses are :mod:`splitexport.simulation`.
"""

from ._bundle import Bundle, deploy_bundle, load_bundle, write_bundle
from ._errors import (
    BundleError,
    BundleIntegrityError,
    ExportError,
    InvalidCutError,
    ModelLoadError,
    PartitionError,
    SplitExportError,
    UnknownLayerError,
    UnsafePickleError,
    UntraceableModelError,
)
from ._loading import LoadedModel, load_model
from ._manifest import LossSpec, Manifest, OptimizerSpec, SegmentSpec, SourceSpec, TensorSpec
from ._partition import CutPoint, Partition, Segment, list_cut_points, partition
from ._torch_segment import TorchSegment, UnsafeUpdate
from ._trainer import (
    History,
    MonolithicModel,
    SegmentRunner,
    SplitModel,
    compose,
    fit,
    max_abs_difference,
    named_state,
    torch_split_model,
)
from ._update_rule import EXACT_RULE, AuxLossRule, aux_loss, aux_target, label_loss
from ._version import __version__ as __version__
from .simulation.data import Dataset, load_dataset

__all__ = [
    "EXACT_RULE",
    "AuxLossRule",
    "Bundle",
    "BundleError",
    "BundleIntegrityError",
    "CutPoint",
    "Dataset",
    "ExportError",
    "History",
    "InvalidCutError",
    "LoadedModel",
    "LossSpec",
    "Manifest",
    "ModelLoadError",
    "MonolithicModel",
    "OptimizerSpec",
    "Partition",
    "PartitionError",
    "Segment",
    "SegmentRunner",
    "SegmentSpec",
    "SourceSpec",
    "SplitExportError",
    "SplitModel",
    "TensorSpec",
    "TorchSegment",
    "UnknownLayerError",
    "UnsafePickleError",
    "UnsafeUpdate",
    "UntraceableModelError",
    "aux_loss",
    "aux_target",
    "compose",
    "deploy_bundle",
    "fit",
    "label_loss",
    "list_cut_points",
    "load_bundle",
    "load_dataset",
    "load_model",
    "max_abs_difference",
    "named_state",
    "partition",
    "torch_split_model",
    "write_bundle",
]
