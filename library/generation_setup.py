"""Models, networks, precision and device for ``sdxl_gen_img.py``.

Turns the script's options into loaded, placed models: dtype and device choice, the SDXL checkpoint
(with its VAE and textual inversions), the attention backend, the ControlNet-LLLite networks and
merged LoRAs, and the LoRA multipliers for each batch. Heavy libraries are imported inside the
functions so that ``sdxl_gen_img.py --help`` and option errors stay fast.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from library.errors import UserError

if TYPE_CHECKING:
    import torch

    from library.generation import GenerationRequest
    from library.lora import MergedLoRA
    from library.model_loading import SDXLModels

logger = logging.getLogger(__name__)


def quiet_model_libraries() -> None:
    """Only errors from diffusers and transformers: their warnings are noise for a user of this script."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def pick_dtype(args: argparse.Namespace) -> torch.dtype:
    """The U-Net and text encoder dtype from ``--fp16``/``--bf16`` (float32 without either)."""
    import torch

    if args.fp16 and args.bf16:
        raise UserError("give --fp16 or --bf16, not both")
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def pick_device(name: str | None) -> torch.device:
    """``--device`` as a torch device; CUDA when available if none is given."""
    import torch

    if name:
        try:
            return torch.device(name)
        except RuntimeError as e:
            raise UserError(f"--device {name}: {e}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_attention(unet: Any, vae: Any, args: argparse.Namespace, device: torch.device) -> None:
    """xformers attention on request where it works; PyTorch SDPA otherwise."""
    if not args.xformers:
        return  # diffusers uses torch's scaled_dot_product_attention by default
    if device.type != "cuda":
        logger.warning("--xformers needs a CUDA GPU: using PyTorch SDPA attention instead")
        return
    try:
        import xformers  # noqa: F401

        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
        logger.info("using xformers attention")
    except Exception as e:  # not installed, or a build that does not match this torch
        logger.warning("xformers is not usable (%s): using PyTorch SDPA attention instead", e)


def load_models(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> SDXLModels:
    """The SDXL checkpoint (``--ckpt``, ``--vae``, textual inversions) on ``device`` with its attention set up."""
    import torch

    from library.model_loading import load_sdxl
    from library.text_encoding import load_textual_inversion

    # The SDXL VAE overflows in fp16: it is kept in fp16 but decodes in fp32 (its config's force_upcast),
    # unless a --vae is given, which is taken as an fp16-fixed VAE (a NaN result is redone in fp32 anyway).
    vae_dtype = torch.float32 if args.no_half_vae else dtype
    models = load_sdxl(args.ckpt, vae=args.vae, dtype=dtype, vae_dtype=vae_dtype)
    if args.vae and vae_dtype == torch.float16:
        models.vae.register_to_config(force_upcast=False)
    for path in args.textual_inversion_embeddings:
        load_textual_inversion(path, models.tokenizer1, models.tokenizer2, models.text_encoder1, models.text_encoder2)
    for m in (models.unet, models.vae, models.text_encoder1, models.text_encoder2):
        m.to(device)
    setup_attention(models.unet, models.vae, args, device)
    return models


def load_networks(
    args: argparse.Namespace, models: SDXLModels, dtype: torch.dtype, device: torch.device
) -> tuple[list[Any], list[MergedLoRA]]:
    """LLLite networks (attached) and merged LoRAs.

    Also sets ``args.network_mul`` to one multiplier per LoRA file (the defaults for every batch).
    """
    from library.lora import merge_lora
    from networks.control_net_lllite import ControlNetLLLite

    lllites = []
    for path in args.control_net_lllite_models:
        net = ControlNetLLLite.from_file(models.unet, path, dtype=dtype)
        lllites.append(net.to(device).attach())
        logger.info("LLLite %s: cond_emb_dim=%d network_dim=%d", path, net.cond_emb_dim, net.network_dim)

    loras = []
    if args.network_weights:
        modules = args.network_module or ["networks.lora"]
        if len(modules) == 1:
            modules = modules * len(args.network_weights)
        if len(modules) != len(args.network_weights):
            raise UserError(f"{len(args.network_module)} --network_module values for {len(args.network_weights)} --network_weights files")
        muls = args.network_mul or [1.0]
        if len(muls) == 1:
            muls = muls * len(args.network_weights)
        if len(muls) != len(args.network_weights):
            raise UserError(f"{len(args.network_mul)} --network_mul values for {len(args.network_weights)} --network_weights files")
        for module, path, mul in zip(modules, args.network_weights, muls):
            if module == "networks.control_net_lllite":
                raise UserError(f"{path}: give LLLite files with --control_net_lllite_models, not --network_weights")
            if module not in ("networks.lora", "lora"):
                raise UserError(f"--network_module {module} is not supported here: only networks.lora (kohya-format LoRA)")
            loras.append(merge_lora(path, models.unet, models.text_encoder1, models.text_encoder2, mul))
        args.network_mul = muls
    elif args.network_module:
        logger.warning("--network_module given without --network_weights: ignored")
    return lllites, loras


class LoraMultipliers:
    """Sets the merged LoRAs' multipliers for each batch: a prompt line's ``--am``, else ``--network_mul``."""

    def __init__(self, loras: list[MergedLoRA], defaults: list[float]):
        self.loras = loras
        self.defaults = defaults
        self.warned_am = False  # the "--am without LoRA" warning is given once per run

    def apply(self, request: GenerationRequest) -> None:
        """Multipliers for a batch whose requests all share ``request``'s ``network_multipliers``."""
        if request.network_multipliers is not None:
            if not self.loras and not self.warned_am:
                logger.warning("--am given but no LoRA is loaded (--network_weights): ignored")
                self.warned_am = True
            for i, lora in enumerate(self.loras):
                lora.set_multiplier(
                    request.network_multipliers[i] if i < len(request.network_multipliers) else self.defaults[i]
                )
        else:
            for lora, mul in zip(self.loras, self.defaults):
                lora.set_multiplier(mul)
