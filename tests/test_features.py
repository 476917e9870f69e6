"""Dense-feature presets (peers.md's table) against float64 formulas written here, on random-weight ViTs.

The reference below re-implements each method's last block from the open_clip module's
raw weights (in_proj, out_proj, ln_1/ln_2, mlp, ln_post, proj) in float64; it does not
call ovss_fast.models.clip_features.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip", reason="dense features need open_clip_torch")

from conftest import rel_err, tiny_open_clip  # noqa: E402

from ovss_fast.models.clip_features import FEATURES, DenseCLIP, interpolate_positions  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip(3)[0]


def _pos64(visual, grid, how):
    pos = visual.positional_embedding.double()
    g0, g1 = visual.grid_size
    if tuple(grid) == (g0, g1):
        return pos
    patches = pos[1:].reshape(1, g0, g1, -1).permute(0, 3, 1, 2)
    if how == "size":
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    else:
        patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / g0, (grid[1] + 0.1) / g1),
                                mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


@torch.no_grad()
def reference_features(visual, x, features, pos_interp="size", std=5.0):
    """float64: the peers' last block written out from the weights; returns (feats [B, N, D], qk attention)."""
    v = copy.deepcopy(visual).double()
    x = x.double()
    B = x.shape[0]
    P = v.patch_size[0]
    grid = (x.shape[2] // P, x.shape[3] // P)
    tok = F.conv2d(x, v.conv1.weight, stride=P).flatten(2).transpose(1, 2)
    tok = torch.cat([v.class_embedding.view(1, 1, -1).expand(B, 1, -1), tok], 1) + _pos64(v, grid, pos_interp)
    h = v.ln_pre(tok)
    for blk in v.transformer.resblocks[:-1]:
        h = blk(h)
    last = v.transformer.resblocks[-1]
    W = h.shape[-1]
    heads = last.attn.num_heads
    d = W // heads
    y = F.layer_norm(h, (W,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)
    qkv = y @ last.attn.in_proj_weight.T + last.attn.in_proj_bias
    q, k, val = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in qkv.split(W, dim=-1))

    def sm(a, b, extra=0.0):
        return torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(d) + extra, dim=-1)

    L = q.shape[2]
    if features == "clip":
        attn = sm(q, k)
    elif features == "sclip":
        attn = sm(q, q) + sm(k, k)
    elif features == "clearclip":
        attn = sm(q, q)
    elif features == "naclip":
        gauss = torch.zeros(L, L, dtype=torch.float64)
        for i in range(1, L):
            for j in range(1, L):
                ri, ci = divmod(i - 1, grid[1])
                rj, cj = divmod(j - 1, grid[1])
                gauss[i, j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * std ** 2))
        attn = sm(k, k, gauss)
    elif features in ("maskclip", "maskclip-res"):
        attn = torch.eye(L, dtype=torch.float64).expand(B, heads, L, L)
    o = (attn @ val).transpose(1, 2).reshape(B, L, W) @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    if features in ("clip", "sclip", "maskclip-res"):  # residual and MLP kept
        h = h + o
        h = h + last.mlp(F.layer_norm(h, (W,), last.ln_2.weight, last.ln_2.bias, last.ln_2.eps))
    else:  # residual and MLP removed
        h = o
    out = F.layer_norm(h[:, 1:], (W,), v.ln_post.weight, v.ln_post.bias, v.ln_post.eps) @ v.proj
    qk = sm(q, k)[:, :, 1:, 1:].mean(1)
    return out, qk


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])  # the native 4 x 4 grid and a non-square 3 x 5 one
def test_preset_matches_its_formula(model, features, size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    feats, attn = DenseCLIP(model.visual, features=features)(x)
    want, want_attn = reference_features(model.visual, x, features)
    assert feats.dtype == torch.float32 and feats.shape == want.shape
    assert rel_err(feats, want) <= 1e-4, (features, rel_err(feats, want))
    # the "clip" affinity is the plain q-k attention whatever the preset
    assert rel_err(attn, want_attn) <= 1e-4


def test_presets_differ_from_each_other(model):
    x = torch.randn(1, 3, 48, 80)
    out = {f: DenseCLIP(model.visual, features=f)(x, need_attention=False)[0] for f in FEATURES}
    for a in FEATURES:
        for b in FEATURES:
            if a < b:
                assert not torch.allclose(out[a], out[b], atol=1e-4), (a, b)


def test_naclip_gaussian_matters_on_a_non_square_grid(model):
    """With a huge std the Gaussian is ~1 everywhere but the class token: not the same as a tiny std."""
    x = torch.randn(1, 3, 48, 96)  # 3 x 6
    wide = DenseCLIP(model.visual, features="naclip", naclip_std=1e6)(x)[0]
    want = reference_features(model.visual, x, "naclip", std=1e6)[0]
    assert rel_err(wide, want) <= 1e-4
    assert rel_err(DenseCLIP(model.visual, features="naclip", naclip_std=0.5)(x)[0],
                   reference_features(model.visual, x, "naclip", std=0.5)[0]) <= 1e-4
    assert not torch.allclose(wide, DenseCLIP(model.visual, features="naclip")(x)[0], atol=1e-4)


def test_need_attention_false_gives_the_same_features(model):
    x = torch.randn(1, 3, 48, 80)
    for f in FEATURES:
        a, att = DenseCLIP(model.visual, features=f)(x)
        b, none = DenseCLIP(model.visual, features=f)(x, need_attention=False)
        assert none is None and att is not None
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(3, 5), (7, 2), (9, 9)])
def test_peers_pos_interp_is_their_interpolate_call(model, grid):
    pos = model.visual.positional_embedding
    got = interpolate_positions(pos, (4, 4), grid, "peers")
    patches = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    direct = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / 4, (grid[1] + 0.1) / 4), mode="bicubic",
                           align_corners=False).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    torch.testing.assert_close(got, torch.cat([pos[:1], direct]), rtol=0, atol=0)
    size = interpolate_positions(pos, (4, 4), grid, "size")
    assert not torch.allclose(size, got)  # the two conventions sample differently
    torch.testing.assert_close(size[0], pos[0])  # the class position is kept by both


def test_peers_pos_interp_in_dense_features(model):
    x = torch.randn(1, 3, 48, 80)
    for f in ("clip", "naclip"):
        got = DenseCLIP(model.visual, features=f, pos_interp="peers")(x)[0]
        want = reference_features(model.visual, x, f, pos_interp="peers")[0]
        assert rel_err(got, want) <= 1e-4
    # the native grid is never interpolated
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(DenseCLIP(model.visual, pos_interp="peers")(x)[0], DenseCLIP(model.visual)(x)[0])


def test_bad_features_and_pos_interp(model):
    with pytest.raises(ValueError, match="features must be one of 'clip', 'maskclip', 'maskclip-res', 'sclip', "
                                         "'clearclip', 'naclip'"):
        DenseCLIP(model.visual, features="proxyclip")
    with pytest.raises(ValueError, match="self_self.*removed.*'sclip'.*'clearclip'"):
        DenseCLIP(model.visual, features="self_self")
    with pytest.raises(ValueError, match="pos_interp must be one of 'size', 'peers'"):
        DenseCLIP(model.visual, pos_interp="bilinear")
    with pytest.raises(ValueError, match="naclip_std must be a positive number"):
        DenseCLIP(model.visual, naclip_std=0)
