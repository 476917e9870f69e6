"""Input checks shared by every public entry point (method.md section 5).

Each check raises InputTypeError (a TypeError: wrong type or dtype) or InputError (a ValueError: wrong
shape or value; both :mod:`ovss_fast.errors`) with a message that names the argument and what was seen.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ovss_fast.errors import InputError, InputTypeError
from ovss_fast.kernels.common import NMS_AXES, TRANSITIONS  # noqa: F401  (re-exported: the checks' choices)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("kl", "op", "mv")
READOUTS = ("integrated", "velocity")
#: Segmenter heads: the DSLO discrepancy scores, the peers' plain logits argmax, or LPOSS's patch-stage label
#: propagation of the raw cosines over all windows of an image (docs/lposs.md).
HEADS = ("dslo", "logits", "lposs")
#: How overlapping windows are combined: on the patch grid then JBU (ours), or upsampled bilinearly to
#: pixels and averaged, then bilinear to the output (the peers').
AGGREGATIONS = ("grid", "pixels")
#: how a Segmenter brings its maps to the output size: joint bilateral upsampling of the patch grid, bilinear
#: (the peers' final resize), bilinear then PAMR (NACLIP's default), or bilinear then LPOSS+'s pixel-stage
#: label propagation on the processed image
REFINERS = ("jbu", "pamr", "bilinear", "lposs+")
#: Pixel-aggregation crops not a multiple of the patch: "floor" (the conv drops the remainder, the logits
#: are upsampled to the whole crop; SCLIP, NACLIP) or "pad" (padded to whole patches, logits cut back; ClearCLIP).
CROPS = ("floor", "pad")


def has_values(x: Tensor) -> bool:
    """False for empty and meta tensors, whose values cannot (or need not) be checked."""
    return x.numel() > 0 and x.device.type != "meta"


def tensor(name: str, x: object, rank: int, *, allow_neg_inf: bool = False) -> Tensor:
    """A floating tensor of the given rank, finite, without autograd."""
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise InputTypeError(
            f"{name} has unsupported dtype {x.dtype}; expected one of float16, bfloat16, float32, float64"
        )
    if x.dim() != rank:
        raise InputError(f"{name} should be a {rank}D tensor, got {x.dim()}D with shape {tuple(x.shape)}")
    if x.requires_grad:
        raise InputError(
            f"{name} requires grad; ovss_fast is autograd-free: pass {name}.detach() or run under torch.no_grad()"
        )
    if has_values(x):
        if allow_neg_inf:
            bad = torch.isnan(x).any() | (x == float("inf")).any()
            what = "NaN or +Inf"
        else:
            bad = ~torch.isfinite(x).all()
            what = "NaN or Inf"
        if bool(bad):
            raise InputError(f"{name} contains {what} values (shape {tuple(x.shape)})")
    return x


def same_device(**tensors: Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise InputError(f"all inputs must be on one device, got {seen}")
    return next(iter(devices.values()))


def positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def count(name: str, value: int, *, minimum: int = 0, maximum: int | None = None, why: str = "") -> int:
    """An integral number (int, numpy integer, ...; not bool) in [minimum, maximum], returned as int.

    why: appended to the range error (what goes wrong outside it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}{why}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be <= {maximum}, got {value}{why}")
    return value


#: the compiled backends' cap on the JBU radius (csrc/common/jbu_prepare.h), applied to every backend
MAX_RADIUS = 64


def radius(value: int, name: str = "radius") -> int:
    """The JBU radius: 0..64, the compiled backends' cap and message, for every backend."""
    r = count(name, value, minimum=0)
    if r > MAX_RADIUS:
        raise InputError(f"{name} must be <= {MAX_RADIUS} ({(2 * r + 1) * (2 * r + 1)} taps per pixel), got {r}")
    return r


