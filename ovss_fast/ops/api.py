"""The public ops: validate once, choose a backend, run (no autograd anywhere).

Shapes: B images, N = h * w patches, C classes, D feature width, guide [B, 3, H, W].
Outputs are computed in float32 for float16 / bfloat16 / float32 inputs and in
float64 for float64 inputs; labels are int64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ovss_fast.errors import InputError
from ovss_fast.kernels import reference
from ovss_fast.kernels.common import EPS, ITERS, RADIUS, SIGMA_RANGE, SIGMA_SPATIAL, SK_ITERS, STEPS, TAU
from ovss_fast.kernels.dispatch import select
from ovss_fast.ops import validate as check
from ovss_fast.ops.options import HeadOptions


def class_distributions(feats: Tensor, text: Tensor, *, scale: float = 100.0, nms: float = 0.0,
                        nms_axis: str = "classes", backend: str = "auto") -> Tensor:
    """Each class's distribution over patches (method.md section 1).

    feats: [B, N, D] patch features; text: [C, D] class embeddings -> Q: [B, N, C],
    softmax over classes of ``scale * cos``, optional NMS (ratio ``nms``: a probability
    below ``nms`` times the largest of its patch, ``nms_axis="classes"``, or of its class
    over patches, ``nms_axis="patches"``, becomes 0), then each column normalised to sum 1
    over patches (a column NMS emptied stays 0).
    """
    feats, text = check.features_and_text(feats, text)
    nms = check.nms_ratio(nms)
    nms_axis = check.choice("nms_axis", nms_axis, check.NMS_AXES)
    params = {"scale": check.positive("scale", scale), "nms": nms}
    impl = select("class_distributions", backend, (feats, text), {**params, "nms_axis": nms_axis})
    with torch.no_grad():
        if getattr(impl, "takes_nms_axis", False):
            return impl.class_distributions(feats, text, **params, nms_axis=nms_axis)
        if nms_axis == "classes":
            return impl.class_distributions(feats, text, **params)
        # a kernel with the classes rule only: Q without NMS, then the patches rule as an exact post-pass
        # on Q (Q's columns are P's rescaled by positive constants; reference.suppress_patches says why)
        return reference.suppress_patches(impl.class_distributions(feats, text, scale=params["scale"], nms=0.0), nms)


def gibbs_kernel(affinity: Tensor, *, eps: float = EPS, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Cost and Gibbs kernel from a patch affinity (method.md section 2).

    affinity: [B, N, N], non-negative -> (cost [B, N, N] in [0, 1], kernel = exp(-cost / eps)).
    """
    affinity = check.affinity(affinity)
    params = {"eps": check.positive("eps", eps)}
    impl = select("gibbs_kernel", backend, (affinity,), params)
    with torch.no_grad():
        return impl.gibbs_kernel(affinity, **params)


