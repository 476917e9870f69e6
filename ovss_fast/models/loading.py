"""Model loading for the Segmenter: open_clip names, local files and folders, and HuggingFace transformers CLIP.

    load_model("ViT-B-16", "openai", ...)                   open_clip name + weights tag (or a local file)
    load_model("local-dir:/folder", ...) / "hf-hub:org/repo"  open_clip's own schemas
    load_model("hf:openai/clip-vit-base-patch16", ...)        transformers CLIPModel from the hub (when online)
    load_model("hf:/path/to/folder", ...)                     ... or from a local save_pretrained folder
    wrap_model(module, tokenizer)                             an already-built open_clip or transformers model

Every loader returns ``(model, tokenizer, name)`` where ``model`` has ``.visual`` (what
:class:`ovss_fast.models.clip_features.DenseCLIP` runs) and ``.encode_text(token_ids)``, and
``tokenizer(list[str]) -> token ids`` (a LongTensor [n, L]). A transformers model is
wrapped in :class:`HFCLIP` so the pipeline sees the same two methods.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ovss_fast.errors import InputError, InputTypeError, ModelLoadError
from ovss_fast.models.clip_features import TINY_MODEL, hf_vision_parts, register_tiny_config

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
#: OpenAI's CLIP mean / std (HF's CLIPImageProcessor defaults too).
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_PREFIX = "hf:"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


# --------------------------------------------------------------------------- errors
def state_dict_mismatch(message: str, shown: int = 4) -> str:
    """What torch's ``load_state_dict`` error says does not match, shortened: "missing keys (12): a, b, c, d
    and 8 more; unexpected keys (2): x, y; shape mismatch (1): w (checkpoint [3, 4], model [4, 4])";
    '' when the message is not one of those."""
    def keys(kind: str) -> list[str]:
        found = re.search(kind + r' key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)', message)
        return re.findall(r'"([^"]*)"', found.group(1)) if found else []

    def listed(what: str, items: list[str]) -> str:
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return f"{what} ({len(items)}): {', '.join(items[:shown])}{more}"

    shapes = [f"{k} (checkpoint [{a}], model [{b}])" for k, a, b in re.findall(
        r"size mismatch for ([^:\s]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, "
        r"the shape in current model is torch\.Size\(\[([^\]]*)\]\)", message)]
    parts = [listed(what, items) for what, items in (("missing keys", keys("Missing")),
                                                     ("unexpected keys", keys("Unexpected")),
                                                     ("shape mismatch", shapes)) if items]
    return "; ".join(parts)


def load_failure(exc: BaseException) -> str:
    """The part of a loader's exception worth one message: the mismatched keys of a state dict, else its first
    line (the whole exception stays chained as ``__cause__``)."""
    mismatch = state_dict_mismatch(str(exc))
    if mismatch:
        return f"the state dict does not match the model ({mismatch})"
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


# --------------------------------------------------------------------------- open_clip
def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_SUFFIXES) or os.path.exists(value)


def build_open_clip(model: str, pretrained: str | os.PathLike | None, *, device: torch.device,
                    dtype: torch.dtype, cache_dir: str | None = None) -> tuple[nn.Module, Callable]:
    """open_clip model (eval mode) and tokenizer, with errors that say what to do."""
    import open_clip

    if not isinstance(model, str):
        raise InputTypeError(f"model must be an open_clip model name or an nn.Module, got {type(model).__name__}")
    if model == TINY_MODEL:
        register_tiny_config()
    if model.startswith(("local-dir:", "hf-hub:")):
        return _build_from_schema(model, device=device, dtype=dtype, cache_dir=cache_dir)
    names = open_clip.list_models()
    if model not in names:
        close = difflib.get_close_matches(model, names, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise InputError(
            f"unknown open_clip model {model!r}; {hint}open_clip.list_models() lists the {len(names)} known "
            f"names (e.g. 'ViT-B-16', 'ViT-L-14'); '{TINY_MODEL}' is a tiny config for tests with pretrained=None"
        )
    kwargs: dict[str, Any] = {}
    source = "random"
    if pretrained is not None and os.fspath(pretrained).lower() == "none":
        pretrained = None
    if pretrained is None:
        warnings.warn(
            f"pretrained=None: open_clip model {model!r} has RANDOM weights; its segmentations are meaningless "
            "(use this for tests and smoke runs only)",
            UserWarning,
            stacklevel=4,  # the caller of Segmenter(...): Segmenter -> load_model -> build_open_clip
        )
    else:
        pretrained = os.fspath(pretrained)
        if _looks_like_path(pretrained):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(
                    f"pretrained weights file {pretrained!r} not found; pass pretrained='/path/to/checkpoint.pt' "
                    f"(an open_clip or OpenAI checkpoint of {model!r}), an open_clip tag such as 'openai' "
                    "(downloaded by open_clip when online), or None for random weights"
                )
            source = "file"
        else:
            tags = open_clip.list_pretrained_tags_by_model(model)
            if pretrained not in tags:
                known = ", ".join(map(repr, tags)) if tags else "none"
                raise InputError(
                    f"unknown pretrained tag {pretrained!r} for open_clip model {model!r} (known tags: {known}); "
                    "or pass a local checkpoint file as pretrained='/path/to/checkpoint.pt'"
                )
            source = "tag"
            tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
            model_cfg = open_clip.get_model_config(model) or {}
            if tag_cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
                kwargs["force_quick_gelu"] = True  # e.g. OpenAI's ViT-B-16 weights were trained with QuickGELU
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    try:
        clip = open_clip.create_model(model, pretrained=pretrained, precision=precision, device=device,
                                      cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # open_clip raises RuntimeError, OSError, KeyError, hub errors ...
        first = load_failure(exc)
        if source == "tag":
            raise ModelLoadError(
                f"could not get open_clip weights {model!r} / {pretrained!r}: {first}. If this machine is offline, "
                "download them once when online (open_clip caches them), or pass a local file: "
                f"pretrained='/path/to/checkpoint.pt' (an open_clip or OpenAI checkpoint of {model!r}; "
                "for OpenAI's own .pt files use the '-quickgelu' model name, e.g. 'ViT-B-16-quickgelu')"
            ) from exc
        if source == "file":
            raise ModelLoadError(
                f"could not load weights file {pretrained!r} into open_clip model {model!r}: {first}. "
                f"The file must be an open_clip or OpenAI checkpoint (state dict) of {model!r}"
            ) from exc
        raise ModelLoadError(f"could not build open_clip model {model!r}: {first}") from exc
    tokenizer = open_clip.get_tokenizer(model)
    return clip.eval(), tokenizer


def _build_from_schema(model: str, *, device: torch.device, dtype: torch.dtype,
                       cache_dir: str | None) -> tuple[nn.Module, Callable]:
    """open_clip's 'local-dir:/folder' (open_clip_config.json + weights) or 'hf-hub:org/repo' names."""
    import open_clip

    if model.startswith("local-dir:"):
        folder = model[len("local-dir:"):]
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise FileNotFoundError(
                f"model={model!r}: {os.path.join(folder, 'open_clip_config.json')!r} not found; a 'local-dir:' "
                "folder holds open_clip_config.json and the weights (e.g. open_clip_model.safetensors)"
            )
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    try:
        clip = open_clip.create_model(model, precision=precision, device=device, cache_dir=cache_dir,
                                      require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir)
    except Exception as exc:  # hub, JSON and checkpoint errors of many kinds
        first = load_failure(exc)
        raise ModelLoadError(
            f"could not load open_clip model {model!r}: {first}. Offline, pass a folder you downloaded: "
            "model='local-dir:/path/to/folder' (open_clip_config.json and weights), or a built-in name with "
            "pretrained='/path/to/checkpoint.pt'"
        ) from exc
    return clip.eval(), tokenizer


