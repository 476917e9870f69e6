"""Sliding windows: the layout on the patch grid, the crops, the aggregation of their maps, the memory guard.

The Segmenter hands :class:`Windows` one callable, ``window_maps(crops01 [M, 3, h, w]) -> [M, n, K]``
(the tower and the head on M crops, n patches each, K per-synonym maps), and gets back the maps of
whole images:

- :meth:`Windows.grid_maps` (aggregation "grid"): every window has the same patch count (the last
  window in a row or column is shifted back to end at the border), so the discrepancy scores of
  different windows, whose scale depends on n, share one scale; all windows of the images of one
  size are gathered by index (:class:`WindowLayout`), go through in chunks that fit
  ``memory_budget``, are scatter-added onto the (gh, gw) grid and averaged unweighted (mmseg's
  sliding-window convention). ``batch_windows=False``: one window at a time (the older path).
- :meth:`Windows.pixel_maps` (aggregation "pixels", the peers' slide inference): each window's maps
  upsampled bilinearly to its pixels and averaged where windows overlap.

Both take an optional ``joint(inputs [B, nw * n, F], positions [nw * n, 2]) -> [B, nw * n, K]``: then
``window_maps`` hands F columns per patch, and once every window of the images is in, ``joint`` turns
them into the K maps of every window of an image together (head "lposs": one graph over all windows;
positions are the patch centres in pixels of the processed image, (y, x), window offset + patch // 2 +
patch x index, as LPOSS places them), before the windows are aggregated as above.

The memory guard: :func:`window_bytes` estimates one window's bytes (visual tower, last block,
head, affinity source); a chunk holds as many windows as fit the budget. When even one does not,
the ``fallback`` window is used instead if one is set (:meth:`Windows.plan`; e.g. the whole-image
``dslo`` protocol falls back to the dataset's 224-pixel windows, and the call's
:class:`~ovss_fast.pipeline.prediction.RunRecord` notes it), else an InputError says which window to use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ovss_fast.errors import InputError, InputTypeError

#: float32 [heads, T, T] tensors alive in the last block per feature preset's attention (the q-k
#: attention for the affinity included): scores + probabilities, plus a second pair for "qq+kk".
_LAST_BLOCK_TENSORS = {"qk": 2, "qq+kk": 4, "qq": 3, "kk+gauss": 3, "identity": 2}
#: Default budget for one chunk of windows (see ``Segmenter.memory_estimate``).
DEFAULT_MEMORY_BUDGET = 4 * 2**30

Cells = tuple[int, int]
#: crops01 [M, 3, h, w] in [0, 1] -> per-synonym maps [M, n, K] (n = the crops' patches, row-major)
WindowMaps = Callable[[Tensor], Tensor]
#: (inputs [B, nw * n, F] of every window of B images, positions [nw * n, 2] patch centres in pixels (y, x))
#: -> maps [B, nw * n, K]
JointMaps = Callable[[Tensor, Tensor], Tensor]


def patch_centres(offsets: Tensor, cells: Cells, patch: Cells) -> Tensor:
    """offsets [nw, 2] windows' top-left pixels (y, x) -> [nw * wh * ww, 2] float32 patch centres in pixels,
    window by window, row-major within a window: offset + patch // 2 + patch x index (LPOSS's)."""
    (wh, ww), (ph, pw) = cells, patch
    ys = offsets[:, :1, None] + ph // 2 + ph * torch.arange(wh, device=offsets.device).view(1, wh, 1)  # [nw, wh, 1]
    xs = offsets[:, 1:, None] + pw // 2 + pw * torch.arange(ww, device=offsets.device).view(1, 1, ww)  # [nw, 1, ww]
    return torch.stack(torch.broadcast_tensors(ys, xs), dim=-1).reshape(-1, 2).float()


