"""ovss_fast: training-free open-vocabulary segmentation by distribution discrepancy (DSLO).

The method is specified in ``shared/method.md``; :mod:`ovss_fast.reference` is that
page in plain PyTorch, and the ops below run it through the fastest available
backend ("cuda", "triton", "cpu" or "reference"; choose with ``backend=``).
"""

from ._backends import available_backends
from .ops import (
    DSLOHead,
    class_distributions,
    discrepancy,
    gibbs_kernel,
    jbu_argmax,
    jbu_upsample,
    segment_features,
)

__version__ = "0.1.0"

__all__ = [
    "DSLOHead",
    "Segmenter",
    "available_backends",
    "class_distributions",
    "discrepancy",
    "gibbs_kernel",
    "jbu_argmax",
    "jbu_upsample",
    "segment_features",
]


def __getattr__(name: str) -> object:
    # Segmenter imports open_clip: load it on first use so `import ovss_fast` stays light
    if name == "Segmenter":
        from .segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'ovss_fast' has no attribute {name!r}")
