"""Load SDXL from what users have: a single-file checkpoint, a diffusers folder, or a hub id.

Single files are converted with diffusers' own sgm -> diffusers converters, into models whose
configs are inferred from the tensor shapes. That is the same path for full-size SDXL and for the
small models the tests and the demo use. Nothing here needs the network.

Layouts read: sgm single files (``.safetensors``, weights-only ``.ckpt``/``.pt`` with or without a
``state_dict`` wrapper) in fp32, fp16, bf16 or float8, with or without ``text_model.`` in the first
text encoder's keys, with extra keys (EMA copies, ``denoiser.sigmas``, ``logit_scale``, markers);
diffusers folders, ``fp16`` variant files included; a separate VAE in either layout. Files of the
SDXL family that are not the base model (refiner, inpainting, ...) are named in a clear error.

Memory: tensors of a safetensors file are memory-mapped, and each model's tensors are cast one at a
time and the file's copy let go, so loading holds little more than the models themselves in
anonymous memory (``benchmarks/bench_load.py`` measures it).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedModel

from library.sdxl import keys as sdxl_keys
from library.sdxl.model_source import check_model_source, is_hub_id  # noqa: F401  (part of this module's API)  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.sdxl.weights_io import (  # noqa: E402
    KIND_CONTROLNET,
    KIND_DIFFUSERS_UNET,
    KIND_FLUX,
    KIND_LLLITE,
    KIND_LORA,
    KIND_SD1,
    KIND_SD2,
    KIND_SD3,
    KIND_SDXL,
    read_weights,
    weights_kind,
    write_weights,
)

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"


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


def _materialize(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str, source: str | None
):
    """Load weights into a module built on the meta device (no time spent on random init).

    A ``dict`` given as ``state_dict`` is consumed: its tensors are replaced by the cast ones one at a
    time, so that the source copy of each tensor can be freed as soon as it is cast (peak memory: the
    model plus one tensor, when nothing else holds the source tensors).
    """
    sd = state_dict if isinstance(state_dict, dict) else dict(state_dict)
    # transformers versions differ on whether CLIPTextModel keys start with "text_model."
    own = module.state_dict().keys()
    ours_have, theirs_have = any(k.startswith("text_model.") for k in own), any(k.startswith("text_model.") for k in sd)
    for k in list(sd):
        if theirs_have and not ours_have and k.startswith("text_model."):
            sd[k.removeprefix("text_model.")] = sd.pop(k)
        elif ours_have and not theirs_have and not k.startswith(("text_model.", "text_projection")):
            sd["text_model." + k] = sd.pop(k)
    for k in list(sd):
        v = sd[k]
        if v.is_floating_point() and v.dtype != dtype:
            sd[k] = v.to(dtype)
    in_file = f" in {source}" if source else ""
    try:
        result = module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:600]
        raise UserError(
            f"the {what} weights{in_file} do not fit the architecture inferred from them ({detail}). "
            "The file may be damaged, or hold a model with another layout (a distilled or modified SDXL)."
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise UserError(
            f"the {what} weights{in_file} do not fit the architecture inferred from them: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}. The file may be damaged, or hold a "
            "model with another layout (a distilled or modified SDXL) that this tool does not know."
        )
    sd.clear()
    return module.eval().requires_grad_(False)


def build_unet(
    config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None, dtype=torch.float32, *, source: str | None = None
) -> UNet2DConditionModel:
    """A diffusers U-Net from a config; random weights when ``state_dict`` is None (a dict given is consumed)."""
    if state_dict is None:
        return UNet2DConditionModel.from_config(dict(config)).to(dtype=dtype)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(config))
    return _materialize(unet, state_dict, dtype, "U-Net", source)


def build_vae(
    config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None, dtype=torch.float32, *, source: str | None = None
) -> AutoencoderKL:
    """A diffusers VAE from a config; random weights when ``state_dict`` is None (a dict given is consumed)."""
    if state_dict is None:
        return AutoencoderKL.from_config(dict(config)).to(dtype)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(dict(config))
    return _materialize(vae, state_dict, dtype, "VAE", source)


def build_text_encoder(config: Mapping, cls, state_dict=None, dtype=torch.float32, *, source: str | None = None):
    """A CLIP text encoder of class ``cls`` from a config; random weights when ``state_dict`` is None."""
    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
    if state_dict is None:
        return cls(cfg).to(dtype)
    with init_empty_weights():
        model = cls(cfg)
    return _materialize(model, state_dict, dtype, cls.__name__, source)


_KIND_HINTS = {
    KIND_LLLITE: "This is a ControlNet-LLLite file, not a base model. Give it with --control_net_lllite_models "
    "(generation) or --network_weights (training), and give the SDXL checkpoint as the base model.",
    KIND_LORA: "This is a LoRA file, not a base model. Give it with --network_weights and the SDXL checkpoint "
    "as the base model.",
    KIND_CONTROLNET: "This is a ControlNet, not a base model; this tool trains and runs ControlNet-LLLite adapters "
    "on an SDXL base checkpoint. Give the SDXL checkpoint as the base model.",
    KIND_SD1: "This is a Stable Diffusion 1.x checkpoint; this tool trains and runs LLLite for SDXL only. "
    "Use an SDXL checkpoint.",
    KIND_SD2: "This is a Stable Diffusion 2.x checkpoint; this tool is for SDXL only. Use an SDXL checkpoint.",
    KIND_SD3: "This is a Stable Diffusion 3 checkpoint; this tool is for SDXL only. Use an SDXL checkpoint.",
    KIND_FLUX: "This is a FLUX checkpoint; this tool is for SDXL only. Use an SDXL checkpoint.",
    KIND_DIFFUSERS_UNET: "This is a U-Net alone in diffusers layout. Give the whole diffusers folder "
    "(with unet/, vae/, text_encoder/, text_encoder_2/) instead.",
}


def _check_sdxl_kind(path: Path | str, keys) -> None:
    kind = weights_kind(keys)
    if kind == KIND_SDXL:
        return
    raise UserError(
        f"{path} is not an SDXL checkpoint ({kind}). "
        + _KIND_HINTS.get(kind, "No model.diffusion_model.* keys were found. Give an SDXL .safetensors checkpoint, "
                          "a diffusers folder or a hub id.")
    )


def _not_base_error(source: Path | str, what: str) -> UserError:
    return UserError(
        f"{source} is {what}, not an SDXL base model. ControlNet-LLLite is trained on and applied to the SDXL "
        "base U-Net (4 latent input channels, two text encoders); give the SDXL base checkpoint or a fine-tune "
        "of it with the same layout (most SDXL models shared for generation are)."
    )


def _take(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Move the entries under ``prefix`` out of ``sd`` (keys unchanged)."""
    return {k: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}