def _default_tokenizer(model: nn.Module) -> Callable:
    import open_clip

    return open_clip.SimpleTokenizer(context_length=int(getattr(model, "context_length", 77) or 77))


# --------------------------------------------------------------------------- HuggingFace transformers
def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "HuggingFace CLIP models need transformers, which is not installed: pip install 'ovss_fast[hf]'"
        ) from err
    return transformers


def is_hf_clip(module: object) -> bool:
    """True for a transformers CLIPModel (vision and text towers with their projections)."""
    return (isinstance(module, nn.Module) and hf_vision_parts(module) is not None
            and hasattr(module, "text_model") and hasattr(module, "get_text_features"))


class _HFVisual(nn.Module):
    """The vision tower and visual_projection of a transformers CLIPModel, as ``HFCLIP.visual``."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.vision_model, self.visual_projection = hf_vision_parts(clip)
        self.preprocess_cfg = {"mean": _OPENAI_MEAN, "std": _OPENAI_STD}


class HFTokenizer:
    """A transformers tokenizer as ``tokenizer(list[str]) -> LongTensor [n, context_length]`` (padded, truncated)."""

    def __init__(self, tokenizer: Any, context_length: int = 77) -> None:
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    def __call__(self, texts: Sequence[str]) -> Tensor:
        out = self.tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")
        return out["input_ids"]


class HFCLIP(nn.Module):
    """A transformers ``CLIPModel`` with the two methods the Segmenter uses: ``.visual`` and ``.encode_text``.

    ``encode_text(ids)`` is ``get_text_features(input_ids=ids)`` (the EOS token's state through
    text_projection); no attention mask is needed, since CLIP's text encoder is causal and
    pools at the first EOS, so padding after it never reaches the pooled state.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        if not is_hf_clip(clip):
            raise InputTypeError(f"expected a transformers CLIPModel, got {type(clip).__name__}")
        self.clip = clip
        self.visual = _HFVisual(clip)
        text_cfg = getattr(getattr(clip, "config", None), "text_config", None)
        self.context_length = int(getattr(text_cfg, "max_position_embeddings", 77) or 77)

    def encode_text(self, ids: Tensor) -> Tensor:
        out = self.clip.get_text_features(input_ids=ids)
        return out if isinstance(out, Tensor) else out.pooler_output  # transformers 4 / 5

    def forward(self, ids: Tensor) -> Tensor:  # pragma: no cover - nn.Module wants one
        return self.encode_text(ids)