def pixel_stage_bytes(batch: int, channels: int, height: int, width: int, radius: int) -> int:
    """Bytes refine "lposs+" holds for ``batch`` images of height x width with ``channels`` maps: the stencil
    weights (float32, (2r+1)^2 - 1 per pixel, plus 8 floats per pixel for the Lab image, degrees and
    padding) and about six float32 [channels, H, W] tensors (the conjugate gradient's x, r, p, A p, its input
    and output). At 448 x 597, r = 6: 308 MiB for 21 maps, 1226 MiB for 171; the cpu backend's measured
    peaks were 322 MiB and 1080 MiB."""
    taps = (2 * radius + 1) ** 2 - 1
    return int(batch) * height * width * 4 * (taps + 8 + 6 * channels)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` cells every ``stride`` cells covering ``size`` cells.

    The last window is shifted back to end at the border, so every window has the
    same size (when size >= window) and every cell is covered.
    """
    if window >= size:
        return [0]
    starts = list(range(0, size - window, stride))
    starts.append(size - window)
    return starts


@dataclass(frozen=True)
class WindowLayout:
    """The sliding windows of one patch grid, as index tensors (no Python loop per window downstream).

    grid (gh, gw) and cells (wh, ww) in patches; starts [nw, 2] the (row, column) of each
    window's top-left patch, row-major; cell_index [nw, n] each window patch's flat grid
    index y * gw + x (n = wh * ww, row-major in the window, as the features' patch order);
    count [gh * gw] float32, how many windows cover each cell (>= 1 everywhere).
    """

    grid: tuple[int, int]
    cells: tuple[int, int]
    starts: Tensor
    cell_index: Tensor
    count: Tensor

    @classmethod
    def build(cls, grid: tuple[int, int], cells: tuple[int, int], stride: tuple[int, int],
              device: torch.device | str = "cpu") -> WindowLayout:
        (gh, gw), (wh, ww) = grid, cells
        ys = torch.tensor(window_starts(gh, wh, stride[0]), dtype=torch.long)
        xs = torch.tensor(window_starts(gw, ww, stride[1]), dtype=torch.long)
        starts = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # [nw, 2]
        rows = starts[:, :1, None] + torch.arange(wh).view(1, wh, 1)  # [nw, wh, 1]
        cols = starts[:, 1:, None] + torch.arange(ww).view(1, 1, ww)  # [nw, 1, ww]
        cell_index = (rows * gw + cols).reshape(len(starts), wh * ww)  # [nw, n]
        count = torch.bincount(cell_index.reshape(-1), minlength=gh * gw).float()
        return cls((gh, gw), (wh, ww), starts.to(device), cell_index.to(device), count.to(device))

    @property
    def num_windows(self) -> int:
        return int(self.starts.shape[0])

    def flat_index(self, items: Tensor) -> Tensor:
        """items [M] (image b, window w) pairs numbered b * nw + w -> [M, n] rows of a [B * gh * gw, S] grid."""
        nw = self.num_windows
        return (items // nw)[:, None] * (self.grid[0] * self.grid[1]) + self.cell_index[items % nw]

    def gather(self, x01: Tensor, items: Tensor, patch: tuple[int, int]) -> Tensor:
        """The crops of ``items`` from x01 [B, 3, gh * ph, gw * pw] -> [M, 3, wh * ph, ww * pw] (one gather)."""
        (wh, ww), (ph, pw), nw = self.cells, patch, self.num_windows
        if nw == 1 and self.cells == self.grid:
            return x01[items]  # one window covering the grid: the images themselves
        start = self.starts[items % nw]  # [M, 2] in patches
        rows = start[:, :1] * ph + torch.arange(wh * ph, device=x01.device)  # [M, wh * ph]
        cols = start[:, 1:] * pw + torch.arange(ww * pw, device=x01.device)  # [M, ww * pw]
        img = (items // nw)[:, None, None]
        crops = x01.permute(0, 2, 3, 1)[img, rows[:, :, None], cols[:, None, :]]  # [M, wh * ph, ww * pw, 3]
        return crops.permute(0, 3, 1, 2).contiguous()


def pixels_to_cells(name: str, value: object, patch: tuple[int, int]) -> Cells | None:
    """A window or stride in pixels (int or (h, w), multiples of the patch size) -> patches (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        raise InputTypeError(f"{name} must be an int or a pair of ints (height, width) in pixels, got {value!r}")
    out = []
    for v, p in zip(value, patch, strict=True):
        v = int(v)
        if v <= 0:
            raise InputError(f"{name} must be positive, got {value!r}")
        if v % p:
            lo, hi = max(p, v // p * p), (v // p + 1) * p
            raise InputError(f"{name}={v} is not a multiple of the patch size {p}; use {lo} or {hi}")
        out.append(v // p)
    return out[0], out[1]


def window_bytes(dense: Any, mode: str, affinity_fn: Any, cells: Cells, synonyms: int) -> int:
    """Bytes of one window of (wh, ww) patches through ``dense`` (a DenseCLIP) and the head
    (see :meth:`ovss_fast.Segmenter.memory_estimate` for the terms)."""
    n = cells[0] * cells[1]
    t = n + 1
    e = dense.dtype.itemsize
    width, heads = dense.tower.conv.out_channels, dense.heads
    last = _LAST_BLOCK_TENSORS[dense.preset.attention]
    tower = 12 * t * width * e + 2 * heads * t * t * e
    tower += last * heads * t * t * 4 + n * n * 4
    head = (0 if mode == "kl" else 6) * n * n * 4 + 8 * n * synonyms * 4
    per_crop = getattr(affinity_fn, "memory_per_crop", None)  # "sd2" / "dino"; 0 for "clip" and plain callables
    return tower + head + (0 if per_crop is None else int(per_crop(cells)))


@dataclass
class Windows:
    """How a Segmenter cuts images into windows, and how it puts their maps back together.

    patch (ph, pw) pixels; window / stride in patches (None: the whole image as one window);
    resize: the shorter side images are resized to (None: native size, snapped to whole patches);
    one_window_bytes(cells, synonyms): the memory guard's estimate of one window (:func:`window_bytes`);
    fallback: the window (in patches; stride half of it) for images whose windows do not fit
    ``memory_budget`` (None: refuse them). Nothing here changes while images go through: a fallback is
    noted on the call's record (``record.fell_back``, :class:`~ovss_fast.pipeline.prediction.RunRecord`).
    """

    patch: Cells
    window: Cells | None
    stride: Cells | None
    resize: int | None
    antialias: bool
    crop: str
    memory_budget: float
    batch_windows: bool
    one_window_bytes: Callable[[Cells, int], int]
    fallback: Cells | None = None

    @classmethod
    def from_pixels(cls, patch: Cells, window: object, stride: object, fallback: object = None,
                    **kwargs: Any) -> Windows:
        """Windows from a window / stride / fallback window in pixels, checked; the stride defaults to half
        the window."""
        win, step = pixels_to_cells("window", window, patch), pixels_to_cells("stride", stride, patch)
        kwargs["fallback"] = pixels_to_cells("fallback_window", fallback, patch)
        if step is not None and win is None:
            raise InputError("stride is given without window; pass window too (stride is the step between windows)")
        if win is not None and step is None:
            step = (max(1, win[0] // 2), max(1, win[1] // 2))
        out = cls(patch, win, step, **kwargs)
        if win is not None and (step[0] > win[0] or step[1] > win[1]):
            raise InputError(f"stride {out.px(step)} is larger than window {out.px(win)}: it would leave gaps; use "
                             "stride <= window")
        return out

    def px_pair(self, cells: Cells) -> tuple[int, int]:
        return cells[0] * self.patch[0], cells[1] * self.patch[1]

    def px(self, cells: Cells) -> str:
        h, w = self.px_pair(cells)
        return str(h) if h == w else f"({h}, {w})"

    def describe(self) -> str:
        out = "whole image" if self.window is None else f"{self.px(self.window)} / {self.px(self.stride)}"
        return out if self.fallback is None else f"{out} (too large for memory_budget: {self.px(self.fallback)})"

    # ----------------------------------------------------------------------- geometry
    def grid_for(self, height: int, width: int) -> Cells:
        """Low-resolution patch grid (gh, gw) of an image of height x width pixels."""
        if self.resize is not None:
            s = self.resize / min(height, width)
            height, width = height * s, width * s
        return (max(1, round(height / self.patch[0])), max(1, round(width / self.patch[1])))

    def cells(self, grid: Cells) -> tuple[Cells, Cells]:
        """(window, stride) in patches on a (gh, gw) grid: the window clipped to the grid."""
        if self.window is None:
            return grid, grid
        return (min(self.window[0], grid[0]), min(self.window[1], grid[1])), self.stride

    def layout(self, grid: Cells, device: torch.device | str = "cpu") -> WindowLayout:
        cells, stride = self.cells(grid)
        return WindowLayout.build(grid, cells, stride, device)

    def on_grid(self, img: Tensor) -> Tensor:
        """img [B, 3, H, W] -> resized to whole patches of its patch grid, [B, 3, gh * ph, gw * pw] in [0, 1]."""
        H, W = img.shape[-2:]
        gh, gw = self.grid_for(H, W)
        ph, pw = self.patch
        if (gh * ph, gw * pw) == (H, W):
            return img
        return F.interpolate(img, size=(gh * ph, gw * pw), mode="bilinear", align_corners=False,
                             antialias=self.antialias).clamp(0, 1)

    # ----------------------------------------------------------------------- the memory guard
    def memory_estimate(self, height: int, width: int, batch: int = 1, synonyms: int = 0) -> int:
        (wh, ww), _ = self.cells(self.grid_for(height, width))
        return int(batch) * self.one_window_bytes((wh, ww), int(synonyms))

    def plan(self, height: int, width: int, synonyms: int, batch: int = 1, record: Any = None) -> Windows:
        """The windows for ``batch`` images of height x width: these, or when ``batch`` of their windows do
        not fit ``memory_budget`` and a fallback is set, the fallback window every half window (noted on
        ``record`` when given: ``record.fell_back(size, window, fallback, reason)``)."""
        if self.fallback is None:
            return self
        need = self.memory_estimate(height, width, batch, synonyms)
        if need <= self.memory_budget:
            return self
        step = (max(1, self.fallback[0] // 2), max(1, self.fallback[1] // 2))
        if record is not None:
            record.fell_back((height, width), None if self.window is None else self.px_pair(self.window),
                             self.px_pair(self.fallback),
                             f"about {need / 2**30:.2f} GiB for {batch} window(s) of "
                             f"{'the whole image' if self.window is None else self.px(self.window)}, over "
                             f"memory_budget = {self.memory_budget / 2**30:.2f} GiB")
        return replace(self, window=self.fallback, stride=step, fallback=None)

    def per_chunk(self, height: int, width: int, synonyms: int) -> int:
        """How many windows go through together so a chunk fits ``memory_budget``; raises if one does not."""
        (wh, ww), _ = self.cells(self.grid_for(height, width))
        one = self.one_window_bytes((wh, ww), synonyms)
        if one > self.memory_budget:
            self.refuse(height, width, 1, synonyms)
        return max(1, int(self.memory_budget // one))

    def refuse(self, height: int, width: int, batch: int, synonyms: int) -> None:
        need = self.memory_estimate(height, width, batch, synonyms)
        (wh, ww), _ = self.cells(self.grid_for(height, width))
        side = 0  # the largest square window (in patches) whose batch fits
        while side < 4096 and batch * self.one_window_bytes((side + 1, side + 1), synonyms) <= self.memory_budget:
            side += 1
        what = "as one window" if self.window is None else f"with window {self.px(self.window)}"
        msg = (
            f"segmenting a {height}x{width} image {what} (a {wh}x{ww} patch window, N = {wh * ww}, batch {batch}) "
            f"needs about {need / 2**30:.2f} GiB (visual tower activations and N x N tensors, see "
            f"Segmenter.memory_estimate), over memory_budget = {self.memory_budget / 2**30:.2f} GiB; "
        )
        if side >= 1:
            win = side * self.patch[0]
            msg += (f"pass window={win}, stride={max(1, side // 2) * self.patch[0]} "
                    f"(--window {win} --stride {max(1, side // 2) * self.patch[0]} on the command line)")
            if batch > 1:
                msg += ", or fewer images at once"
            msg += ", or raise memory_budget"
        else:
            msg += "even one patch does not fit: raise memory_budget or pass fewer images at once"
        raise InputError(msg)

    def pixel_stage_images(self, batch: int, channels: int, height: int, width: int, radius: int) -> int:
        """How many of ``batch`` images refine "lposs+" takes at once within ``memory_budget``
        (:func:`pixel_stage_bytes`); an InputError when one image does not fit."""
        one = pixel_stage_bytes(1, channels, height, width, radius)
        if one > self.memory_budget:
            raise InputError(
                f"refine 'lposs+' on a {height}x{width} image with {channels} maps (classes' synonyms) and "
                f"lposs_radius={radius} needs about {one / 2**30:.2f} GiB (stencil weights and the conjugate "
                f"gradient's vectors), over memory_budget = {self.memory_budget / 2**30:.2f} GiB; raise "
                "memory_budget (--memory-budget), resize the image smaller, or lower lposs_radius")
        return max(1, min(int(batch), int(self.memory_budget // one)))

    # ----------------------------------------------------------------------- aggregation on the patch grid
    def grid_maps(self, img: Tensor, K: int, window_maps: WindowMaps, record: Any = None,
                  joint: JointMaps | None = None) -> Tensor:
        """img [B, 3, H, W] in [0, 1] -> maps [B, K, gh, gw] (float32), the windows' maps averaged on the grid.

        All B x nw windows (nw per image, one size) go through in chunks of as many as
        ``memory_budget`` allows, one ``window_maps`` call per chunk; each chunk's maps are
        scatter-added onto the grid (index_add_ with precomputed patch indices), then divided
        by the number of windows covering each cell. With ``joint`` (module docstring) the chunks'
        outputs are kept until every window is in, turned into maps by ``joint``, then scattered.
        """
        B, _, H, W = img.shape
        plan = self.plan(H, W, K, 1 if self.batch_windows else B, record)
        if plan is not self:
            return plan.grid_maps(img, K, window_maps, joint=joint)
        if not self.batch_windows:
            return self.grid_maps_per_window(img, K, window_maps, joint)
        chunk = self.per_chunk(H, W, K)
        x01 = self.on_grid(img)
        gh, gw = self.grid_for(H, W)
        layout = self.layout((gh, gw), img.device)
        total = B * layout.num_windows
        acc = torch.zeros(B * gh * gw, K, device=img.device, dtype=torch.float32)  # [B * gh * gw, K]
        kept = []
        for start in range(0, total, chunk):
            items = torch.arange(start, min(total, start + chunk), device=img.device)  # (image, window) pairs
            m = window_maps(layout.gather(x01, items, self.patch))  # [M, n, K] ([M, n, F] with joint)
            if joint is None:
                acc.index_add_(0, layout.flat_index(items).reshape(-1), m.reshape(-1, K))
            else:
                kept.append(m)
        if joint is not None:
            n = layout.cell_index.shape[1]
            inputs = torch.cat(kept).reshape(B, layout.num_windows * n, -1)
            offsets = layout.starts * torch.tensor(self.patch, device=img.device)
            m = joint(inputs, patch_centres(offsets, layout.cells, self.patch))  # [B, nw * n, K]
            acc.index_add_(0, layout.flat_index(torch.arange(total, device=img.device)).reshape(-1), m.reshape(-1, K))
        return (acc.view(B, gh * gw, K) / layout.count.view(1, -1, 1)).transpose(1, 2).reshape(B, K, gh, gw)

    def grid_maps_per_window(self, img: Tensor, K: int, window_maps: WindowMaps,
                             joint: JointMaps | None = None) -> Tensor:
        """The per-window path: one ``window_maps`` call per window (the B images together)."""
        B, _, H, W = img.shape
        if self.memory_estimate(H, W, B, K) > self.memory_budget:
            self.refuse(H, W, B, K)
        x01 = self.on_grid(img)
        gh, gw = self.grid_for(H, W)
        ph, pw = self.patch
        (wh, ww), (sh, sw) = self.cells((gh, gw))
        acc = torch.zeros(B, K, gh, gw, device=img.device, dtype=torch.float32)
        count = torch.zeros(1, 1, gh, gw, device=img.device, dtype=torch.float32)
        starts = [(y0, x0) for y0 in window_starts(gh, wh, sh) for x0 in window_starts(gw, ww, sw)]
        maps = [window_maps(x01[:, :, y0 * ph:(y0 + wh) * ph, x0 * pw:(x0 + ww) * pw]) for y0, x0 in starts]
        if joint is not None:  # [B, n, F] per window -> [B, nw * n, K] -> [B, n, K] per window
            offsets = torch.tensor(starts, device=img.device) * torch.tensor(self.patch, device=img.device)
            joined = joint(torch.cat(maps, dim=1), patch_centres(offsets, (wh, ww), self.patch))
            maps = list(joined.split(wh * ww, dim=1))
        for (y0, x0), m in zip(starts, maps, strict=True):  # m [B, n, K]
            acc[:, :, y0:y0 + wh, x0:x0 + ww] += m.transpose(1, 2).reshape(B, K, wh, ww)
            count[:, :, y0:y0 + wh, x0:x0 + ww] += 1
        return acc / count

    # ----------------------------------------------------------------------- the peers' pixel aggregation
    def pixel_size(self, height: int, width: int) -> Cells:
        """The processed size for aggregation "pixels": ``resize`` on the short side (half up), not snapped."""
        if self.resize is None:
            return height, width
        s = self.resize / min(height, width)
        return max(1, int(height * s + 0.5)), max(1, int(width * s + 0.5))

    def _crop_grid(self, hc: int, wc: int) -> Cells:
        ph, pw = self.patch
        if self.crop == "pad":
            return -(-hc // ph), -(-wc // pw)
        if hc < ph or wc < pw:
            raise InputError(f"a {hc}x{wc} crop is smaller than one {ph}x{pw} patch; use crop='pad' or a larger "
                             "image / resize")
        return hc // ph, wc // pw

    def pixel_maps(self, img: Tensor, K: int, window_maps: WindowMaps, pad: tuple[float, ...],
                   record: Any = None, joint: JointMaps | None = None) -> Tensor:
        """img [B, 3, H, W] in [0, 1] -> maps [B, K, h, w] at the processed size (peers' slide inference):
        windows of the window size in pixels every stride pixels (the last shifted back to the border),
        each window's patch maps upsampled bilinearly to the window's pixels and averaged where windows
        overlap. pad: the colour crop="pad" pads with (the normalisation mean: zeros once normalised).
        With ``joint`` (module docstring) every window's output is kept until all are in and turned into
        maps by ``joint`` first (LPOSS: the count map averages the windows' resized maps)."""
        B, _, H, W = img.shape
        plan = self.plan(H, W, K, record=record)
        if plan is not self:
            return plan.pixel_maps(img, K, window_maps, pad, joint=joint)
        h, w = self.pixel_size(H, W)
        x01 = img if (h, w) == (H, W) else F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False,
                                                          antialias=self.antialias).clamp(0, 1)
        ph, pw = self.patch
        if self.window is None:
            (hc, wc), (sy, sx) = (h, w), (h, w)
        else:
            hc, wc = min(self.window[0] * ph, h), min(self.window[1] * pw, w)
            sy, sx = self.stride[0] * ph, self.stride[1] * pw
        fh, fw = self._crop_grid(hc, wc)
        one = self.one_window_bytes((fh, fw), K)
        if one > self.memory_budget:
            self.refuse(H, W, 1, K)
        chunk = max(1, int(self.memory_budget // one))
        starts = [(y, x) for y in window_starts(h, hc, sy) for x in window_starts(w, wc, sx)]
        items = [(b, y, x) for b in range(B) for y, x in starts]
        acc = torch.zeros(B, K, h, w, device=img.device, dtype=torch.float32)
        count = torch.zeros(1, 1, h, w, device=img.device, dtype=torch.float32)
        mean = torch.tensor(pad, device=img.device, dtype=x01.dtype).view(1, 3, 1, 1)
        chunks = []  # (items, their maps [M, n, K]) in order
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            crops = torch.stack([x01[b, :, y:y + hc, x:x + wc] for b, y, x in part])  # [M, 3, hc, wc]
            if self.crop == "pad" and (fh * ph, fw * pw) != (hc, wc):
                padded = mean.expand(len(part), 3, fh * ph, fw * pw).clone()
                padded[:, :, :hc, :wc] = crops
                crops = padded
            else:
                crops = crops[:, :, :fh * ph, :fw * pw]
            m = window_maps(crops)
            if joint is None:
                self._add_window_maps(acc, count, part, m, (fh, fw), (hc, wc))
            else:
                chunks.append(m)
        if joint is not None:
            n = fh * fw
            inputs = torch.cat(chunks).reshape(B, len(starts) * n, -1)
            offsets = torch.tensor(starts, device=img.device, dtype=torch.float32)
            m = joint(inputs, patch_centres(offsets, (fh, fw), self.patch)).reshape(B * len(starts), n, K)
            for start in range(0, len(items), chunk):
                self._add_window_maps(acc, count, items[start:start + chunk], m[start:start + chunk], (fh, fw),
                                      (hc, wc))
        return acc / count

    def _add_window_maps(self, acc: Tensor, count: Tensor, part: list[tuple[int, int, int]], m: Tensor,
                         cells: Cells, crop: Cells) -> None:
        """Windows ``part`` ((image, y, x) each) with maps m [M, n, K] on their (fh, fw) patches: upsampled
        bilinearly to their (hc, wc) pixels, added onto acc [B, K, h, w] and counted (image 0) in count."""
        (fh, fw), (hc, wc), (ph, pw) = cells, crop, self.patch
        K = acc.shape[1]
        m = m.transpose(1, 2).reshape(len(part), K, fh, fw)
        if self.crop == "pad":
            m = F.interpolate(m, size=(fh * ph, fw * pw), mode="bilinear", align_corners=False)[:, :, :hc, :wc]
        else:
            m = F.interpolate(m, size=(hc, wc), mode="bilinear", align_corners=False)
        for (b, y, x), mi in zip(part, m, strict=True):
            acc[b, :, y:y + hc, x:x + wc] += mi
            if b == 0:
                count[:, :, y:y + hc, x:x + wc] += 1


__all__ = ["DEFAULT_MEMORY_BUDGET", "JointMaps", "WindowLayout", "Windows", "patch_centres", "pixel_stage_bytes",
           "pixels_to_cells", "window_bytes", "window_starts"]
