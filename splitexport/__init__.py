"""splitexport: cut a torch model into segments that train on phones and a server exactly as one.

The public API; everything else lives in private modules.
"""

from ._bundle import Bundle, deploy_bundle, load_bundle, write_bundle
from ._data import Dataset, load_dataset
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
from ._multiclient import MultiClientResult, ServerLink, c3_score, simulate_clients
from ._partition import CutPoint, Partition, Segment, list_cut_points, partition
from ._partitions import partition_indices
from ._torch_segment import TorchSegment
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

__version__ = "0.1.0"

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
    "MultiClientResult",
    "OptimizerSpec",
    "Partition",
    "PartitionError",
    "Segment",
    "SegmentRunner",
    "SegmentSpec",
    "ServerLink",
    "SourceSpec",
    "SplitExportError",
    "SplitModel",
    "TensorSpec",
    "TorchSegment",
    "UnknownLayerError",
    "UnsafePickleError",
    "UntraceableModelError",
    "aux_loss",
    "aux_target",
    "c3_score",
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
    "partition_indices",
    "simulate_clients",
    "torch_split_model",
    "write_bundle",
]
