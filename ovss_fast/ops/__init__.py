"""The public ops: validation (:mod:`.validate`), the head's options (:mod:`.options`), backend choice and no
autograd (:mod:`.api`). Everything here is re-exported from :mod:`ovss_fast`."""

from ovss_fast.ops.api import (
    DSLOHead,
    class_distributions,
    discrepancy,
    gibbs_kernel,
    jbu_argmax,
    jbu_upsample,
    label_propagation,
    pamr,
    pixel_propagation,
    refine_scores,
    segment_features,
)
from ovss_fast.ops.options import PAPER_HEAD, PRESETS, HeadOptions

__all__ = [
    "DSLOHead",
    "HeadOptions",
    "PAPER_HEAD",
    "PRESETS",
    "class_distributions",
    "discrepancy",
    "gibbs_kernel",
    "jbu_argmax",
    "jbu_upsample",
    "label_propagation",
    "pamr",
    "pixel_propagation",
    "refine_scores",
    "segment_features",
]