def choice(name: str, value: str, options: Sequence[str]) -> str:
    if value not in options:
        raise InputError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def threshold(name: str, value: float | None) -> float | None:
    """None (off) or a probability in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"{name} must be a number in (0, 1] or None (off), got {type(value).__name__}")
    if not (0.0 < value <= 1.0):
        raise InputError(f"{name} must lie in (0, 1] (or be None for off), got {value}")
    return float(value)


def backend_options(value: object, name: str = "backend_options") -> dict[str, object]:
    """None or a mapping of the backends' keyword options (the Triton backend's schedule, precision,
    gibbs, graphs: TritonOptions), names and values checked now; a ValueError names ``name``."""
    from collections.abc import Mapping

    from ovss_fast.kernels.triton._runtime import TritonOptions

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputTypeError(f"{name} must be a dict of options or None, got {type(value).__name__}")
    try:
        TritonOptions().with_(value, argument=name)
    except ValueError as err:
        raise InputError(f"{name}: {err}" if not str(err).startswith(name) else str(err)) from err
    return dict(value)


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InputTypeError(f"{name} must be True or False, got {value!r}")
    return value


def nms_ratio(value: float, name: str = "nms") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 <= value <= 1.0):
        raise InputError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def features_and_text(feats: object, text: object) -> tuple[Tensor, Tensor]:
    feats = tensor("feats", feats, 3)
    text = tensor("text", text, 2)
    same_device(feats=feats, text=text)
    if text.shape[0] == 0:
        raise InputError("text has C = 0 classes (shape (0, D)); give at least one class")
    for name, x in (("feats", feats), ("text", text)):
        if x.shape[-1] == 0:
            raise InputError(f"{name} has D = 0 feature width (shape {tuple(x.shape)}); the cosine needs at least "
                             "one feature")
    if feats.shape[2] != text.shape[1]:
        raise InputError(
            f"feats and text disagree on the feature width D: feats {tuple(feats.shape)} has D = "
            f"{feats.shape[2]}, text {tuple(text.shape)} has D = {text.shape[1]}"
        )
    if feats.shape[1] == 0:
        raise InputError(f"feats has N = 0 patches (shape {tuple(feats.shape)})")
    return feats, text


def affinity(affinity: object, n: int | None = None, batch: int | None = None) -> Tensor:
    a = tensor("affinity", affinity, 3)
    if a.shape[1] != a.shape[2]:
        raise InputError(f"affinity must be square [B, N, N], got shape {tuple(a.shape)}")
    if a.shape[1] == 0:
        raise InputError(f"affinity has N = 0 patches (shape {tuple(a.shape)})")
    if n is not None and a.shape[1] != n:
        raise InputError(f"affinity has N = {a.shape[1]} (shape {tuple(a.shape)}) but the patches number N = {n}")
    if batch is not None and a.shape[0] != batch:
        raise InputError(f"affinity has B = {a.shape[0]} (shape {tuple(a.shape)}) but the batch is B = {batch}")
    if has_values(a) and bool((a < 0).any()):
        raise InputError(f"affinity must be non-negative, got a minimum of {float(a.min())}")
    return a


def class_scores(q: object) -> Tensor:
    q = tensor("q", q, 3)
    if q.shape[2] == 0:
        raise InputError(f"q has C = 0 classes (shape {tuple(q.shape)})")
    if q.shape[1] == 0:
        raise InputError(f"q has N = 0 patches (shape {tuple(q.shape)})")
    if has_values(q) and bool((q < 0).any()):
        raise InputError(f"q must be non-negative (distributions over patches), got a minimum of {float(q.min())}")
    return q


def grid(n: int, grid: object) -> tuple[int, int]:
    """(h, w) with h * w == n; a square grid is inferred when grid is None."""
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise InputError(f"grid=None needs a square patch count, got N = {n}; pass grid=(h, w) with h * w = {n}")
        return side, side
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in grid)
    ):
        raise InputTypeError(f"grid must be a pair of ints (h, w), got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    if h <= 0 or w <= 0 or h * w != n:
        raise InputError(f"grid {tuple(grid)} does not match N = {n} patches (h * w must equal N)")
    return h, w


def finite_scores(scores: Tensor, mode: str, affinity: Tensor, eps: float) -> Tensor:
    """Discrepancy scores computed from a (valid) affinity must be finite (-inf marks a dead class):
    a NaN or +Inf there comes from the affinity's range, so the error names the affinity."""
    if has_values(scores) and bool(torch.isnan(scores).any() | (scores == float("inf")).any()):
        lo, hi = float(affinity.min()), float(affinity.max())
        raise InputError(
            f"mode={mode!r} gave NaN or +Inf scores for this affinity (shape {tuple(affinity.shape)}, values in "
            f"[{lo:g}, {hi:g}], eps={eps:g}): its range defeats float32 arithmetic; rescale the affinity "
            "(e.g. affinity / affinity.amax()) or raise eps")
    return scores


SK_ITERS_WHY = (" (mode 'mv' runs its chain on the kernel made doubly stochastic; with sk_iters = 0 it runs on the "
                "unnormalised Gibbs kernel, whose rows sum to ~N, and overflows float32 within a few steps)")


def _scores_and_picture(scores: object, picture: object, name: str, *, rgb: bool,
                        allow_neg_inf: bool) -> tuple[Tensor, Tensor]:
    """scores [B, C, h, w] and an image ``name`` [B, K, H, W] (K = 3 when ``rgb``) on one device, none empty."""
    scores = tensor("scores", scores, 4, allow_neg_inf=allow_neg_inf)
    picture = tensor(name, picture, 4)
    same_device(**{"scores": scores, name: picture})
    B, C, h, w = scores.shape
    shape = tuple(picture.shape)
    if C == 0:
        raise InputError(f"scores has C = 0 classes (shape {tuple(scores.shape)})")
    if h == 0 or w == 0:
        raise InputError(f"scores has an empty grid (shape {tuple(scores.shape)})")
    if shape[0] != B:
        raise InputError(f"{name} has B = {shape[0]} (shape {shape}) but scores has B = {B}")
    if rgb and shape[1] != 3:
        raise InputError(f"{name} must be an RGB image [B, 3, H, W], got shape {shape}")
    if shape[1] == 0:
        raise InputError(f"{name} has K = 0 channels (shape {shape})")
    if shape[2] == 0 or shape[3] == 0:
        raise InputError(f"{name} has an empty image (shape {shape})")
    return scores, picture


