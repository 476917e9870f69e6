"""Evaluation protocols: DSLO's own and the SCLIP / ClearCLIP / NACLIP / LPOSS codebases' (values from peers.md).

A protocol fixes, per dataset, everything besides the method itself (the dense features
and the affinity): the resize (short side, antialias or not, snapped to whole patches or
not), the sliding window and stride, the logit scale, the background threshold
(prob_thd), how overlapping windows are combined, the positional-embedding
interpolation, the head, and how crops that are not whole patches are handled.

    resolve_protocol("sclip", "voc21") -> {"protocol": "sclip", "short_side": 336, "window": 224, ...}

What the peers do that ovss_fast does not reproduce is listed in each protocol's
``not_reproduced`` (SCLIP's area_thd, fp16 softmaxes), and goes into the results file with
the rest. ``refine`` is the step to the annotation size: NACLIP's bilinear then PAMR (10 steps,
dilations 8 and 16, on the normalised image), SCLIP's and ClearCLIP's bilinear, DSLO's JBU, LPOSS+'s
pixel-stage label propagation. A protocol may also fix the dense features and head options (``lposs``:
MaskCLIP's features and LPOSS's propagation settings), recorded with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ovss_fast.errors import InputError
from ovss_fast.eval.datasets import DATASETS

#: datasets with a background class (index 0): the only ones a background threshold applies to
BACKGROUND_DATASETS = ("voc21", "context60", "coco_object")


@dataclass(frozen=True)
class Protocol:
    """One codebase's evaluation settings; per-dataset values fall back to ``default_*``."""

    name: str
    title: str
    head: str
    aggregation: str
    pos_interp: str
    antialias: bool
    snap: bool
    crop: str
    default_short: int
    default_window: int | None
    default_stride: int | None
    default_scale: float
    short_side: dict[str, int] = field(default_factory=dict)
    window: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    bg_threshold: dict[str, float] = field(default_factory=dict)
    not_reproduced: tuple[str, ...] = ()
    #: window (pixels, stride half of it) for images too large for the memory budget as they are (None: refuse)
    default_fallback: int | None = None
    fallback: dict[str, int] = field(default_factory=dict)
    #: the step from the maps to the annotation size (HeadOptions.refine): jbu, bilinear, pamr or lposs+
    refine: str = "jbu"
    #: the dense CLIP features the codebase uses (None: not part of the protocol, the --features flag's)
    features: str | None = None
    #: head options the codebase fixes (HeadOptions fields), e.g. LPOSS's propagation settings
    head_options: dict[str, object] = field(default_factory=dict)
    #: what the codebase uses that the protocol records but cannot set (the CLIP weights, the graph's features)
    notes: tuple[str, ...] = ()

    def resolve(self, dataset: str) -> dict:
        """The protocol's values for one dataset (``dataset=None``: the defaults, for synthetic scenes)."""
        window, stride = self.window.get(dataset, (self.default_window, self.default_stride))
        return {
            "protocol": self.name, "short_side": self.short_side.get(dataset, self.default_short),
            "window": window, "stride": stride, "scale": self.scale.get(dataset, self.default_scale),
            "bg_threshold": self.bg_threshold.get(dataset), "antialias": self.antialias, "snap": self.snap,
            "aggregation": self.aggregation, "crop": self.crop, "pos_interp": self.pos_interp, "head": self.head,
            "refine": self.refine, "features": self.features, "head_options": dict(self.head_options),
            "notes": list(self.notes),
            "not_reproduced": list(self.not_reproduced),
            "fallback_window": self.fallback.get(dataset, self.default_fallback),
        }


def _dslo() -> Protocol:
    """The paper's (method.md section 7): the whole image at 336 (COCO-Stuff 448, Cityscapes 560), one tower
    forward, the head on the full patch grid; the dataset's windows only for an image over the memory budget."""
    return Protocol(
        "dslo", "DSLO (the paper's): the whole image, joint bilateral upsampling to the annotation",
        head="dslo", aggregation="grid", pos_interp="size", antialias=True, snap=True, crop="floor",
        default_short=336, default_window=None, default_stride=None, default_scale=100.0,
        short_side={"coco_stuff": 448, "cityscapes": 560},
        default_fallback=224, fallback={n: s.window for n, s in DATASETS.items()},
    )


def _dslo_windows() -> Protocol:
    return Protocol(
        "dslo-windows", "DSLO with sliding windows: patch-grid window averaging, joint bilateral upsampling",
        head="dslo", aggregation="grid", pos_interp="size", antialias=True, snap=True, crop="floor",
        default_short=336, default_window=224, default_stride=112, default_scale=100.0,
        short_side={n: s.short_side for n, s in DATASETS.items()},
        window={n: (s.window, s.stride) for n, s in DATASETS.items()},
    )


#: LPOSS's published propagation settings (configs/lposs_plus.yaml: alpha 0.95, gamma 3, k 400, sigma 0.01,
#: pix_dist_pow 1, tau 0.01, r 13 -> radius 6; the conjugate gradient's tol 1e-6 and 10 steps, lposs_eval.py)
LPOSS_OPTIONS: dict[str, object] = {"lposs_k": 400, "lposs_gamma": 3.0, "lposs_sigma": 0.01, "lposs_dist_pow": 1.0,
                                    "lposs_alpha": 0.95, "lposs_iters": 10, "lposs_tol": 1e-6, "lposs_radius": 6,
                                    "lposs_tau": 0.01}


