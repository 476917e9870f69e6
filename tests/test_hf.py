"""HuggingFace transformers CLIP in the pipeline: a tiny random CLIPModel against the same weights in open_clip.

No test reaches the network: the model is built from a config, the folder path is a
save_pretrained folder written here, and the tokenizer is open_clip's bundled one.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF CLIP support needs transformers (ovss_fast[hf])")
open_clip = pytest.importorskip("open_clip", reason="the comparison model is built with open_clip_torch")

from conftest import rel_err  # noqa: E402

from ovss_fast.models.clip_features import FEATURES, DenseCLIP  # noqa: E402
from ovss_fast.models.loading import HFCLIP  # noqa: E402
from ovss_fast.pipeline.segmenter import Segmenter  # noqa: E402

CLASSES = ["cat; kitten", "dog", "grass"]
TEMPLATES = ("a photo of a {}.", "a {}.")
WIDTH, LAYERS, HEADS, EMBED, IMAGE, PATCH, CONTEXT = 64, 2, 2, 32, 64, 16, 77


def hf_model(seed: int = 0):
    cfg = transformers.CLIPConfig(
        text_config={"hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": LAYERS,
                     "num_attention_heads": HEADS, "max_position_embeddings": CONTEXT, "vocab_size": 49408,
                     "hidden_act": "quick_gelu", "eos_token_id": 49407, "bos_token_id": 49406, "pad_token_id": 0},
        vision_config={"hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": LAYERS,
                       "num_attention_heads": HEADS, "image_size": IMAGE, "patch_size": PATCH,
                       "hidden_act": "quick_gelu"},
        projection_dim=EMBED)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # HF initialises LayerNorms to (1, 0) and biases to 0: randomise them so they matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _copy_layers(layers, resblocks):
    for hf, oc in zip(layers, resblocks, strict=True):
        a = hf.self_attn
        oc.ln_1.load_state_dict(hf.layer_norm1.state_dict())
        oc.ln_2.load_state_dict(hf.layer_norm2.state_dict())
        oc.attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        oc.attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        oc.attn.out_proj.load_state_dict(a.out_proj.state_dict())
        oc.mlp.c_fc.load_state_dict(hf.mlp.fc1.state_dict())
        oc.mlp.c_proj.load_state_dict(hf.mlp.fc2.state_dict())


@torch.no_grad()
def to_open_clip(hf):
    """The same weights in an open_clip CLIP (QuickGELU), written out here."""
    oc = open_clip.CLIP(
        embed_dim=EMBED, quick_gelu=True,
        vision_cfg={"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS,
                    "patch_size": PATCH},
        text_cfg={"context_length": CONTEXT, "vocab_size": 49408, "width": WIDTH, "heads": HEADS,
                  "layers": LAYERS}).eval()
    vm = hf.vision_model
    vm = getattr(vm, "vision_model", vm)  # transformers 4 nests the tower one level deeper
    v = oc.visual
    v.conv1.weight.copy_(vm.embeddings.patch_embedding.weight)
    v.class_embedding.copy_(vm.embeddings.class_embedding)
    v.positional_embedding.copy_(vm.embeddings.position_embedding.weight)
    v.ln_pre.load_state_dict(vm.pre_layrnorm.state_dict())
    _copy_layers(vm.encoder.layers, v.transformer.resblocks)
    v.ln_post.load_state_dict(vm.post_layernorm.state_dict())
    v.proj.copy_(hf.visual_projection.weight.T)
    tm = hf.text_model
    tm = getattr(tm, "text_model", tm)
    oc.token_embedding.weight.copy_(tm.embeddings.token_embedding.weight)
    oc.positional_embedding.copy_(tm.embeddings.position_embedding.weight)
    _copy_layers(tm.encoder.layers, oc.transformer.resblocks)
    oc.ln_final.load_state_dict(tm.final_layer_norm.state_dict())
    oc.text_projection.copy_(hf.text_projection.weight.T)
    return oc


@pytest.fixture(scope="module")
def pair():
    hf = hf_model()
    return hf, to_open_clip(hf), open_clip.SimpleTokenizer(context_length=CONTEXT)


def image(h, w, seed=0):
    x = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool2d(x[None], 5, 1, 2)[0].clamp(0, 1)


@pytest.mark.parametrize("features", FEATURES)
def test_every_preset_and_the_affinity_agree_with_open_clip(pair, features):
    hf, oc, _ = pair
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(2))  # a non-square, non-native grid
    for pos in ("size", "peers"):
        f_hf, a_hf = DenseCLIP(hf, features=features, pos_interp=pos)(x)
        f_oc, a_oc = DenseCLIP(oc.visual, features=features, pos_interp=pos)(x)
        assert rel_err(f_hf, f_oc) <= 1e-4, (features, pos)
        assert rel_err(a_hf, a_oc) <= 1e-4


def test_plain_features_match_transformers_own_forward(pair):
    """The "clip" preset is HF's last_hidden_state through post_layernorm and visual_projection; at a
    non-native grid with interpolate_pos_encoding=True (HF's own resize is our pos_interp="size")."""
    hf, _, _ = pair
    for size in ((64, 64), (48, 80)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            out = hf.vision_model(pixel_values=x, interpolate_pos_encoding=True)
            want = hf.visual_projection(hf.vision_model.post_layernorm(out.last_hidden_state[:, 1:]))
        got, _ = DenseCLIP(hf)(x)
        assert rel_err(got, want) <= 1e-4, size


def test_segmenter_on_hf_gives_the_open_clip_labels(pair):
    hf, oc, tok = pair
    kw = {"templates": TEMPLATES, "device": "cpu", "backend": "reference", "window": 48, "stride": 32,
          "features": "sclip"}
    s_hf = Segmenter.from_model(hf, tok, **kw)
    s_oc = Segmenter.from_model(oc, tok, **kw)
    assert isinstance(s_hf.model, HFCLIP) and s_hf.model_name == "CLIPModel"
    t_hf, _ = s_hf.text_features(CLASSES)
    t_oc, _ = s_oc.text_features(CLASSES)
    assert rel_err(t_hf, t_oc) <= 1e-4
    x = image(70, 100)
    sc_hf, sc_oc = s_hf.scores(x, CLASSES, upsample=False), s_oc.scores(x, CLASSES, upsample=False)
    # the two models' float32 features differ by ~1e-5; mv's default attention transition (Sym / max Sym,
    # unsharpened) carries that difference into the scores at ~2e-4 (the Gibbs kernel damped it below 1e-4)
    assert rel_err(sc_hf, sc_oc) <= 5e-4
    l_hf, l_oc = s_hf.seg(x, CLASSES), s_oc.seg(x, CLASSES)
    assert (l_hf == l_oc).float().mean() >= 0.999


def test_hf_local_folder(pair, tmp_path):
    hf, _, tok = pair
    hf.save_pretrained(tmp_path / "clip")
    kw = {"templates": TEMPLATES, "device": "cpu", "backend": "reference"}
    seg = Segmenter(model=f"hf:{tmp_path / 'clip'}", tokenizer=tok, **kw)
    assert seg.model_name == f"hf:{tmp_path / 'clip'}" and seg.patch == (PATCH, PATCH)
    x = image(64, 80)
    want = Segmenter.from_model(hf, tok, **kw).scores(x, CLASSES, upsample=False)
    assert rel_err(seg.scores(x, CLASSES, upsample=False), want) <= 1e-5
    # no tokenizer files in the folder and none given: say what to do
    with pytest.raises(RuntimeError, match="tokenizer.*tokenizer=") as info:
        Segmenter(model=f"hf:{tmp_path / 'clip'}", **kw)
    assert "save_pretrained" in str(info.value)


def test_hf_errors_say_what_to_do(pair, tmp_path, monkeypatch):
    hf, _, tok = pair
    with pytest.raises(FileNotFoundError, match="folder .* not found.*save_pretrained"):
        Segmenter(model=f"hf:{tmp_path / 'missing'}", device="cpu")
    with pytest.raises(ValueError, match="names no model"):
        Segmenter(model="hf:", device="cpu")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"offline.*huggingface-cli download openai/clip-vit-base-patch16.*"
                                           r"model='hf:/path/to/folder'"):
        Segmenter(model="hf:openai/clip-vit-base-patch16", device="cpu")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        Segmenter.from_model(hf, device="cpu")
