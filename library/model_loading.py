"""Load SDXL from what users have: a single-file checkpoint, a diffusers folder, or a hub id.

Single files are converted with diffusers' own sgm -> diffusers converters, into models whose
configs are inferred from the tensor shapes. That is the same path for full-size SDXL and for the
small models the tests and the demo use. Nothing here needs the network.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library import sdxl_keys
from library.errors import UserError
from library.weights_io import (
    KIND_DIFFUSERS_UNET,
    KIND_LLLITE,
    KIND_LORA,
    KIND_SD1,
    KIND_SD2,
    KIND_SDXL,
    read_weights,
    weights_kind,
    write_weights,
)

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "sdxl_assets"


def bundled_config(component: str) -> dict:
    """The published SDXL base config of ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` or ``scheduler``."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((ASSETS / component / name).read_text())


@dataclass
class SDXLModels:
    """Everything a training or generation run needs from a base model."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder1: CLIPTextModel
    text_encoder2: CLIPTextModelWithProjection
    tokenizer1: Any
    tokenizer2: Any
    scheduler_config: dict
    v_prediction: bool = False
    zero_terminal_snr: bool = False
    name: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Building modules from state dicts
# ----------------------------------------------------------------------------------------------


def _materialize(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str):
    """Load weights into a module built on the meta device (no time spent on random init)."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    # transformers versions differ on whether CLIPTextModel keys start with "text_model."
    own = module.state_dict().keys()
    if any(k.startswith("text_model.") for k in sd) and not any(k.startswith("text_model.") for k in own):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    elif not any(k.startswith("text_model.") for k in sd) and any(k.startswith("text_model.") for k in own):
        sd = {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}
    result = module.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise UserError(
            f"the {what} weights do not fit the architecture inferred from them: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}. The checkpoint may be damaged or "
            "use a layout this tool does not know."
        )
    return module.eval().requires_grad_(False)


def build_unet(config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None, dtype=torch.float32):
    """A diffusers U-Net from a config; random weights when ``state_dict`` is None."""
    if state_dict is None:
        return UNet2DConditionModel.from_config(dict(config)).to(dtype=dtype)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(config))
    return _materialize(unet, state_dict, dtype, "U-Net")


def build_vae(config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None, dtype=torch.float32):
    if state_dict is None:
        return AutoencoderKL.from_config(dict(config)).to(dtype)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(dict(config))
    return _materialize(vae, state_dict, dtype, "VAE")


def build_text_encoder(config: Mapping, cls, state_dict=None, dtype=torch.float32):
    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
    if state_dict is None:
        return cls(cfg).to(dtype)
    with init_empty_weights():
        model = cls(cfg)
    return _materialize(model, state_dict, dtype, cls.__name__)


def _check_sdxl_kind(path: Path, keys) -> None:
    kind = weights_kind(keys)
    if kind == KIND_SDXL:
        return
    hints = {
        KIND_LLLITE: "This is a ControlNet-LLLite file, not a base model. Give it with --control_net_lllite_models "
        "(generation) or --network_weights (training), and give the SDXL checkpoint as the base model.",
        KIND_LORA: "This is a LoRA file, not a base model. Give it with --network_weights and the SDXL checkpoint "
        "as the base model.",
        KIND_SD1: "This is a Stable Diffusion 1.x checkpoint; this tool trains and runs LLLite for SDXL only. "
        "Use an SDXL checkpoint.",
        KIND_SD2: "This is a Stable Diffusion 2.x checkpoint; this tool is for SDXL only. Use an SDXL checkpoint.",
        KIND_DIFFUSERS_UNET: "This is a U-Net alone in diffusers layout. Give the whole diffusers folder "
        "(with unet/, vae/, text_encoder/, text_encoder_2/) instead.",
    }
    raise UserError(
        f"{path} is not an SDXL checkpoint ({kind}). "
        + hints.get(kind, "No model.diffusion_model.* keys were found. Give an SDXL .safetensors checkpoint, "
                    "a diffusers folder or a hub id.")
    )


def models_from_sgm_state_dict(sd: Mapping[str, torch.Tensor], dtype=torch.float32, vae_dtype=None):
    """Convert an sgm state dict to (unet, vae, text_encoder1, text_encoder2) with diffusers' converters."""
    vae_dtype = vae_dtype or dtype
    unet_cfg = sdxl_keys.infer_unet_config(sd)
    unet = build_unet(unet_cfg, sfu.convert_ldm_unet_checkpoint(sd, unet_cfg), dtype)

    vae_sd = {k: v for k, v in sd.items() if k.startswith(sdxl_keys.VAE_PREFIX)}
    vae_cfg = sdxl_keys.infer_vae_config(vae_sd)
    vae = build_vae(vae_cfg, sfu.convert_ldm_vae_checkpoint(vae_sd, vae_cfg), vae_dtype)

    te1_sd = {k: v for k, v in sd.items() if k.startswith(sdxl_keys.TE1_PREFIX)}
    te1 = build_text_encoder(
        sdxl_keys.infer_te1_config(te1_sd),
        CLIPTextModel,
        sfu.convert_ldm_clip_checkpoint(te1_sd, remove_prefix=sdxl_keys.TE1_PREFIX),
        dtype,
    )
    te2_sd = {k: v for k, v in sd.items() if k.startswith(sdxl_keys.TE2_PREFIX)}
    te2_cfg = sdxl_keys.infer_te2_config(te2_sd)
    te2 = build_text_encoder(
        te2_cfg,
        CLIPTextModelWithProjection,
        sfu.convert_open_clip_checkpoint(None, te2_sd, prefix=sdxl_keys.TE2_PREFIX),
        dtype,
    )
    return unet, vae, te1, te2


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_sdxl(
    path_or_id: str,
    *,
    vae: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
) -> SDXLModels:
    """Load an SDXL base model from a single file, a diffusers folder or a hub id."""
    from library.text_encoding import load_sdxl_tokenizers

    path = Path(path_or_id).expanduser()
    if path.is_dir():
        models = _load_diffusers_folder(path, dtype, vae_dtype)
    elif path.is_file():
        models = _load_single_file(path, dtype, vae_dtype)
        models.tokenizer1, models.tokenizer2 = load_sdxl_tokenizers(None)
    elif _HUB_ID.match(str(path_or_id)) and not path.suffix.lower() in {".safetensors", ".ckpt", ".pt"}:
        models = _load_diffusers_folder(_download_from_hub(str(path_or_id)), dtype, vae_dtype)
        models.name = str(path_or_id)
    else:
        raise UserError(
            f"model not found: {path_or_id}. Give an SDXL .safetensors/.ckpt file, a diffusers folder, "
            "or a Hugging Face hub id such as stabilityai/stable-diffusion-xl-base-1.0."
        )
    if vae:
        models.vae = load_vae(vae, vae_dtype or dtype)
    return models


def _load_single_file(path: Path, dtype, vae_dtype) -> SDXLModels:
    sd, _ = read_weights(path, "checkpoint")
    _check_sdxl_kind(path, sd.keys())
    missing = [p for p in (sdxl_keys.VAE_PREFIX, sdxl_keys.TE1_PREFIX, sdxl_keys.TE2_PREFIX) if not any(k.startswith(p) for k in sd)]
    if missing:
        raise UserError(
            f"{path} has an SDXL U-Net but no {', '.join(p + '*' for p in missing)} weights. "
            "Use a full SDXL checkpoint that holds the VAE and both text encoders."
        )
    v_pred = "v_pred" in sd
    ztsnr = "ztsnr" in sd
    if v_pred:
        logger.info("%s is a v-prediction checkpoint (it has a 'v_pred' key)%s", path.name, " with zero terminal SNR" if ztsnr else "")
    unet, vae, te1, te2 = models_from_sgm_state_dict(sd, dtype, vae_dtype)
    del sd
    sched = bundled_config("scheduler")
    if v_pred:
        sched["prediction_type"] = "v_prediction"
        if ztsnr:
            sched["rescale_betas_zero_snr"] = True
    return SDXLModels(unet, vae, te1, te2, None, None, sched, v_pred, ztsnr, name=path.stem)


def _load_diffusers_folder(path: Path, dtype, vae_dtype) -> SDXLModels:
    from library.text_encoding import load_sdxl_tokenizers

    needed = ["unet", "vae", "text_encoder", "text_encoder_2"]
    absent = [n for n in needed if not (path / n).is_dir()]
    if absent:
        raise UserError(
            f"{path} is not a diffusers SDXL folder: it has no {', '.join(absent)} subfolder(s). "
            "Give the folder that holds model_index.json, or a single .safetensors checkpoint."
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype or dtype)
        te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"could not load the diffusers folder {path}: {e}") from None
    for m in (unet, vae, te1, te2):
        m.eval().requires_grad_(False)
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = bundled_config("scheduler")
    if sched_file.is_file():
        user = json.loads(sched_file.read_text())
        sched.update({k: v for k, v in user.items() if k in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")})
    v_pred = sched.get("prediction_type") == "v_prediction"
    if v_pred:
        logger.info("%s is a v-prediction model (scheduler prediction_type)", path)
    tok1, tok2 = load_sdxl_tokenizers(str(path))
    return SDXLModels(unet, vae, te1, te2, tok1, tok2, sched, v_pred, bool(sched.get("rescale_betas_zero_snr")), name=path.name)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "unet/*.safetensors",
                                "vae/*.safetensors", "text_encoder*/*.safetensors"],
                ignore_patterns=["*fp16*", "*.bin", "*.onnx*", "*.msgpack"],
            )
        )
    except Exception as e:
        raise UserError(
            f"could not get '{repo_id}' from the Hugging Face hub: {type(e).__name__}: {' '.join(str(e).split())} "
            "Without network access, download the model elsewhere and give the local .safetensors file "
            "or diffusers folder instead (or set HF_HUB_OFFLINE=1 with the model already in the hub cache)."
        ) from None


def load_vae(path_or_folder: str, dtype=torch.float32) -> AutoencoderKL:
    """A ``--vae`` override: an sgm/ldm VAE file, a diffusers-layout VAE file, or a diffusers VAE folder."""
    path = Path(path_or_folder).expanduser()
    if path.is_dir():
        sub = "vae" if (path / "vae").is_dir() else None
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load the VAE folder {path}: {e}") from None
        return vae.eval().requires_grad_(False)
    sd, _ = read_weights(path, "VAE file")
    if any(k.startswith("encoder.down_blocks.") for k in sd):  # already diffusers layout
        cfg = bundled_config("vae")
        return build_vae(cfg, sd, dtype)
    if not any(k.startswith(sdxl_keys.VAE_PREFIX) for k in sd):
        sd = {sdxl_keys.VAE_PREFIX + k: v for k, v in sd.items()}
    if sdxl_keys.VAE_PREFIX + "encoder.conv_in.weight" not in sd:
        raise UserError(f"{path} is not a VAE: it has no encoder.conv_in weights ({weights_kind(sd.keys())}).")
    cfg = sdxl_keys.infer_vae_config(sd)
    logger.info("using the VAE from %s", path)
    return build_vae(cfg, sfu.convert_ldm_vae_checkpoint(sd, cfg), dtype)


def sgm_state_dict(unet, vae, text_encoder1, text_encoder2) -> dict[str, torch.Tensor]:
    """The single-file (sgm) state dict of four diffusers/transformers models."""
    sd = {}
    sd.update(sdxl_keys.unet_diffusers_to_sgm(unet.state_dict(), unet.config))
    sd.update(sdxl_keys.vae_diffusers_to_sgm(vae.state_dict(), vae.config))
    sd.update(sdxl_keys.te1_diffusers_to_sgm(text_encoder1.state_dict()))
    sd.update(sdxl_keys.te2_diffusers_to_sgm(text_encoder2.state_dict()))
    return sd


def save_sdxl_single_file(
    path: str | os.PathLike, unet, vae, text_encoder1, text_encoder2, *, dtype=None, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a single-file SDXL checkpoint in the original key layout that other tools read."""
    sd = sgm_state_dict(unet, vae, text_encoder1, text_encoder2)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    write_weights(path, sd, metadata)