def _converted(source: str, what: str, prefix: str, convert, *args):
    """Run one of diffusers' key converters; a layout it does not understand becomes a clear error."""
    try:
        return convert(*args)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        raise UserError(
            f"the {what} weights ({prefix}*) in {source} are not in the SDXL layout ({type(e).__name__}: {e}). "
            "The file may be damaged, or hold a model with another layout that this tool does not know."
        ) from None


def _warn_unused(source: str, what: str, given: int, mapped: int) -> None:
    if mapped < given:
        logger.warning("%s: %d %s keys are not part of SDXL's %s and were ignored", source, given - mapped, what, what)


def models_from_sgm_state_dict(
    sd: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    *,
    source: str = "the checkpoint",
    with_vae: bool = True,
) -> tuple[UNet2DConditionModel, AutoencoderKL | None, CLIPTextModel, CLIPTextModelWithProjection]:
    """Convert a plain-layout sgm state dict to (unet, vae, text_encoder1, text_encoder2) with diffusers' converters.

    ``sd`` is consumed: each model's tensors are moved out of it before that model is built, so that
    tensors read into memory (not memory-mapped) are freed as soon as their model holds its own copy.
    With ``with_vae=False`` the VAE weights are dropped unbuilt (a separate VAE replaces them) and
    ``None`` is returned in its place. Give files in other layouts to ``sdxl_from_state_dict``.
    """
    vae_dtype = vae_dtype or dtype
    part = _take(sd, sdxl_keys.UNET_PREFIX)
    unet_cfg = _converted(source, "U-Net", sdxl_keys.UNET_PREFIX, sdxl_keys.infer_unet_config, part)
    converted = _converted(source, "U-Net", sdxl_keys.UNET_PREFIX, sfu.convert_ldm_unet_checkpoint, part, unet_cfg)
    _warn_unused(source, "U-Net", len(part), len(converted))
    del part
    unet = build_unet(unet_cfg, converted, dtype, source=source)

    part = _take(sd, sdxl_keys.VAE_PREFIX)
    vae = None
    if with_vae:
        vae_cfg = _converted(source, "VAE", sdxl_keys.VAE_PREFIX, sdxl_keys.infer_vae_config, part)
        converted = _converted(source, "VAE", sdxl_keys.VAE_PREFIX, sfu.convert_ldm_vae_checkpoint, part, vae_cfg)
        _warn_unused(source, "VAE", len(part), len(converted))
        del part
        vae = build_vae(vae_cfg, converted, vae_dtype, source=source)
    else:
        del part

    part = _take(sd, sdxl_keys.TE1_PREFIX)
    te1_cfg = _converted(source, "text encoder 1", sdxl_keys.TE1_PREFIX, sdxl_keys.infer_te1_config, part)
    converted = _converted(source, "text encoder 1", sdxl_keys.TE1_PREFIX, sfu.convert_ldm_clip_checkpoint, part,
                           sdxl_keys.TE1_PREFIX)
    _warn_unused(source, "text encoder 1", len(part), len(converted))
    del part
    te1 = build_text_encoder(te1_cfg, CLIPTextModel, converted, dtype, source=source)

    part = _take(sd, sdxl_keys.TE2_PREFIX)
    te2_cfg = _converted(source, "text encoder 2", sdxl_keys.TE2_PREFIX, sdxl_keys.infer_te2_config, part)
    converted = _converted(
        source, "text encoder 2", sdxl_keys.TE2_PREFIX, sfu.convert_open_clip_checkpoint, None, part, sdxl_keys.TE2_PREFIX
    )
    # OpenCLIP stacks q, k and v in one in_proj tensor; diffusers splits each into three.
    _warn_unused(source, "text encoder 2", len(part) + 2 * sum(".in_proj_" in k for k in part), len(converted))
    del part
    te2 = build_text_encoder(te2_cfg, CLIPTextModelWithProjection, converted, dtype, source=source)
    return unet, vae, te1, te2


