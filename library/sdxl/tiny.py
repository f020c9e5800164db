"""Configs for small models with SDXL's exact component types and key layout.

They run on a CPU in seconds and go through the same loader, LLLite network, trainer and sampler
as full-size SDXL. Tests build them with random weights; ``tools/build_tiny_sdxl.py`` trains one
that draws. The two text encoders have different widths on purpose: converters that tell the
encoders apart by width must not mix them up.
"""

from __future__ import annotations

import copy

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.sdxl.loading import (
    build_text_encoder,
    build_unet,
    build_vae,
    bundled_config,
)

TE1_WIDTH = 32
TE2_WIDTH = 64
TE2_PROJECTION = 64


def tiny_configs(
    block_out_channels: tuple[int, ...] = (64, 128),
    attention_levels: tuple[bool, ...] = (True, True),
    transformer_layers: tuple[int, ...] = (1, 1),
    layers_per_block: int = 1,
) -> dict[str, dict]:
    """Configs of a tiny SDXL-structured pipeline (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``).

    Every width is a multiple of 32 (GroupNorm) and attention heads are 64 wide or one head,
    so the configs inferred back from a saved file equal these.
    """
    unet = bundled_config("unet")
    n = len(block_out_channels)
    unet.update(
        block_out_channels=list(block_out_channels),
        attention_head_dim=[max(1, c // 64) for c in block_out_channels],
        layers_per_block=layers_per_block,
        transformer_layers_per_block=list(transformer_layers),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)],
        cross_attention_dim=TE1_WIDTH + TE2_WIDTH,
        projection_class_embeddings_input_dim=TE2_PROJECTION + 6 * unet["addition_time_embed_dim"],
    )
    assert len(attention_levels) == n == len(transformer_layers)
    vae = bundled_config("vae")
    vae.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1)
    te1 = bundled_config("text_encoder")
    te1.update(hidden_size=TE1_WIDTH, intermediate_size=TE1_WIDTH * 4, num_hidden_layers=2, num_attention_heads=1,
               projection_dim=TE1_WIDTH)
    te2 = bundled_config("text_encoder_2")
    te2.update(hidden_size=TE2_WIDTH, intermediate_size=TE2_WIDTH * 4, num_hidden_layers=2, num_attention_heads=1,
               projection_dim=TE2_PROJECTION)
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


def drawing_configs() -> dict[str, dict]:
    """Configs of the bundled tiny SDXL that draws (``models/tiny_sdxl``, built by ``tools/build_tiny_sdxl.py``).

    It works on 64x64 images (latents 8x8x4). Three U-Net levels of width 96 (like SDXL's three levels, but
    with attention at every level, the first included, so that LLLite modules of all three conditioning
    depths exist); the VAE has SDXL's four levels (8x downsampling, 4 latent channels), 96 wide at full
    resolution and at the latent end. Widths of 96 give SDXL's 32 GroupNorm groups 3 channels each, which
    the builder needs to keep absolute colour levels through them (see ``GroupNormReferences`` there).
    The text encoders are the tiny ones (widths 32 and 64, two layers, the full 49408-token vocabulary).
    """
    configs = tiny_configs(block_out_channels=(96, 96, 96), attention_levels=(True, True, True), transformer_layers=(1, 1, 1))
    configs["vae"]["block_out_channels"] = [96, 64, 64, 96]
    return configs


def build_random_models(configs: dict[str, dict] | None = None, seed: int = 0, dtype=torch.float32):
    """(unet, vae, text_encoder1, text_encoder2) with random weights from ``configs`` (default: tiny)."""
    configs = copy.deepcopy(configs or tiny_configs())
    torch.manual_seed(seed)
    unet = build_unet(configs["unet"], dtype=dtype)
    vae = build_vae(configs["vae"], dtype=dtype)
    te1 = build_text_encoder(configs["text_encoder"], CLIPTextModel, dtype=dtype)
    te2 = build_text_encoder(configs["text_encoder_2"], CLIPTextModelWithProjection, dtype=dtype)
    return unet, vae, te1, te2
