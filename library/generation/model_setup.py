"""Models, networks, precision, device and logging for ``sdxl_gen_img.py``, from its checked options.

Turns :class:`library.generation.options.GenOptions` into loaded, placed models: dtype and device,
the SDXL checkpoint (with its VAE, tokenizers and textual inversions), the attention backend and
memory format, the ControlNet-LLLite networks and the LoRAs (hooked, pre-calculated or merged), and
the LoRA multipliers for each batch. Heavy libraries are imported inside the functions so that
``sdxl_gen_img.py --help`` and option errors stay fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from library.errors import UserError
from library.generation.jobs import lora_multipliers
from library.cli import option_label
from library.generation.options import GenOptions, LoraSpec, ModelArgs, ModelOptions

if TYPE_CHECKING:
    import torch

    from library.generation.pipeline import GenerationRequest
    from library.sdxl.loading import SDXLModels

logger = logging.getLogger(__name__)

def pick_dtype(precision: str) -> torch.dtype:
    """The U-Net, text encoder and LLLite dtype of ``fp32``, ``fp16`` or ``bf16``."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def pick_device(name: str | None) -> torch.device:
    """``--device`` as a torch device; CUDA when available if none is given."""
    import torch

    if name:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise UserError(f"--device {name}: {e}; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: this torch has no CUDA GPU to use; use --device cpu")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_attention(unet: Any, vae: Any, attention: str, device: torch.device) -> None:
    """xformers attention on request where it works; PyTorch SDPA otherwise (diffusers' processor for torch 2)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if attention == "xformers":
        if device.type != "cuda":
            logger.warning("%s needs a CUDA GPU: using PyTorch SDPA attention instead", option_label(ModelArgs, "xformers"))
        else:
            try:
                import xformers  # noqa: F401

                unet.enable_xformers_memory_efficient_attention()
                vae.enable_xformers_memory_efficient_attention()
                logger.info("attention: xformers")
                return
            except Exception as e:  # not installed, or a build that does not match this torch
                logger.warning("xformers is not usable (%s): using PyTorch SDPA attention instead", e)
    for model in (unet, vae):
        model.set_attn_processor(AttnProcessor2_0())
    logger.info("attention: PyTorch SDPA")


def load_models(opts: ModelOptions, device: torch.device) -> SDXLModels:
    """The SDXL checkpoint (``--ckpt``, ``--vae``, tokenizers, textual inversions) on ``device``, ready to draw."""
    import torch

    from library.sdxl.loading import load_sdxl
    from library.sdxl.text_encoding import (
        load_textual_inversion,
        tokenizers_via_cache_dir,
    )

    dtype = pick_dtype(opts.precision)
    # The SDXL VAE overflows in fp16: it is kept in fp16 but decodes in fp32 (its config's force_upcast),
    # unless a --vae is given, which is taken as an fp16-fixed VAE (a NaN result is redone in fp32 anyway).
    vae_dtype = torch.float32 if opts.vae_fp32 else dtype
    models = load_sdxl(opts.ckpt, vae=opts.vae, dtype=dtype, vae_dtype=vae_dtype)
    if opts.vae and vae_dtype == torch.float16:
        models.vae.register_to_config(force_upcast=False)
    if opts.tokenizer_cache_dir:
        models.tokenizer1, models.tokenizer2 = tokenizers_via_cache_dir(opts.tokenizer_cache_dir)
    for path in opts.textual_inversion:
        load_textual_inversion(path, models.tokenizer1, models.tokenizer2, models.text_encoder1, models.text_encoder2)
    for m in (models.unet, models.vae, models.text_encoder1, models.text_encoder2):
        m.to(device)
    if opts.channels_last:
        models.unet.to(memory_format=torch.channels_last)
        models.vae.to(memory_format=torch.channels_last)
    setup_attention(models.unet, models.vae, opts.attention, device)
    return models


def show_meta(opts: GenOptions) -> None:
    """``--network_show_meta``: each LoRA and LLLite file's metadata on stdout, one ``key: value`` a line."""
    from library.sdxl.weights_io import read_metadata

    if not opts.show_meta:
        return
    for path in [s.path for s in opts.loras] + list(opts.inputs.lllite_models):
        meta = read_metadata(path)
        print(f"metadata of {path}:" if meta else f"metadata of {path}: none (not a .safetensors file, or empty)")
        for key in sorted(meta):
            print(f"  {key}: {meta[key]}")
    sys.stdout.flush()