def _log_dropped(source: str, dropped: Mapping[str, list[str]]) -> None:
    if dropped:
        summary = "; ".join(f"{reason}: {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                            for reason, keys in dropped.items())
        logger.info("%s: keys that are not SDXL model weights were skipped: %s", source, summary)


def sdxl_from_state_dict(
    sd: dict[str, torch.Tensor],
    source: str,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    *,
    with_vae: bool = True,
) -> SDXLModels:
    """SDXL models (without tokenizers) from the state dict of a single file in any of the layouts users have.

    ``source`` names the file in messages. ``sd`` is consumed (see ``models_from_sgm_state_dict``).
    Files of the SDXL family that are not the base model, and scaled-fp8 files, raise ``UserError``.
    v-prediction (a ``v_pred`` key) and zero terminal SNR (a ``ztsnr`` key) are read from marker keys.
    """
    _check_sdxl_kind(source, sd.keys())
    if what := sdxl_keys.describe_non_base_sdxl(sd):
        raise _not_base_error(source, what)
    if sdxl_keys.is_scaled_fp8(sd):
        raise UserError(
            f"{source} is a scaled-fp8 checkpoint: its float8 weights must be multiplied by per-layer scale_weight "
            "factors (ComfyUI's scaled fp8 format), which this tool does not do. Use an fp16/bf16 (or plain fp8) "
            "release of the model."
        )
    v_pred, ztsnr = sdxl_keys.V_PRED_KEY in sd, sdxl_keys.ZTSNR_KEY in sd
    dropped = sdxl_keys.normalize_sgm_state_dict(sd)
    _log_dropped(source, dropped)
    needed = [sdxl_keys.TE1_PREFIX, sdxl_keys.TE2_PREFIX] + ([sdxl_keys.VAE_PREFIX] if with_vae else [])
    missing = [p for p in needed if not any(k.startswith(p) for k in sd)]
    if missing:
        raise UserError(
            f"{source} has an SDXL U-Net but no {', '.join(p + '*' for p in missing)} weights. "
            "Use a full SDXL checkpoint that holds "
            + ("the VAE and both text encoders." if with_vae else "both text encoders.")
            + (" A checkpoint without its VAE can be used with a separate --vae." if missing == [sdxl_keys.VAE_PREFIX] else "")
        )
    unet, vae, te1, te2 = models_from_sgm_state_dict(sd, dtype, vae_dtype, source=source, with_vae=with_vae)
    sched = bundled_config("scheduler")
    if v_pred:
        sched["prediction_type"] = "v_prediction"
        logger.info("%s is a v-prediction model (it has a 'v_pred' key)", source)
    if ztsnr:
        sched["rescale_betas_zero_snr"] = True
        logger.info("%s was trained with zero terminal SNR (it has a 'ztsnr' key): the noise schedule is rescaled", source)
    return SDXLModels(unet, vae, te1, te2, None, None, sched, v_pred, ztsnr, name=Path(source).stem)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def _devices(lowram: bool, device: str | torch.device | None) -> tuple[torch.device, torch.device]:
    """(where tensors are read to, where the models end up) for the ``lowram``/``device`` options."""
    if device is None:
        if lowram and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = "cpu"
    final = torch.device(device)
    if lowram and final.type == "cpu":
        logger.info("lowram: no accelerator to load the models into; they are loaded into host memory")
    return (final if lowram else torch.device("cpu")), final


def load_sdxl(
    path_or_id: str,
    *,
    vae: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    lowram: bool = False,
    device: str | torch.device | None = None,
    disable_mmap: bool = False,
) -> SDXLModels:
    """Load an SDXL base model from a single file, a diffusers folder or a hub id.

    Args:
        path_or_id: an sgm single file (``.safetensors``, or a weights-only ``.ckpt``/``.pt``), a diffusers
            folder (``fp16`` variant files are used when the plain ones are absent), or a hub id.
        vae: a separate VAE replacing the checkpoint's (see ``load_vae``); the checkpoint's own VAE is
            then not built, and may be absent from the file.
        dtype: dtype of the U-Net and the text encoders.
        vae_dtype: dtype of the VAE (default: ``dtype``).
        lowram: sd-scripts' ``--lowram``, for machines with more accelerator memory than host RAM:
            tensors are read from the file straight onto ``device`` and the models are built there,
            instead of in host RAM first. Without an accelerator it changes nothing.
        device: where the returned models live. Default: the CPU, or with ``lowram`` the current CUDA
            device when there is one. Without ``lowram`` the models are built in host memory and then
            moved there.
        disable_mmap: sd-scripts' ``--disable_mmap_load_safetensors``: read weight files with plain reads
            instead of memory-mapping them, which is much faster on WSL and network drives. Peak host
            memory stays about the same: each tensor is freed once its model has cast it.

    Raises ``UserError`` naming the file and what is wrong for anything that is not an SDXL base model
    in a layout read here.
    """
    from library.sdxl.text_encoding import load_sdxl_tokenizers

    read_device, final_device = _devices(lowram, device)
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        models = _load_diffusers_folder(path, dtype, vae_dtype, read_device, disable_mmap, with_vae=vae is None)
    elif path.is_file():
        models = _load_single_file(path, dtype, vae_dtype, read_device, disable_mmap, with_vae=vae is None)
        models.tokenizer1, models.tokenizer2 = load_sdxl_tokenizers(None)
    else:
        check_model_source(str(path_or_id))
        folder = _download_from_hub(str(path_or_id))
        models = _load_diffusers_folder(folder, dtype, vae_dtype, read_device, disable_mmap, with_vae=vae is None)
        models.name = str(path_or_id)
    if vae:
        models.vae = load_vae(vae, vae_dtype or dtype, lowram=lowram, device=final_device, disable_mmap=disable_mmap)
    for m in (models.unet, models.vae, models.text_encoder1, models.text_encoder2):
        # Also moves buffers that were created on the CPU next to parameters read onto the device.
        m.to(final_device)
    return models


def _load_single_file(
    path: Path, dtype, vae_dtype, read_device: torch.device, disable_mmap: bool, *, with_vae: bool = True
) -> SDXLModels:
    sd, _ = read_weights(path, "checkpoint", device=read_device, mmap=not disable_mmap)
    models = sdxl_from_state_dict(sd, str(path), dtype, vae_dtype, with_vae=with_vae)
    logger.info("loaded %s (%s%s)", path, str(dtype).removeprefix("torch."), f", on {read_device}" if read_device.type != "cpu" else "")
    return models


_PLAIN_WEIGHT_FILE = re.compile(
    r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)(?:\.index\.json)?$"
)


