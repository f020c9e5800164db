"""The full-size SDXL key layout of every single-file variant maps completely, checked on the meta device.

The state dicts here hold meta tensors with SDXL's real shapes (no memory, no file): each variant
goes through the same conversion ``load_sdxl`` uses after reading a file, and the models it builds
are converted back to the plain layout, which must give exactly the keys and shapes of SDXL base.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.errors import UserError
from library.sdxl import keys as sdxl_keys
from library.sdxl.loading import (
    build_text_encoder,
    build_unet,
    build_vae,
    bundled_config,
    sdxl_from_state_dict,
    sgm_state_dict,
    vae_from_state_dict,
)

TE1, TE2, UNET, VAE = sdxl_keys.TE1_PREFIX, sdxl_keys.TE2_PREFIX, sdxl_keys.UNET_PREFIX, sdxl_keys.VAE_PREFIX
SDXL_PARAMETERS = 3_468_837_867  # U-Net 2,567,463,684 + VAE + both text encoders


@pytest.fixture(scope="session")
def full_models():
    with init_empty_weights():
        return (
            build_unet(bundled_config("unet")),
            build_vae(bundled_config("vae")),
            build_text_encoder(bundled_config("text_encoder"), CLIPTextModel),
            build_text_encoder(bundled_config("text_encoder_2"), CLIPTextModelWithProjection),
        )


@pytest.fixture(scope="session")
def full_sd(full_models) -> dict[str, torch.Tensor]:
    """SDXL base in the plain sgm layout, meta tensors (fp16, as files are usually shared)."""
    return {k: v.to(torch.float16) for k, v in sgm_state_dict(*full_models).items()}


def test_plain_layout_has_the_reference_savers_key_count(full_sd):
    """sd-scripts' saver writes these 2,513 tensors plus OpenCLIP's logit_scale: the issue's 2,514."""
    assert len(full_sd) == 2513
    assert sum(v.numel() for v in full_sd.values()) == SDXL_PARAMETERS


def _without_text_model(sd):
    return {(TE1 + k[len(TE1 + "text_model."):] if k.startswith(TE1 + "text_model.") else k): v for k, v in sd.items()}


def _extras(sd):
    out = dict(sd)
    out.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in sd.items() if k.startswith(UNET)})
    out.update({
        "model_ema.decay": torch.empty((), device="meta"),
        "model_ema.num_updates": torch.empty((), dtype=torch.int32, device="meta"),
        "denoiser.sigmas": torch.empty(1000, device="meta"),
        TE2 + "logit_scale": torch.empty((), device="meta"),
        TE1 + "text_model.embeddings.position_ids": torch.empty(1, 77, dtype=torch.int64, device="meta"),
    })
    return out


def _cast(dtype):
    return lambda sd: {k: v.to(dtype) for k, v in sd.items()}


VARIANTS = {
    "plain": lambda sd: dict(sd),
    "te1_without_text_model": _without_text_model,
    "te1_without_text_model_with_position_ids": lambda sd: dict(
        _without_text_model(sd), **{TE1 + "embeddings.position_ids": torch.empty(1, 77, dtype=torch.int64, device="meta")}
    ),
    "extra_keys": _extras,
    "fp32": _cast(torch.float32),
    "bf16": _cast(torch.bfloat16),
    "fp8_e4m3fn": _cast(torch.float8_e4m3fn),
    "fp8_e5m2": _cast(torch.float8_e5m2),
    "v_pred_ztsnr": lambda sd: dict(sd, v_pred=torch.empty(0, device="meta"), ztsnr=torch.empty(0, device="meta")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_size_variant_maps_completely(variant, full_sd):
    sd = VARIANTS[variant](full_sd)
    models = sdxl_from_state_dict(sd, f"{variant}.safetensors", torch.bfloat16, torch.float32)
    assert not sd  # every tensor was taken by a model or dropped as not-a-weight
    parts = (models.unet, models.vae, models.text_encoder1, models.text_encoder2)
    assert sum(p.numel() for m in parts for p in m.parameters()) == SDXL_PARAMETERS
    assert {p.dtype for m in parts[:1] + parts[2:] for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in models.vae.parameters()} == {torch.float32}
    back = sgm_state_dict(*parts)
    assert back.keys() == full_sd.keys()
    assert all(back[k].shape == full_sd[k].shape for k in full_sd)
    assert models.text_encoder1.config.num_hidden_layers == 12 and models.text_encoder2.config.num_hidden_layers == 32
    assert models.v_prediction is models.zero_terminal_snr is (variant == "v_pred_ztsnr")


@pytest.mark.parametrize("layout", ["sgm_prefixed", "sgm_bare", "diffusers"])
def test_full_size_vae_layouts_map_completely(layout, full_models, full_sd):
    vae_sgm = {k: v for k, v in full_sd.items() if k.startswith(VAE)}
    sd = {
        "sgm_prefixed": vae_sgm,
        "sgm_bare": {k[len(VAE):]: v for k, v in vae_sgm.items()},
        "diffusers": {k: v.half() for k, v in full_models[1].state_dict().items()},
    }[layout]
    vae = vae_from_state_dict(dict(sd), f"{layout}.safetensors")
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512]
    back = sdxl_keys.vae_diffusers_to_sgm(vae.state_dict(), vae.config)
    assert back.keys() == vae_sgm.keys() and all(back[k].shape == vae_sgm[k].shape for k in vae_sgm)


def _refiner_sd() -> dict[str, torch.Tensor]:
    """SDXL refiner 1.0's layout: a 384-wide U-Net with 2560-wide added conditioning, OpenCLIP bigG alone."""
    cfg = bundled_config("unet")
    cfg.update(
        block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24], cross_attention_dim=1280,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=4, projection_class_embeddings_input_dim=2560,
    )
    with init_empty_weights():
        unet = build_unet(cfg)
        te = build_text_encoder(bundled_config("text_encoder_2"), CLIPTextModelWithProjection)
    sd = sdxl_keys.unet_diffusers_to_sgm(unet.state_dict(), unet.config)
    sd.update({"conditioner.embedders.0.model." + k[len(TE2):]: v for k, v in sdxl_keys.te2_diffusers_to_sgm(te.state_dict()).items()})
    return sd


def test_full_size_refiner_is_named(full_sd):
    sd = _refiner_sd()
    sd.update({k: v for k, v in full_sd.items() if k.startswith(VAE)})
    with pytest.raises(UserError, match=r"refiner\.safetensors is an SDXL refiner .*384-channel U-Net.*not an SDXL base model"):
        sdxl_from_state_dict(sd, "refiner.safetensors")


def test_full_size_inpainting_is_named(full_sd):
    sd = dict(full_sd, **{UNET + "input_blocks.0.0.weight": torch.empty(320, 9, 3, 3, device="meta")})
    with pytest.raises(UserError, match=r"inpaint\.safetensors is an SDXL inpainting model"):
        sdxl_from_state_dict(sd, "inpaint.safetensors")


def test_full_size_pruned_decoder_is_named(full_sd):
    """SSD-1B-style: decoder attention blocks of the deepest level keep fewer of their 10 transformer blocks."""
    sd = {k: v for k, v in full_sd.items()
          if not any(k.startswith(f"{UNET}output_blocks.{b}.1.transformer_blocks.{i}.") for b in (0, 1) for i in range(4, 10))}
    with pytest.raises(UserError, match=r"ssd\.safetensors is a distilled or pruned SDXL U-Net.*output_blocks\.0\.1: 4"):
        sdxl_from_state_dict(sd, "ssd.safetensors")
