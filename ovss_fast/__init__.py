"""ovss_fast: training-free open-vocabulary segmentation by distribution discrepancy (DSLO).

The method is specified in ``docs/method.md``; :mod:`ovss_fast.kernels.reference` is that
page in plain PyTorch, and the ops below run it through the fastest available
backend ("cuda", "triton", "cpu" or "reference"; choose with ``backend=``).

The package's folders are its layers (ARCHITECTURE.md): ``kernels`` (reference, extension,
Triton, dispatch) < ``ops`` (the public ops, options, validation) and ``models`` (CLIP, affinity
sources) < ``pipeline`` (the Segmenter) < ``eval`` < ``apps`` (command line, web page, demo).
"""

from ovss_fast import ops
from ovss_fast.kernels.dispatch import available_backends
from ovss_fast.ops import *  # noqa: F403  (the public ops: ovss_fast.discrepancy, ovss_fast.DSLOHead, ...)

__version__ = "0.1.0"

# Segmenter and Prediction: __getattr__ below
__all__ = [*ops.__all__, "Prediction", "Segmenter", "available_backends"]  # noqa: F405


def __getattr__(name: str) -> object:
    # Segmenter imports open_clip: load it on first use so `import ovss_fast` stays light
    if name == "Segmenter":
        from ovss_fast.pipeline.segmenter import Segmenter

        return Segmenter
    if name == "Prediction":  # what Segmenter.predict returns
        from ovss_fast.pipeline.prediction import Prediction

        return Prediction
    raise AttributeError(f"module 'ovss_fast' has no attribute {name!r}")