def _folder_variant(folder: Path) -> str | None:
    """None when ``folder`` holds plain weight files, else the variant its files carry (``fp16``...).

    diffusers and transformers load a variant only when asked for it by name, and the SDXL folders
    people download often hold only ``*.fp16.safetensors``. A variant file is a plain weight file name
    with one more dotted part (``model.fp16.safetensors``, ``...safetensors.index.fp16.json``).
    """
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(_PLAIN_WEIGHT_FILE.match(n) for n in names):
        return None
    found = set()
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts) - 1):
            if _PLAIN_WEIGHT_FILE.match(".".join(parts[:i] + parts[i + 1 :])):
                found.add(parts[i])
    if not found:
        raise UserError(
            f"{folder} has no weight file (diffusion_pytorch_model.safetensors, model.safetensors or an fp16 "
            "variant of them). The download may be incomplete; download the folder again."
        )
    return "fp16" if "fp16" in found else sorted(found)[0]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}. The file is damaged; download the model folder again.") from None


def _check_diffusers_folder(path: Path, with_vae: bool) -> None:
    """Clear errors for folders that are not a complete SDXL base pipeline."""
    components = ["unet", "text_encoder", "text_encoder_2"] + (["vae"] if with_vae else [])
    absent = [n for n in components if not (path / n).is_dir()]
    index = _read_json(path / "model_index.json")
    if "text_encoder" in absent and (path / "text_encoder_2").is_dir() and (path / "unet").is_dir():
        raise _not_base_error(path, "an SDXL refiner (it has text_encoder_2 but no text_encoder)")
    if absent:
        raise UserError(
            f"{path} is not a diffusers SDXL folder: it has no {', '.join(absent)} subfolder(s). "
            "Give the folder that holds model_index.json, or a single .safetensors checkpoint."
        )
    for name in components:
        if not (path / name / "config.json").is_file():
            raise UserError(
                f"{path / name} has no config.json. The download may be incomplete; download the folder again."
            )
    unet_cfg = _read_json(path / "unet" / "config.json")
    channels = unet_cfg.get("in_channels", 4)
    if channels != 4:
        what = {9: "an SDXL inpainting model (its U-Net takes 9 input channels)",
                8: "an SDXL InstructPix2Pix-style edit model (its U-Net takes 8 input channels)"}
        raise _not_base_error(path, what.get(channels, f"a model whose U-Net takes {channels} input channels"))
    sched = _read_json(path / "scheduler" / "scheduler_config.json")
    if str(sched.get("_class_name", "")).startswith("EDM") or str(index.get("_class_name", "")).startswith("Playground"):
        raise _not_base_error(path, f"an EDM-formulation model such as Playground v2.5 ({sched.get('_class_name')})")