def _hf_tokenizer(tokenizer: Any, context_length: int) -> Callable:
    """A transformers tokenizer wrapped to return ids; any other callable (e.g. open_clip's) as it is."""
    transformers = _require_transformers()
    if isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        return HFTokenizer(tokenizer, context_length)
    return tokenizer


def load_hf(spec: str, *, device: torch.device, dtype: torch.dtype, cache_dir: str | None = None,
            tokenizer: Callable | None = None) -> tuple[nn.Module, Callable, str]:
    """``hf:HUB_ID`` or ``hf:/local/folder`` -> (HFCLIP, tokenizer, name), with errors that say what to do."""
    transformers = _require_transformers()
    source = spec[len(HF_PREFIX):].strip()
    if not source:
        raise InputError("model='hf:' names no model; use e.g. 'hf:openai/clip-vit-base-patch16' or "
                         "'hf:/path/to/folder' (a folder written by CLIPModel.save_pretrained)")
    expanded = os.path.expanduser(source)
    local = os.path.isabs(expanded) or source.startswith((".", "~")) or os.path.exists(expanded)
    if local:
        if not os.path.isdir(expanded):
            raise FileNotFoundError(
                f"model={spec!r}: folder {expanded!r} not found; 'hf:/path' names a folder holding a transformers "
                "CLIPModel (config.json and model.safetensors, as written by save_pretrained or downloaded with "
                "huggingface-cli download openai/clip-vit-base-patch16 --local-dir /path)"
            )
        source = expanded
    offline_hint = (
        "If this machine is offline, download the model once when online (e.g. huggingface-cli download "
        f"{source if not local else 'openai/clip-vit-base-patch16'} --local-dir /path/to/folder) and pass "
        "model='hf:/path/to/folder'"
    )
    try:
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        clip = transformers.CLIPModel.from_pretrained(source, cache_dir=cache_dir, **{dtype_kw: dtype})
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"could not load transformers CLIPModel {source!r}: {load_failure(exc)}. "
                             f"{offline_hint}") from exc
    wrapped = HFCLIP(clip)
    if tokenizer is None:
        def no_tokenizer(why: str) -> ModelLoadError:
            return ModelLoadError(
                f"could not load the tokenizer of {source!r}: {why}. The folder needs the tokenizer files "
                "(tokenizer.json or vocab.json + merges.txt: tokenizer.save_pretrained(folder)), or pass "
                f"tokenizer=... (a transformers CLIPTokenizer or open_clip.get_tokenizer('ViT-B-16')). {offline_hint}"
            )

        if local and not any(os.path.isfile(os.path.join(source, f)) for f in _TOKENIZER_FILES):
            raise no_tokenizer(f"none of {', '.join(_TOKENIZER_FILES)} is in the folder")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, cache_dir=cache_dir)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise no_tokenizer(load_failure(exc)) from exc
        vocab = int(getattr(clip.config.text_config, "vocab_size", 0) or 0)
        if len(tokenizer) < vocab // 2:  # transformers 5 builds an empty tokenizer when the files are missing
            raise no_tokenizer(f"it has {len(tokenizer)} tokens but the text model has {vocab}")
    return wrapped.to(device).eval(), _hf_tokenizer(tokenizer, wrapped.context_length), f"{HF_PREFIX}{source}"


