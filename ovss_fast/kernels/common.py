"""What the kernel layer's modules share: the names of the choices the spec offers and the JBU tap geometry.

The reference and the Triton kernels both import from here, so neither reaches into the other's private
helpers; the public ops (:mod:`ovss_fast.ops.validate`) take the choices from here too.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The head's defaults, one place for every layer (reference, cpu, cuda, triton, the public ops and
#: :class:`~ovss_fast.ops.options.HeadOptions`). The paper's value where it states one (eps, iters, sk_iters);
#: elsewhere the synthetic ablation's choice (docs/defaults.md, bench/RESULTS.md "Synthetic ablation":
#: steps 25, tau 0.1, JBU sigma_spatial 0.5 patches, sigma_range 0.2, radius 1 patch).
EPS = 0.1
ITERS = 50
SK_ITERS = 15
STEPS = 25
TAU = 0.1
SIGMA_SPATIAL = 0.5
SIGMA_RANGE = 0.2
RADIUS = 1

#: mode "mv"'s matrix before Sinkhorn-Knopp: the symmetrised attention Sym / M (the paper) or the Gibbs
#: kernel K (ours); method.md section 3. The default (the paper's) first.
TRANSITIONS = ("attention", "gibbs")
#: the axis NMS compares a probability along: its patch's classes (ours) or its class's patches (a reading of
#: the paper); method.md section 1
NMS_AXES = ("classes", "patches")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (every backend computes in this dtype)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def tap_geometry(
    h: int, w: int, H: int, W: int, radius: int, device: torch.device, dt: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Low-res positions p' (rounded to ``dt``) and their nearest grid cell for every output row / column.

    p' is formed in float64 for every dtype and the cells are taken from it (round half up,
    floor(p' + 0.5), the same in every backend): formed in float32, p' = k + 0.5 can round to
    just below it (h = 2, H = 41: row 20) and move that row's whole tap window one cell.
    """
    py = (torch.arange(H, device=device, dtype=torch.float64) + 0.5) * (h / H) - 0.5  # [H]
    px = (torch.arange(W, device=device, dtype=torch.float64) + 0.5) * (w / W) - 0.5  # [W]
    cy = torch.floor(py + 0.5).long()
    cx = torch.floor(px + 0.5).long()
    return py.to(dt), px.to(dt), cy, cx


def lowres_guide(guide: Tensor, h: int, w: int, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """Gd = the guide area-averaged to [h, w] (adaptive average pooling) in float64, as hi + lo in ``dt``.

    A small sigma_r amplifies Gd's rounding: rounding it to one float32 alone moves the
    upsampled scores by 1e-4 at sigma_r = 1e-3; hi + lo carries it to ~1e-14.
    """
    gd = torch.nn.functional.adaptive_avg_pool2d(guide.to(torch.float64), (h, w))
    hi = gd.to(dt)
    return hi, (gd - hi.to(torch.float64)).to(dt)


def symmetric_knn_graph(index: Tensor, w: Tensor) -> Tensor:
    """LPOSS's normalised graph from each node's neighbours index [N, k] and edge weights w [N, k]: S =
    D^-1/2 (W + W^T) D^-1/2 with the diagonal removed (an edge found from both ends counts twice) and d the row
    sums (0 -> 1), as a coalesced sparse COO matrix [N, N] of O(N k) entries. Shared by the reference and the
    PyTorch path of the compiled backends (kernels/propagation.py)."""
    N = index.shape[0]
    rows = torch.arange(N, device=index.device).repeat_interleave(index.shape[1])
    cols, w = index.reshape(-1), w.reshape(-1)
    off = rows != cols
    rows, cols, w = rows[off], cols[off], w[off]
    coo = torch.sparse_coo_tensor(torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
                                  torch.cat([w, w]), (N, N), check_invariants=False).coalesce()
    (r, c), v = coo.indices(), coo.values()
    degree = torch.zeros(N, dtype=v.dtype, device=v.device).index_add_(0, r, v)
    inv = torch.where(degree == 0, torch.ones_like(degree), degree).rsqrt()
    return torch.sparse_coo_tensor(coo.indices(), v * inv[r] * inv[c], (N, N), is_coalesced=True,
                                   check_invariants=False)