def _from_pretrained_kwargs(cls, read_device: torch.device, disable_mmap: bool) -> dict:
    kwargs: dict[str, Any] = {}
    if read_device.type != "cpu":
        kwargs["device_map"] = str(read_device)
    if disable_mmap:
        if issubclass(cls, PreTrainedModel) and "disable_mmap" not in inspect.signature(cls.from_pretrained).parameters:
            logger.info("disable_mmap: this transformers version always memory-maps; loading %s with mmap", cls.__name__)
        else:
            kwargs["disable_mmap"] = True
    return kwargs


@contextmanager
def _no_transformers_progress_bar() -> Iterator[None]:
    """transformers 5 draws a "Loading weights" bar per model: noise next to this module's one log line per
    folder. Only its bars are turned off, and only while this module loads."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _load_diffusers_folder(
    path: Path, dtype, vae_dtype, read_device: torch.device, disable_mmap: bool, *, with_vae: bool = True
) -> SDXLModels:
    from library.sdxl.text_encoding import load_sdxl_tokenizers

    _check_diffusers_folder(path, with_vae)
    parts = [("unet", UNet2DConditionModel, "torch_dtype", dtype),
             ("text_encoder", CLIPTextModel, "dtype", dtype),
             ("text_encoder_2", CLIPTextModelWithProjection, "dtype", dtype)]
    if with_vae:
        parts.insert(1, ("vae", AutoencoderKL, "torch_dtype", vae_dtype or dtype))
    loaded: dict[str, Any] = {"vae": None}
    for name, cls, dtype_arg, part_dtype in parts:
        variant = _folder_variant(path / name)
        if variant:
            logger.info("%s: loading the %s variant files", path / name, variant)
        try:
            with _no_transformers_progress_bar():
                model = cls.from_pretrained(path, subfolder=name, variant=variant, **{dtype_arg: part_dtype},
                                            **_from_pretrained_kwargs(cls, read_device, disable_mmap))
        except UserError:
            raise
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as e:  # diffusers/transformers/safetensors raise many types for a broken folder
            raise UserError(
                f"could not load {path / name} ({cls.__name__}): {type(e).__name__}: {' '.join(str(e).split())[:500]}"
            ) from None
        loaded[name] = model.eval().requires_grad_(False)
    sched = bundled_config("scheduler")
    user = _read_json(path / "scheduler" / "scheduler_config.json")
    sched.update({k: v for k, v in user.items() if k in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")})
    v_pred = sched.get("prediction_type") == "v_prediction"
    ztsnr = bool(sched.get("rescale_betas_zero_snr"))
    if v_pred:
        logger.info("%s is a v-prediction model (scheduler prediction_type)", path)
    if ztsnr:
        logger.info("%s uses zero terminal SNR (scheduler rescale_betas_zero_snr)", path)
    logger.info("loaded the diffusers folder %s", path)
    tok1, tok2 = load_sdxl_tokenizers(str(path))
    return SDXLModels(loaded["unet"], loaded["vae"], loaded["text_encoder"], loaded["text_encoder_2"], tok1, tok2,
                      sched, v_pred, ztsnr, name=path.name)


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


def _vae_config_from_diffusers_keys(sd: Mapping[str, torch.Tensor]) -> dict:
    """The AutoencoderKL config of a VAE state dict in diffusers layout, from its shapes."""
    keys = list(sd)
    n = len({m.group(1) for k in keys if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    lpb = len({m.group(1) for k in keys if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    cfg = bundled_config("vae")
    cfg.update(
        block_out_channels=[int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(n)],
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=lpb,
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        latent_channels=int(sd["post_quant_conv.weight"].shape[0]),
    )
    return cfg


# Names of the VAE attention projections in diffusers files written before diffusers 0.14.
_OLD_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def load_vae(
    path_or_folder: str,
    dtype: torch.dtype = torch.float32,
    *,
    lowram: bool = False,
    device: str | torch.device | None = None,
    disable_mmap: bool = False,
) -> AutoencoderKL:
    """A ``--vae`` override: an sgm/ldm VAE file (with or without the ``first_stage_model.`` prefix, so a full
    SDXL checkpoint works too), a diffusers-layout VAE file, or a diffusers VAE folder (or a pipeline folder
    with ``vae/``). ``lowram``, ``device`` and ``disable_mmap`` mean what they mean for ``load_sdxl``.
    """
    read_device, final_device = _devices(lowram, device)
    path = Path(path_or_folder).expanduser()
    if path.is_dir():
        sub = "vae" if (path / "vae").is_dir() else None
        folder = path / sub if sub else path
        if not (folder / "config.json").is_file():
            raise UserError(f"the VAE folder {folder} has no config.json: give a diffusers VAE folder or a VAE file.")
        variant = _folder_variant(folder)
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype, variant=variant,
                                                **_from_pretrained_kwargs(AutoencoderKL, read_device, disable_mmap))
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as e:
            raise UserError(f"could not load the VAE folder {folder}: {type(e).__name__}: {' '.join(str(e).split())[:500]}") from None
        logger.info("using the VAE from %s", folder)
        return vae.eval().requires_grad_(False).to(final_device)
    sd, _ = read_weights(path, "VAE file", device=read_device, mmap=not disable_mmap)
    vae = vae_from_state_dict(sd, str(path), dtype)
    logger.info("using the VAE from %s", path)
    return vae.to(final_device)


def vae_from_state_dict(sd: dict[str, torch.Tensor], source: str, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A VAE from the state dict of a VAE file in sgm/ldm layout (with or without ``first_stage_model.``, so a
    whole SDXL checkpoint works too) or in diffusers layout (old attention names included). ``sd`` is consumed;
    ``source`` names the file in messages."""
    if any(k.startswith("encoder.down_blocks.") for k in sd):  # diffusers layout
        for k in list(sd):
            new = k
            for old, repl in _OLD_VAE_ATTENTION.items():
                new = new.replace(old, repl)
            if new != k:
                sd[new] = sd.pop(k)
        for k in [k for k in sd if k.startswith(("encoder.mid_block.attentions.", "decoder.mid_block.attentions."))]:
            if sd[k].ndim == 4:  # attention projections stored as 1x1 convs
                sd[k] = sd[k][:, :, 0, 0]
        cfg = _converted(source, "VAE", "encoder.*/decoder.*", _vae_config_from_diffusers_keys, sd)
        return build_vae(cfg, sd, dtype, source=source)
    if not any(k.startswith(sdxl_keys.VAE_PREFIX) for k in sd):
        for k in list(sd):
            sd[sdxl_keys.VAE_PREFIX + k] = sd.pop(k)
    if sdxl_keys.VAE_PREFIX + "encoder.conv_in.weight" not in sd:
        kind = weights_kind(k.removeprefix(sdxl_keys.VAE_PREFIX) for k in sd)
        raise UserError(
            f"{source} is not a VAE: it has no encoder.conv_in weights ({kind}). Give an SDXL VAE file or folder."
        )
    part = _take(sd, sdxl_keys.VAE_PREFIX)
    sd.clear()
    cfg = _converted(source, "VAE", sdxl_keys.VAE_PREFIX, sdxl_keys.infer_vae_config, part)
    converted = _converted(source, "VAE", sdxl_keys.VAE_PREFIX, sfu.convert_ldm_vae_checkpoint, part, cfg)
    _warn_unused(source, "VAE", len(part), len(converted))
    del part
    return build_vae(cfg, converted, dtype, source=source)


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