# --------------------------------------------------------------------------- one entry point
def wrap_model(model: nn.Module, tokenizer: Callable | None) -> tuple[nn.Module, Callable, str]:
    """An already-built model -> (model with .visual and .encode_text, tokenizer, name)."""
    if isinstance(model, HFCLIP):
        model, name = model, "HFCLIP"
    elif is_hf_clip(model):
        model, name = HFCLIP(model), type(model).__name__
    else:
        if getattr(model, "visual", None) is None:
            raise InputError(f"model {type(model).__name__} has no .visual image tower; pass an open_clip CLIP model "
                             "or a transformers CLIPModel")
        return model, tokenizer or _default_tokenizer(model), type(model).__name__
    if tokenizer is None:
        raise InputError("a transformers CLIPModel needs its tokenizer: Segmenter.from_model(model, tokenizer) with "
                         "e.g. transformers.AutoTokenizer.from_pretrained('openai/clip-vit-base-patch16')")
    return model, _hf_tokenizer(tokenizer, model.context_length), name


def load_model(model: str, pretrained: str | os.PathLike | None, *, device: torch.device, dtype: torch.dtype,
               cache_dir: str | None = None, tokenizer: Callable | None = None) -> tuple[nn.Module, Callable, str]:
    """A model name (open_clip, 'local-dir:', 'hf-hub:' or 'hf:') -> (model in eval mode, tokenizer, name)."""
    if not isinstance(model, str):
        raise InputTypeError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    if model.startswith(HF_PREFIX):
        return load_hf(model, device=device, dtype=dtype, cache_dir=cache_dir, tokenizer=tokenizer)
    clip, tok = build_open_clip(model, pretrained, device=device, dtype=dtype, cache_dir=cache_dir)
    return clip, tokenizer or tok, model


@dataclass(frozen=True)
class LoadedModel:
    """What a Segmenter runs on: the model (eval mode, no grad), its tokenizer and name, its device and dtype."""

    model: nn.Module
    tokenizer: Callable
    name: str
    device: torch.device
    dtype: torch.dtype


def load_frozen(model: str | nn.Module, pretrained: str | os.PathLike | None = None, *,
                device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                tokenizer: Callable | None = None, cache_dir: str | None = None) -> LoadedModel:
    """A model name (:func:`load_model`) or an already-built model (:func:`wrap_model`) on ``device``
    (default CUDA if available) in ``dtype`` (default: a built model's own; for names float16 on CUDA,
    float32 on the CPU), in eval mode with every parameter frozen."""
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise InputTypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    if isinstance(model, nn.Module):
        clip, tok, name = wrap_model(model, tokenizer)
        clip = clip.to(dev).eval()
        if dtype is not None:
            clip = clip.to(dtype)
        dtype = dtype or next(model.parameters()).dtype
    else:
        dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        clip, tok, name = load_model(model, pretrained, device=dev, dtype=dtype, cache_dir=cache_dir,
                                     tokenizer=tokenizer)
    for p in clip.parameters():
        p.requires_grad_(False)
    return LoadedModel(clip, tok, name, dev, dtype)


__all__ = ["HFCLIP", "HFTokenizer", "LoadedModel", "build_open_clip", "is_hf_clip", "load_frozen", "load_hf",
           "load_model", "wrap_model"]
