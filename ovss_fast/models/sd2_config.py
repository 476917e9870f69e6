"""Stable Diffusion 2's published configuration, for building it offline with random weights.

The values are those of the ``config.json`` files of **stabilityai/stable-diffusion-2-1-base**
(``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/tokenizer_config.json``; the 2-base model has
the same architecture), as diffusers and transformers write them. Only the architecture is here,
no weights: :meth:`ovss_fast.models.affinity.SD2Affinity.from_config` builds the real-size modules from
these dicts with random weights, so the affinity's shapes, hooks, time and memory can be checked
without downloading anything (the affinities themselves are then meaningless).
"""

from __future__ import annotations

#: the model these configurations come from
MODEL = "stabilityai/stable-diffusion-2-1-base"

#: ``unet/config.json`` (diffusers ``UNet2DConditionModel``): 865,910,724 parameters.
#: ``attention_head_dim`` is, in this diffusers naming, the number of heads per block (head size 64).
UNET = {
    "act_fn": "silu",
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None,
    "attention_head_dim": [5, 10, 20, 20],
    "attention_type": "default",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 1024,
    "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

#: ``vae/config.json`` (diffusers ``AutoencoderKL``).
VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: ``text_encoder/config.json`` (transformers ``CLIPTextModel``): OpenCLIP ViT-H/14's text tower without
#: its last layer (SD2 conditions on the penultimate layer, so the converted model keeps 23 of 24).
TEXT_ENCODER = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}

#: ``tokenizer/tokenizer_config.json``: the special tokens the empty prompt is made of.
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
PAD_ID = 0  # "!" (SD2's tokenizer pads with "!", not with <|endoftext|> as SD1's does)
MAX_LENGTH = 77  # model_max_length


def empty_prompt_ids() -> list[int]:
    """The token ids SD2's tokenizer gives the empty prompt "" padded to max_length: BOS, EOS, then PAD."""
    return [BOS_ID, EOS_ID] + [PAD_ID] * (MAX_LENGTH - 2)