def discrepancy(
    q: Tensor,
    affinity: Tensor | None,
    *,
    mode: str = "mv",
    eps: float = EPS,
    iters: int = ITERS,
    sk_iters: int = SK_ITERS,
    steps: int = STEPS,
    readout: str = "integrated",
    tau: float = TAU,
    transition: str = "attention",
    backend: str = "auto",
    backend_options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Per-patch distribution-discrepancy scores (method.md section 3).

    q: [B, N, C] class distributions over patches (from :func:`class_distributions`);
    affinity: [B, N, N] (ignored, may be None, for ``mode="kl"``) -> scores [B, N, C],
    larger meaning "patch i belongs to class c"; a class whose q column is all zero
    scores -inf everywhere.

    mode "kl": per-patch KL term to the uniform distribution; "op": optimal path,
    entropic OT from 1/N to each class (``iters`` Sinkhorn iterations, ``eps``),
    read off the source potential; "mv": maximum velocity, a Markov chain on a
    matrix made doubly stochastic (``sk_iters``, ``steps``; ``readout`` "integrated"
    or "velocity" with threshold ``tau``). ``transition`` picks mv's matrix: "gibbs"
    (ours), the Gibbs kernel K of ``eps``; "attention" (the paper), the symmetrised
    affinity over its per-image max, W = Sym / M (M = 0 gives W = 0, on which the
    chain empties: reference.attention_transition). Modes "kl" and "op" check
    ``transition`` like every other parameter and ignore it.

    ``backend_options``: keyword options for the backend that runs, e.g. the Triton backend's
    ``{"schedule": "split", "precision": "tf32x3", "gibbs": "fused", "graphs": False}``
    (:class:`~ovss_fast.kernels.triton.TritonOptions`; unset ones keep their defaults, which
    OVSS_FAST_TRITON_* environment variables override when set at import); backends without
    such options ignore them. Names and values are checked whatever the backend.
    """
    q = check.class_scores(q)
    options = check.backend_options(backend_options)
    check.choice("mode", mode, check.MODES)
    # every parameter is checked, also those this mode does not use (a typo should not wait for a mode switch)
    eps = check.positive("eps", eps)
    transition = check.choice("transition", transition, check.TRANSITIONS)
    op_params: dict[str, Any] = {"eps": eps, "iters": check.count("iters", iters, minimum=1)}
    mv_params: dict[str, Any] = {
        "sk_iters": check.count("sk_iters", sk_iters, minimum=1, why=check.SK_ITERS_WHY),
        "steps": check.count("steps", steps, minimum=1),
        "readout": check.choice("readout", readout, check.READOUTS),
        "tau": check.positive("tau", tau),
    }
    B, N, _ = q.shape
    if affinity is not None:
        affinity = check.affinity(affinity, n=N, batch=B)
        check.same_device(q=q, affinity=affinity)
    if mode == "kl":
        impl = select("kl_scores", backend, (q,), {})
        with torch.no_grad():
            return impl.kl_scores(q)
    if affinity is None:
        raise InputError(f"mode={mode!r} needs an affinity [B, N, N]; got None")
    if mode == "op":
        impl = select("sinkhorn_scores", backend, (q, affinity), op_params)
        with torch.no_grad():
            kernel = impl.gibbs_kernel_only(affinity, eps=eps, **_taken(impl, options, ("gibbs",)))
            s = impl.sinkhorn_scores(q, kernel, **op_params, **_symmetric(impl), **_taken(impl, options, _RUN_OPTIONS))
    else:
        impl = select("markov_scores", backend, (q, affinity), mv_params)
        with torch.no_grad():
            # K or W goes where the kernel goes: both are symmetric, so the symmetric fast path holds
            matrix = impl.markov_transition(affinity, transition=transition, eps=eps,
                                            **_taken(impl, options, ("gibbs",)))
            s = impl.markov_scores(q, matrix, **mv_params, **_symmetric(impl), **_taken(impl, options, _RUN_OPTIONS))
    return check.finite_scores(s, mode, affinity, eps)


#: the backend options sinkhorn_scores / markov_scores take (gibbs goes to the Gibbs kernel)
_RUN_OPTIONS = ("schedule", "precision", "graphs")


def _taken(impl: Any, options: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The ``options`` among ``names`` that backend ``impl`` takes (its ``options`` attribute; none for most)."""
    takes = getattr(impl, "options", ())
    return {k: v for k, v in options.items() if k in names and k in takes}


def _symmetric(impl: Any) -> dict[str, bool]:
    """{"symmetric": True} for a backend whose op / mv can use K = K^T (gibbs_kernel builds K, and
    attention_transition W, from (A + A^T) / 2, so K^T u = K u and one matrix is read, never its
    transpose); {} for the others."""
    return {"symmetric": True} if getattr(impl, "takes_symmetric_kernel", False) else {}


def _jbu_params(sigma_spatial: float, sigma_range: float, radius: int) -> dict[str, Any]:
    return {
        "sigma_spatial": check.positive("sigma_spatial", sigma_spatial),
        "sigma_range": check.positive("sigma_range", sigma_range),
        "radius": check.radius(radius),
    }


def jbu_upsample(scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL,
                 sigma_range: float = SIGMA_RANGE,
                 radius: int = RADIUS, backend: str = "auto") -> Tensor:
    """Joint bilateral upsampling of scores to the guide's size (method.md section 4).

    scores: [B, C, h, w]; guide: [B, 3, H, W] with values in [0, 1] -> [B, C, H, W].
    """
    scores, guide = check.scores_and_guide(scores, guide)
    params = _jbu_params(sigma_spatial, sigma_range, radius)
    impl = select("jbu_upsample", backend, (scores, guide), params)
    with torch.no_grad():
        return impl.jbu_upsample(scores, guide, **params)


def jbu_argmax(scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL, sigma_range: float = SIGMA_RANGE,
               radius: int = RADIUS, backend: str = "auto") -> Tensor:
    """Labels of the joint-bilaterally upsampled scores, ties to the lowest class.

    scores: [B, C, h, w]; guide: [B, 3, H, W] -> labels [B, H, W] int64. Fused
    backends never hold [B, C, H, W]; they keep the running best class per pixel.
    """
    scores, guide = check.scores_and_guide(scores, guide)
    params = _jbu_params(sigma_spatial, sigma_range, radius)
    impl = select("jbu_argmax", backend, (scores, guide), params)
    with torch.no_grad():
        return impl.jbu_argmax(scores, guide, **params)


def pamr(scores: Tensor, image: Tensor, *, iters: int = 10, dilations: tuple[int, ...] = (8, 16),
         backend: str = "auto") -> Tensor:
    """Pixel-adaptive mask refinement (PAMR; Araslanov and Roth, CVPR 2020), exact to the peers' module.

    scores: [B, C, h, w], bilinearly resized to the image's size (align_corners=True) when they differ;
    image: [B, K, H, W], any K (the peers pass the mean/std-normalised RGB image) -> [B, C, H, W] float32
    (float64 for float64 inputs). ``iters`` rounds of affinity-weighted averaging over the 8 neighbours at
    each of ``dilations`` (NACLIP's default 10 and (8, 16)); :func:`ovss_fast.kernels.reference.pamr`.
    """
    scores, image = check.scores_and_image(scores, image)
    params = {"iters": check.count("iters", iters, minimum=0), "dilations": check.dilations(dilations)}
    impl = select("pamr", backend, (scores, image), params)
    with torch.no_grad():
        return impl.pamr(scores, image, **params)


#: what -inf scores become before a bilinear or PAMR refinement: both take convex combinations, so a finite floor
#: keeps 0 * -inf (NaN) out and every result within [floor, max] (no overflow to -inf either)
REFINE_FLOOR = -1e30


def refine_scores(scores: Tensor, size: tuple[int, int], *, image: Tensor | None = None, iters: int = 10,
                  dilations: tuple[int, ...] = (8, 16), backend: str = "auto") -> Tensor:
    """Scores to an output size the peers' way: bilinear, then optionally PAMR (``refine="bilinear" | "pamr"``).

    scores: [B, C, h, w] -> [B, C, H, W] for size (H, W), float32 (float64 for float64 scores): resized
    bilinearly with align_corners=False (the peers' final resize; skipped when the size is the scores'),
    then, when ``image`` [B, K, H, W] is given, refined by :func:`pamr` on it (``iters``, ``dilations``;
    NACLIP passes its mean/std-normalised image). -inf scores (a class NMS emptied) enter as
    :data:`REFINE_FLOOR`, so a refined score is never NaN.
    """
    scores = check.tensor("scores", scores, 4, allow_neg_inf=True)
    H, W = (check.count("size[0]", size[0], minimum=1), check.count("size[1]", size[1], minimum=1))
    dt = torch.float64 if scores.dtype == torch.float64 else torch.float32
    m = scores.to(dt).clamp_min(REFINE_FLOOR)
    if tuple(m.shape[-2:]) != (H, W):
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
    if image is None:
        return m
    if tuple(image.shape[-2:]) != (H, W):
        raise InputError(f"image must be {H} x {W} (the output size) for PAMR, got shape {tuple(image.shape)}")
    return pamr(m, image, iters=iters, dilations=dilations, backend=backend)


def label_propagation(scores: Tensor, feats: Tensor, positions: Tensor, *, k: int = 400, gamma: float = 3.0,
                      sigma: float = 0.01, dist_pow: float = 1.0, alpha: float = 0.95, iters: int = 10,
                      tol: float = 1e-6, backend: str = "auto") -> Tensor:
    """LPOSS's patch-stage label propagation (Stojnic et al., CVPR 2025; docs/lposs.md).

    scores: [N, C] or [B, N, C] (LPOSS: raw cosines of the patches' features and the class embeddings, all
    windows of an image stacked); feats: [N, D] or [B, N, D] (LPOSS: DINO ViT-B/16 last-block value features;
    L2-normalised here); positions: [N, 2] or [B, N, 2], each patch centre in pixels -> [N, C] or [B, N, C]
    float32 (float64 for float64 inputs). Per image: each patch linked to its min(k, N) nearest neighbours by
    cosine (itself included, ties to the lower index), w = max(0, cos)^gamma exp(-sigma dist^dist_pow), W + W^T,
    the diagonal removed, S = D^-1/2 W D^-1/2 (degree 0 -> 1); x solves (I - alpha S) x = scores per class by
    conjugate gradient from 0, each class stopping at ||r|| <= tol ||scores|| or after ``iters`` steps.
    """
    two_d = isinstance(scores, Tensor) and scores.dim() == 2
    scores, feats, positions = check.scores_feats_positions(scores, feats, positions)
    params = {
        "k": check.count("k", k, minimum=1),
        "gamma": check.non_negative("gamma", gamma),
        "sigma": check.non_negative("sigma", sigma),
        "dist_pow": check.positive("dist_pow", dist_pow),
        "alpha": check.propagation_alpha(alpha),
        "iters": check.count("iters", iters, minimum=0),
        "tol": check.non_negative("tol", tol),
    }
    impl = select("label_propagation", backend, (scores, feats, positions), params)
    with torch.no_grad():
        out = impl.label_propagation(scores, feats, positions, **params)
    return out[0] if two_d else out


def pixel_propagation(scores: Tensor, image: Tensor, *, radius: int = 6, tau: float = 0.01, alpha: float = 0.95,
                      iters: int = 10, tol: float = 1e-6, backend: str = "auto") -> Tensor:
    """LPOSS+'s pixel-stage label propagation (Stojnic et al., CVPR 2025; docs/lposs.md).

    scores: [B, C, H, W] (LPOSS+: the patch stage's scores resized to the image); image: [B, 3, H, W] sRGB in
    [0, 1] -> [B, C, H, W] float32 (float64 for float64 inputs). Each pixel linked to the pixels of the
    (2 radius + 1)^2 square around it (not itself; inside the image) with w = exp(-||Lab_i - Lab_j|| / tau), Lab
    divided by (100, 128, 128); S = D^-1/2 W D^-1/2; (I - alpha S) x = scores solved per image and class by
    conjugate gradient as :func:`label_propagation`.
    """
    scores, image = check.scores_and_rgb(scores, image)
    params = {
        "radius": check.count("radius", radius, minimum=1, maximum=64),
        "tau": check.positive("tau", tau),
        "alpha": check.propagation_alpha(alpha),
        "iters": check.count("iters", iters, minimum=0),
        "tol": check.non_negative("tol", tol),
    }
    impl = select("pixel_propagation", backend, (scores, image), params)
    with torch.no_grad():
        return impl.pixel_propagation(scores, image, **params)


def refine_lposs_plus(scores: Tensor, image: Tensor, *, radius: int = 6, tau: float = 0.01, alpha: float = 0.95,
                      iters: int = 10, tol: float = 1e-6, backend: str = "auto") -> Tensor:
    """Refine "lposs+": scores [B, C, h, w] -> bilinear (align_corners=False) to the image's size, then
    :func:`pixel_propagation` on image [B, 3, H, W] (sRGB in [0, 1], as LPOSS+ takes it) -> [B, C, H, W].

    LPOSS+ propagates the patch stage's raw scores (no softmax); after another head the scores are that
    head's. -inf scores (a class NMS emptied) enter as the lowest finite score of their image (0 when it has
    none), so the conjugate gradient's norms stay finite.
    """
    scores = check.tensor("scores", scores, 4, allow_neg_inf=True)
    check.tensor("image", image, 4)
    check.same_device(scores=scores, image=image)
    dt = torch.float64 if scores.dtype == torch.float64 else torch.float32
    m = scores.to(dt)
    low = torch.isneginf(m)
    if bool(low.any()):
        floor = torch.where(low, torch.full_like(m, float("inf")), m).flatten(1).amin(dim=1)  # [B]
        floor = torch.where(torch.isinf(floor), torch.zeros_like(floor), floor)
        m = torch.where(low, floor.view(-1, 1, 1, 1), m)
    H, W = image.shape[-2:]
    if tuple(m.shape[-2:]) != (H, W):
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
    return pixel_propagation(m, image, radius=radius, tau=tau, alpha=alpha, iters=iters, tol=tol, backend=backend)


def segment_features(
    feats: Tensor,
    text: Tensor,
    affinity: Tensor | None,
    *,
    grid: tuple[int, int] | None = None,
    guide: Tensor | None = None,
    mode: str = "mv",
    return_scores: bool = False,
    backend: str = "auto",
    **options: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Features to a segmentation map in one call: sections 1 -> 2 -> 3 -> 4 of method.md.

    feats: [B, N, D]; text: [C, D]; affinity: [B, N, N] (None only for mode "kl");
    grid: (h, w) with h * w = N (None: square). Returns labels [B, h, w] int64 when
    guide is None, else labels [B, H, W] for guide [B, 3, H, W], brought there as ``refine`` says:
    "jbu" (joint bilateral upsampling guided by it, default), "bilinear", "pamr" (bilinear, then
    PAMR with the guide as its image, as given: :func:`refine_scores`) or "lposs+" (bilinear, then LPOSS+'s
    pixel stage on the guide, in [0, 1]: :func:`refine_lposs_plus`). With
    ``return_scores=True`` returns (labels, scores [B, C, h, w]). options: the head's
    knobs, :class:`~ovss_fast.ops.options.HeadOptions` (scale, nms, eps, iters, sk_iters,
    steps, readout, tau, sigma_spatial, sigma_range, radius, refine, pamr_iters, pamr_dilations, lposs_*;
    all checked, used or not).
    """
    feats, text = check.features_and_text(feats, text)
    B, N, _ = feats.shape
    h, w = check.grid(N, grid)
    opts = HeadOptions.of("segment_features", options)
    if guide is not None:
        check.tensor("guide", guide, 4)
        check.same_device(feats=feats, guide=guide)
    if affinity is not None:
        check.same_device(feats=feats, affinity=affinity)
    q = class_distributions(feats, text, backend=backend, **opts.for_op("class_distributions"))
    s = discrepancy(q, affinity, mode=mode, backend=backend, **opts.for_op("discrepancy"))
    scores = s.transpose(1, 2).reshape(B, text.shape[0], h, w)  # [B, C, h, w]; B = 0 gives empty results
    if guide is None:
        labels = scores.argmax(dim=1)
    elif opts.refine == "jbu":
        labels = jbu_argmax(scores, guide, backend=backend, **opts.for_op("jbu"))
    elif opts.refine == "lposs+":
        labels = refine_lposs_plus(scores, guide, backend=backend, **opts.pixel_propagation_params()).argmax(dim=1)
    else:
        image = guide if opts.refine == "pamr" else None
        labels = refine_scores(scores, tuple(guide.shape[-2:]), image=image, backend=backend,
                               **opts.pamr_params()).argmax(dim=1)
    return (labels, scores) if return_scores else labels


class DSLOHead(torch.nn.Module):
    """Post-processing head: ``segment_features`` as a module, for codebases that compose modules.

    ``DSLOHead(mode="mv", **params)(feats, text, affinity, grid=None, guide=None)``
    returns labels like :func:`segment_features`; params: its ``return_scores``,
    ``backend`` and the head's options (:class:`~ovss_fast.ops.options.HeadOptions`), checked
    here. It runs without autograd and detaches its inputs, so it can sit after a network
    whose outputs still carry grad.
    """

    def __init__(self, mode: str = "mv", **params: Any) -> None:
        super().__init__()
        check.choice("mode", mode, check.MODES)
        # the head's options are checked now, not at the first forward; return_scores and backend pass through
        HeadOptions.of("DSLOHead", {k: v for k, v in params.items() if k not in ("return_scores", "backend")})
        self.mode = mode
        self.params = params

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in sorted(self.params.items()))
        return f"mode={self.mode!r}{extra}"

    @torch.no_grad()
    def forward(self, feats: Tensor, text: Tensor, affinity: Tensor | None = None, *,
                grid: tuple[int, int] | None = None, guide: Tensor | None = None) -> Tensor:
        def plain(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return segment_features(plain(feats), plain(text), plain(affinity), grid=grid, guide=plain(guide),
                                mode=self.mode, **self.params)
