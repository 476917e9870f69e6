"""Image decoding shared by Segmenter (load_image, PIL inputs) and the datasets (read_image).

Every file is generated here with PIL: high bit depth is scaled (not clipped), alpha
is composited on black, CMYK / LA / palette-with-transparency convert by their colour
model, and only ``load_image`` (what ``segment`` reads) applies the EXIF orientation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovss_fast.eval.datasets import read_image
from ovss_fast.pipeline.image_inputs import load_image, pil_to_tensor

H, W = 6, 10


def ramp16() -> np.ndarray:
    """A 16-bit ramp over the whole range: 8-bit clipping would turn ~99.6 % of it into 1.0."""
    return np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)


def save(im: Image.Image, tmp_path, name: str, **kw) -> str:
    path = str(tmp_path / name)
    im.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path, mode):
    raw = ramp16()
    im = Image.fromarray(raw)  # I;16
    if mode == "I;16B":
        im = Image.frombytes("I;16B", (W, H), raw.astype(">u2").tobytes())
    elif mode == "I":
        im = Image.fromarray(raw.astype(np.int32))
    assert im.mode == mode
    want = torch.from_numpy(raw.astype(np.float32) / 65535.0)
    t = pil_to_tensor(im)
    assert t.shape == (3, H, W) and t.dtype == torch.float32
    torch.testing.assert_close(t, want.expand(3, H, W), atol=1e-6, rtol=0)
    # through a 16-bit PNG file (Pillow opens it as I;16 or I)
    path = save(Image.fromarray(raw), tmp_path, "grey16.png")
    torch.testing.assert_close(load_image(path), want.expand(3, H, W), atol=1e-6, rtol=0)
    u8 = read_image(path)
    assert u8.dtype == torch.uint8
    assert torch.equal(u8, (want * 255).round().to(torch.uint8).expand(3, H, W))
    assert float((u8 == 255).float().mean()) < 0.05  # not saturated


def test_thirty_two_bit_integer_out_of_the_sixteen_bit_range_is_an_error():
    im = Image.fromarray(np.full((H, W), 70000, dtype=np.int32))
    with pytest.raises(ValueError, match="mode 'I'.*70000"):
        pil_to_tensor(im)


def test_float_images_in_unit_range():
    arr = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    torch.testing.assert_close(pil_to_tensor(Image.fromarray(arr, mode="F")), torch.from_numpy(arr).expand(3, H, W))
    with pytest.raises(ValueError, match="mode 'F'"):
        pil_to_tensor(Image.fromarray(arr * 3, mode="F"))


def test_cmyk_converts_by_its_colour_model(tmp_path):
    cmyk = np.zeros((H, W, 4), dtype=np.uint8)
    cmyk[:, : W // 2] = (255, 0, 0, 0)  # pure cyan
    cmyk[:, W // 2 :] = (0, 0, 0, 255)  # pure black
    path = save(Image.fromarray(cmyk, mode="CMYK"), tmp_path, "cmyk.jpg", quality=100)
    t = load_image(path)
    assert t[:, :, 0].sub(torch.tensor([0.0, 1.0, 1.0])[:, None]).abs().max() < 0.03
    assert t[:, :, -1].abs().max() < 0.03
    assert torch.equal(read_image(path), (t * 255).round().to(torch.uint8))


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 255
    rgba[:, : W // 2, 3] = 0  # transparent: black, whatever colour is stored under it
    rgba[0, -1, 3] = 128  # half transparent: half the colour
    path = save(Image.fromarray(rgba, mode="RGBA"), tmp_path, "rgba.png")
    t = load_image(path)
    assert t[:, :, : W // 2].abs().max() == 0
    torch.testing.assert_close(t[:, 1, -1], torch.tensor([200, 100, 50]) / 255.0)
    torch.testing.assert_close(t[:, 0, -1], torch.tensor([200, 100, 50]) / 255.0 * (128 / 255), atol=1e-6, rtol=0)
    # LA: grey with alpha
    la = np.stack([np.full((H, W), 180, np.uint8), np.where(np.arange(W) < 3, 0, 255).astype(np.uint8)[None]
                   .repeat(H, 0)], axis=-1)
    t = load_image(save(Image.fromarray(la, mode="LA"), tmp_path, "la.png"))
    assert t[:, :, :3].abs().max() == 0
    torch.testing.assert_close(t[:, :, 3:], torch.full((3, H, W - 3), 180 / 255.0))
    u8 = read_image(str(tmp_path / "la.png"))
    assert int(u8[:, :, :3].max()) == 0 and int(u8[:, :, 3:].min()) == 180


def test_palette_with_transparency(tmp_path):
    idx = np.zeros((H, W), dtype=np.uint8)
    idx[:, W // 2 :] = 1
    im = Image.fromarray(idx, mode="P")
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.info["transparency"] = 0  # index 0 transparent
    path = save(im, tmp_path, "p.png", transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    t = load_image(path)
    assert t[:, :, : W // 2].abs().max() == 0  # not the stored (10, 20, 30)
    torch.testing.assert_close(t[:, :, W // 2 :], (torch.tensor([200, 100, 50]) / 255.0)[:, None, None]
                               .expand(3, H, W - W // 2))
    # without transparency the palette colours come through
    im2 = Image.fromarray(idx, mode="P")
    im2.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    t2 = load_image(save(im2, tmp_path, "p2.png"))
    torch.testing.assert_close(t2[:, 0, 0], torch.tensor([10, 20, 30]) / 255.0)


def test_eight_bit_rgb_and_grey_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = save(Image.fromarray(rgb), tmp_path, "rgb.png")
    assert torch.equal(read_image(path), torch.from_numpy(rgb).permute(2, 0, 1))
    torch.testing.assert_close(load_image(path), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    grey = rgb[..., 0]
    path = save(Image.fromarray(grey), tmp_path, "l.png")
    assert torch.equal(read_image(path), torch.from_numpy(grey)[None].expand(3, H, W))


def test_exif_orientation_applies_to_segment_inputs_not_to_datasets(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(im, tmp_path, "rot.png", exif=exif)
    shown = np.asarray(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270))
    assert shown.shape == (W, H, 3)
    torch.testing.assert_close(load_image(path), torch.from_numpy(shown.copy()).permute(2, 0, 1).float() / 255)
    assert torch.equal(read_image(path), torch.from_numpy(rgb).permute(2, 0, 1))  # datasets: as stored


def test_segment_cli_reads_the_displayed_orientation(tmp_path):
    """``ovss-fast segment`` writes labels at the displayed size (W x H for an EXIF-rotated H x W file)."""
    pytest.importorskip("open_clip")
    from ovss_fast.apps.cli import main

    rgb = np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 8
    path = save(im, tmp_path, "rot.png", exif=exif)
    out = tmp_path / "labels.png"
    rc = main(["segment", path, "--classes", "cat, dog", "--model", "ovss-fast-tiny", "--pretrained", "none",
               "--backend", "reference", "--out", str(out)])
    assert rc == 0
    with Image.open(out) as lab:
        assert lab.size == (32, 48)  # (width, height) as displayed


def test_rgba_arrays_are_composited_like_files():
    from ovss_fast.pipeline.image_inputs import as_image_batches

    arr = np.zeros((H, W, 4), dtype=np.uint8)
    arr[..., :3] = 200
    arr[..., 3] = 255
    arr[:, :3, 3] = 0
    (t,), kind = as_image_batches(arr)
    assert kind == "single" and t.shape == (1, 3, H, W)
    assert t[..., :3].abs().max() == 0
    torch.testing.assert_close(t, pil_to_tensor(Image.fromarray(arr, mode="RGBA"))[None])
