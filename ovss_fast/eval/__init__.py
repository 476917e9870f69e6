"""Evaluation on the standard training-free OVSS benchmarks: readers, protocol, mIoU, torch.distributed.

``ovss-fast eval --dataset NAME --root PATH`` (see :mod:`ovss_fast.apps.evaluate`) is the command;
the pieces are importable for scripts:

    from ovss_fast.eval import SegmentationDataset, SegmenterPredictor, run_loop, make_report
"""

from ovss_fast.eval.datasets import (
    DATASETS,
    IGNORE_INDEX,
    LONG_SIDE_CAP,
    DatasetSpec,
    SegmentationDataset,
    dataset_spec,
    load_class_names,
)
from ovss_fast.eval.distributed import DistContext
from ovss_fast.eval.harness import (
    EvalOutcome,
    SegmenterPredictor,
    SyntheticScenes,
    make_report,
    protocol_size,
    run_loop,
    synthetic_predictor,
)
from ovss_fast.eval.metrics import (
    boundary_intersection_union,
    confusion_matrix,
    scores_from_boundary,
    scores_from_confusion,
)
from ovss_fast.eval.protocols import PROTOCOLS, Protocol, resolve_protocol

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "LONG_SIDE_CAP",
    "PROTOCOLS",
    "DatasetSpec",
    "DistContext",
    "EvalOutcome",
    "Protocol",
    "SegmentationDataset",
    "SegmenterPredictor",
    "SyntheticScenes",
    "boundary_intersection_union",
    "confusion_matrix",
    "dataset_spec",
    "load_class_names",
    "make_report",
    "protocol_size",
    "resolve_protocol",
    "run_loop",
    "scores_from_boundary",
    "scores_from_confusion",
    "synthetic_predictor",
]