def _lposs() -> Protocol:
    """LPOSS+ (vladan-stojnic/LPOSS, configs/lposs_plus.yaml; docs/lposs.md): every dataset at short side 448
    (mmseg Resize (2048, 448), keep ratio, cv2 bilinear), 224 / 112 sliding windows, MaskCLIP features as
    CLIP-DINOiser's code computes them (features "maskclip-res": v through out_proj, residual and MLP kept), the
    patch stage over all windows of an image as one graph on DINO ViT-B/16 value features, each window's
    result bilinear to its pixels and averaged, LPOSS+'s pixel stage on the resized image, bilinear to the
    annotation, argmax. ``--refine bilinear`` gives LPOSS without the pixel stage (configs/lposs.yaml)."""
    return Protocol(
        "lposs", "LPOSS+ (vladan-stojnic/LPOSS): 448 short side, 224 / 112 windows as one graph, pixel stage",
        head="lposs", aggregation="pixels", pos_interp="size", antialias=False, snap=False, crop="floor",
        default_short=448, default_window=224, default_stride=112, default_scale=100.0, refine="lposs+",
        features="maskclip-res", head_options=dict(LPOSS_OPTIONS),
        notes=("the graph's features: --affinity dino (the default for head lposs) builds DINO ViT-B/16 "
               "(timm vit_base_patch16_224.dino = torch hub dino_vitb16) and takes its last block's value features",
               "the CLIP weights are --model / --pretrained's: LPOSS uses ViT-B-16 laion2b_s34b_b88k "
               "(--pretrained laion2b_s34b_b88k)"),
        not_reproduced=("class names: ours (eval/datasets.py), not LPOSS's lists",
                        "cv2 bilinear resize (ours: torch bilinear, no antialias)",
                        "--refine bilinear (LPOSS without the pixel stage): a class's synonyms bilinear to the "
                        "annotation size, then their max (LPOSS: the max, then bilinear); they differ only where a "
                        "class has several synonyms",
                        "faiss-gpu's kNN ties and cupy's float32 CG: ours breaks ties by index (docs/lposs.md)"),
    )


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    _dslo(),
    _dslo_windows(),
    Protocol(
        "sclip", "SCLIP (wangf3014/SCLIP): mmseg slide inference, logits argmax, prob_thd",
        head="logits", aggregation="pixels", pos_interp="peers", antialias=False, snap=False, crop="floor",
        default_short=336, default_window=224, default_stride=112, default_scale=40.0,
        short_side={"coco_stuff": 448, "cityscapes": 560},
        scale={"voc21": 65.0, "context60": 50.0, "coco_object": 50.0},
        bg_threshold={"voc21": 0.1, "context60": 0.1, "coco_object": 0.1},
        not_reproduced=("area_thd 0.1 on voc21", "fp16 weights and softmax on CUDA (ours: float32 softmax)",
                        "cv2 bilinear resize (ours: torch bilinear, no antialias)"),
        refine="bilinear",  # SCLIP ships PAMR but runs it off by default
    ),
    Protocol(
        "clearclip", "ClearCLIP (mc-lan/ClearCLIP): 448 short side, 448 / 224 windows padded to whole patches",
        head="logits", aggregation="pixels", pos_interp="peers", antialias=False, snap=False, crop="pad",
        default_short=448, default_window=448, default_stride=224, default_scale=50.0,
        window={"cityscapes": (224, 112)},
        bg_threshold={"voc21": 0.5, "context60": 0.15, "coco_object": 0.4},
        not_reproduced=("fp16 throughout (ours: the model's dtype, float32 softmax)",
                        "cv2 bilinear resize (ours: torch bilinear, no antialias)"),
        refine="bilinear",
    ),
    Protocol(
        "naclip", "NACLIP (sinahmr/NACLIP): SCLIP's protocol, whole image on voc20/voc21",
        head="logits", aggregation="pixels", pos_interp="peers", antialias=False, snap=False, crop="floor",
        default_short=336, default_window=224, default_stride=112, default_scale=40.0,
        short_side={"cityscapes": 560},
        window={"voc21": (None, None), "voc20": (None, None)},
        bg_threshold={"voc21": 0.1, "context60": 0.1, "coco_object": 0.1},
        not_reproduced=("fp16 weights and softmax on CUDA (ours: float32 softmax)",
                        "cv2 bilinear resize (ours: torch bilinear, no antialias)",
                        "PAMR skipped when it runs out of memory (ours: an out-of-memory error is raised)"),
        refine="pamr",  # NACLIP's default: bilinear to the image, then PAMR 10 steps at dilations (8, 16)
    ),
    _lposs(),
)}


def resolve_protocol(name: str, dataset: str | None) -> dict:
    """A protocol's values for a dataset; an unknown name lists the valid ones."""
    if name not in PROTOCOLS:
        raise InputError(f"unknown protocol {name!r}; valid names: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name].resolve(dataset)


__all__ = ["BACKGROUND_DATASETS", "LPOSS_OPTIONS", "PROTOCOLS", "Protocol", "resolve_protocol"]