def check_weight_files(opts: GenOptions) -> None:
    """Each weight file is of its kind, read from its header before any model loads.

    A LoRA or LLLite file given as ``--ckpt`` is named here; other wrong checkpoints are named by
    the loader, which reads the whole file anyway.
    """
    from library.sdxl.weights_io import KIND_LLLITE, KIND_LORA, read_keys, weights_kind

    where = {KIND_LLLITE: "--control_net_lllite_models", KIND_LORA: "--network_weights"}
    ckpt = Path(opts.model.ckpt)
    if ckpt.is_file():
        found = weights_kind(read_keys(ckpt, "checkpoint (--ckpt)"))
        if found in where:
            raise UserError(f"--ckpt {ckpt} is a {found} file, not a base model: give it with {where[found]} and "
                            "an SDXL checkpoint with --ckpt")
    for label, paths, kind in (("--control_net_lllite_models", opts.inputs.lllite_models, KIND_LLLITE),
                               ("--network_weights", [s.path for s in opts.loras], KIND_LORA)):
        for path in paths:
            found = weights_kind(read_keys(path, f"{label} file"))
            if found != kind:
                raise UserError(f"{label} {path} is not a {kind} file (it looks like: {found}); give a {kind} file there")


def _load_lora(spec: LoraSpec, models: SDXLModels) -> Any:
    from library.sdxl.lora import HookedLoRA, MergedLoRA, read_lora

    lora = read_lora(spec.path, models.unet, models.text_encoder1, models.text_encoder2)
    if spec.mode == "hooked":
        net = HookedLoRA(lora, spec.multiplier)
    else:  # pre_calc keeps the original weights for per-batch multipliers; merged is for good
        net = MergedLoRA(lora, spec.multiplier, keep_backup=spec.mode == "pre_calc")
    logger.info("LoRA %s (x%g, %s): %d U-Net and %d text encoder layers", spec.path, spec.multiplier, spec.mode,
                len(lora.layers) - lora.n_text_encoder_layers, lora.n_text_encoder_layers)
    return net


def load_networks(opts: GenOptions, models: SDXLModels, device: torch.device) -> tuple[list[Any], list[Any]]:
    """LLLite networks (attached) and the LoRAs, applied as their ``LoraSpec.mode`` says."""
    import torch

    from networks.control_net_lllite import ControlNetLLLite

    dtype = pick_dtype(opts.model.precision)
    lllites = []
    for path in opts.inputs.lllite_models:
        net = ControlNetLLLite.from_file(models.unet, path, dtype=dtype).to(device)
        if opts.model.channels_last:
            net.to(memory_format=torch.channels_last)
        lllites.append(net.attach())
        logger.info("LLLite %s: cond_emb_dim=%d network_dim=%d", path, net.cond_emb_dim, net.network_dim)
    return lllites, [_load_lora(spec, models) for spec in opts.loras]


class LoraMultipliers:
    """Sets the LoRAs' multipliers for each batch: a prompt line's ``--am``, else the network_mul option."""

    def __init__(self, loras: list[Any], specs: tuple[LoraSpec, ...]):
        self.loras = loras
        self.specs = specs

    def apply(self, request: GenerationRequest) -> None:
        """Multipliers for a batch whose requests all share ``request``'s ``network_multipliers``."""
        for lora, value in zip(self.loras, lora_multipliers(self.specs, request.network_multipliers)):
            lora.set_multiplier(value)