def scores_and_guide(scores: object, guide: object) -> tuple[Tensor, Tensor]:
    """The JBU's inputs: scores [B, C, h, w] (-inf allowed) and an RGB guide [B, 3, H, W] in [0, 1]."""
    scores, guide = _scores_and_picture(scores, guide, "guide", rgb=True, allow_neg_inf=True)
    lo, hi = (float(guide.min()), float(guide.max())) if has_values(guide) else (0.0, 1.0)
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"guide values must lie in [0, 1], got min {lo:g} and max {hi:g} "
            "(an 8-bit image wants guide / 255)"
        )
    return scores, guide


def dilations(value: object, name: str = "dilations") -> tuple[int, ...]:
    """PAMR's dilations: a non-empty sequence of positive integers (repeats allowed, as the peers' module)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputTypeError(f"{name} must be a sequence of positive integers such as (8, 16), "
                             f"got {type(value).__name__}")
    if len(value) == 0:
        raise InputError(f"{name} must hold at least one dilation, got {tuple(value)}")
    return tuple(count(f"{name}[{i}]", d, minimum=1) for i, d in enumerate(value))


def scores_and_image(scores: object, image: object) -> tuple[Tensor, Tensor]:
    """PAMR's inputs: scores [B, C, h, w] and a guide image [B, K, H, W] of any K and value range."""
    return _scores_and_picture(scores, image, "image", rgb=False, allow_neg_inf=False)


def non_negative(name: str, value: float) -> float:
    """A finite real number >= 0, returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def propagation_alpha(value: float, name: str = "alpha") -> float:
    """Label propagation's alpha in [0, 1): below 1 keeps I - alpha S positive definite (CG needs it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 <= value < 1.0):
        raise InputError(f"{name} must lie in [0, 1) (I - alpha S must stay positive definite), got {value}")
    return float(value)


def _rank_2_or_3(name: str, x: object) -> Tensor:
    if isinstance(x, Tensor) and x.dim() in (2, 3):
        return tensor(name, x, x.dim())
    return tensor(name, x, 3)  # raises with the rank seen


def scores_feats_positions(scores: object, feats: object, positions: object) -> tuple[Tensor, Tensor, Tensor]:
    """LPOSS's patch stage: scores [N, C] or [B, N, C]; feats [N, D] or [B, N, D]; positions [N, 2] or [B, N, 2].

    Returned as [B, N, C], [B, N, D], [B, N, 2] (2D feats / positions expanded to the scores' B, no copy)."""
    scores = _rank_2_or_3("scores", scores)
    feats = _rank_2_or_3("feats", feats)
    positions = _rank_2_or_3("positions", positions)
    same_device(scores=scores, feats=feats, positions=positions)
    s3 = scores if scores.dim() == 3 else scores.unsqueeze(0)
    B, N, C = s3.shape
    if C == 0:
        raise InputError(f"scores has C = 0 classes (shape {tuple(scores.shape)})")
    if positions.shape[-1] != 2:
        raise InputError(f"positions must hold (y, x) pixel coordinates in its last dimension of size 2, got shape "
                         f"{tuple(positions.shape)}")
    if feats.shape[-1] == 0:
        raise InputError(f"feats has D = 0 features (shape {tuple(feats.shape)})")
    out = []
    for name, t in (("feats", feats), ("positions", positions)):
        if t.dim() == 3 and scores.dim() == 2:
            raise InputError(f"{name} is 3D (shape {tuple(t.shape)}) but scores is 2D (shape {tuple(scores.shape)})")
        t3 = t if t.dim() == 3 else t.unsqueeze(0).expand(B, *t.shape)
        if t3.shape[:2] != (B, N):
            raise InputError(f"{name} has shape {tuple(t.shape)} but scores has shape {tuple(scores.shape)}: "
                             f"they must agree on {'B and ' if t.dim() == 3 else ''}N = {N}")
        out.append(t3)
    return s3, out[0], out[1]


def scores_and_rgb(scores: object, image: object) -> tuple[Tensor, Tensor]:
    """LPOSS+'s pixel stage: scores [B, C, H, W] and an sRGB image [B, 3, H, W] in [0, 1] of the same size."""
    scores, image = scores_and_image(scores, image)
    B, C, H, W = scores.shape
    if image.shape[1] != 3:
        raise InputError(f"image must be RGB [B, 3, H, W], got shape {tuple(image.shape)}")
    if image.shape[0] != B or image.shape[2:] != (H, W):
        raise InputError(f"image has shape {tuple(image.shape)} but scores has shape {tuple(scores.shape)}: "
                         "they must agree on B, H and W (resize the scores to the image first)")
    if has_values(image):
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 1:
            raise InputError(f"image must hold sRGB values in [0, 1], got values in [{lo:g}, {hi:g}]")
    return scores, image
