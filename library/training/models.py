"""The models a training run works on: the frozen SDXL base and the LLLite network that trains.

Options: the base model and how it is held in memory (``ModelOptions``), attention and compilation
(``AttentionOptions``), and the LLLite network (``NetworkOptions``). Each is declared here, next to
the code that uses it, and resolved once from the parsed options.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from library.cli import Limit, Options, check_choice, flag, option, option_label, refused, switched_off
from library.errors import UserError
from library.sdxl.loading import SDXLModels, check_model_source, load_sdxl
from library.sdxl.text_encoding import tokenizers_via_cache_dir
from networks.control_net_lllite import ControlNetLLLite

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "sdpa", "xformers", "mem_eff")
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensorrt", "aot_torchxla_trace_once", "torchxla_trace_once", "ipex", "tvm")
NETWORK_MODULE = "networks.control_net_lllite"


@dataclass(frozen=True)
class ModelOptions(Options):
    group = "model"

    path: str | None = option(
        name="pretrained_model_name_or_path", help="SDXL .safetensors/.ckpt file, diffusers folder or hub id")
    vae: str | None = option(help="VAE file or folder that replaces the checkpoint's VAE")
    no_half_vae: bool = flag(help="keep the VAE in fp32 (the SDXL VAE overflows in fp16)")
    v_parameterization: bool = flag(help="v-prediction training (set for v-pred checkpoints)")
    tokenizer_cache_dir: str | None = option(
        help="folder for the two CLIP tokenizers: loaded from it when it holds them, else the bundled "
             "ones are written there (for offline use elsewhere)")
    lowram: bool = flag(
        help="load the checkpoint straight onto the GPU instead of host RAM (for machines with more VRAM than RAM)")
    highvram: bool = flag(help="keep the VAE and text encoders on the GPU after caching instead of freeing VRAM")
    disable_mmap: bool = flag(
        name="disable_mmap_load_safetensors",
        help="read .safetensors files in one go instead of memory-mapping them (faster on WSL and network drives)")
    fp8_base: bool = flag(
        help="store the frozen U-Net's linear and conv weights in float8 (e4m3fn), computed in the "
             "mixed-precision dtype: about half the U-Net's memory")
    v2: None = refused("SDXL has no v2 variant; v2 is for Stable Diffusion 2.x. "
                       "Drop it (for a v-prediction SDXL checkpoint use --v_parameterization)", flag=True)

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        if not v["path"] and not args.debug_dataset:  # as sd-scripts: it needs tokenizers only
            raise UserError("--pretrained_model_name_or_path is required (an SDXL .safetensors file, diffusers folder or hub id)")
        if not args.debug_dataset:  # checking the dataset needs no model, so it may not be there yet
            check_model_source(v["path"], "--pretrained_model_name_or_path")
        if v["vae"] and not args.debug_dataset and not Path(v["vae"]).expanduser().exists():
            raise UserError(f"--vae {v['vae']}: no such file or folder (an SDXL VAE .safetensors file or diffusers folder)")
        return {**v, "path": v["path"] or ""}


@dataclass(frozen=True)
class AttentionOptions(Options):
    group = "attention and compilation"

    xformers: bool = flag(help="xformers attention; falls back to SDPA with a warning where xformers or a GPU is missing")
    sdpa: bool = flag(help="PyTorch scaled-dot-product attention even where xformers is installed (the default picks "
                           "xformers when installed with a GPU, SDPA otherwise)")
    mem_eff_attn: bool = flag(help="sliced attention: the lowest peak memory, slower")
    gradient_checkpointing: bool = flag(help="recompute U-Net activations in the backward pass (much less memory)")
    torch_compile: bool = flag(help="compile the U-Net (with its LLLite hooks) with torch.compile")
    dynamo_backend: str = option(
        "inductor", help=f"torch.compile backend with --torch_compile: {', '.join(DYNAMO_BACKENDS)} (default inductor)")

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        # "no" is accelerate's "no compilation"; the kohya_ss GUI writes it into its configs.
        given = v["dynamo_backend"]
        if str(given).lower() == "no":
            if v["torch_compile"]:
                switched_off("--torch_compile", "a --dynamo_backend other than no", "accelerate compiles nothing with no")
            return {**v, "dynamo_backend": "no"}
        backend = check_choice("dynamo_backend", given, DYNAMO_BACKENDS, case_sensitive=False)
        if not v["torch_compile"] and backend != "inductor":
            switched_off(f"--dynamo_backend {given}", "--torch_compile")
        return {**v, "dynamo_backend": backend.lower()}

    @property
    def attention(self) -> str:
        """One of ATTENTION_CHOICES, by the reference's precedence: memory-efficient, then xformers, then SDPA."""
        return "mem_eff" if self.mem_eff_attn else "xformers" if self.xformers else "sdpa" if self.sdpa else "auto"

    @property
    def compile_backend(self) -> str | None:
        """The torch.compile backend, None = no compilation."""
        return self.dynamo_backend if self.torch_compile and self.dynamo_backend != "no" else None


@dataclass(frozen=True)
class NetworkOptions(Options):
    group = "network (LLLite)"

    cond_emb_dim: int = option(
        32, type=int, help="conditioning embedding channels C: an even number >= 2 (default 32, as published files)")
    network_dim: int = option(64, type=int, limit=Limit(1), what="the LLLite rank; published files use 64",
                              help="LLLite rank R, >= 1 (default 64, as published files)")
    dropout: float = option(name="network_dropout", type=float, limit=Limit(0, 1, high_open=True), what="a probability",
                            help="dropout on the mid activations while training, 0 <= p < 1")
    include_output_blocks: bool = flag(
        help="also wrap the attention of the U-Net's output (decoder) blocks. Published files skip them; "
             "kohya's ComfyUI node, sd-webui-controlnet and Forge load them, sd-scripts' sdxl_gen_img.py "
             "refuses them (docs/training.md). About twice the modules")
    weights: str | None = option(name="network_weights", help="initial LLLite weights, to continue training a file")
    network_module: str = option(NETWORK_MODULE,
                                 help=f"the network to train; only {NETWORK_MODULE} (this trainer's only network)")

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        if v["network_module"] != NETWORK_MODULE:
            raise UserError(f"{option_label(NetworkOptions, 'network_module')} {v['network_module']}: this trainer trains ControlNet-LLLite only "
                            f"({NETWORK_MODULE}); drop the option, or use sd-scripts' train_network.py for LoRA")
        if v["cond_emb_dim"] < 2 or v["cond_emb_dim"] % 2:
            raise UserError(f"--cond_emb_dim {v['cond_emb_dim']} is not allowed: it must be an even number >= 2 "
                            "(published files use 32)")
        if v["weights"] and not Path(v["weights"]).is_file():
            raise UserError(f"--network_weights {v['weights']}: no such file (an LLLite .safetensors/.pt/.ckpt to "
                            "continue from)")
        return {**v, "dropout": v["dropout"] or 0.0}


OPTIONS = (ModelOptions, AttentionOptions, NetworkOptions)


# ---------------------------------------------------------------------------------------------- the base model


def load_base_model(opts: ModelOptions, weight_dtype: torch.dtype, device: torch.device) -> SDXLModels:
    """The frozen SDXL models; the VAE in fp32 where fp16 would overflow or when asked."""
    vae_dtype = torch.float32 if opts.no_half_vae or weight_dtype == torch.float16 else weight_dtype
    # Loaded straight in the weight dtype: half the host memory of fp32 under mixed precision.
    models = load_sdxl(opts.path, vae=opts.vae, dtype=weight_dtype, vae_dtype=vae_dtype, lowram=opts.lowram,
                       device=device if opts.lowram else None, disable_mmap=opts.disable_mmap)
    if opts.tokenizer_cache_dir:
        models.tokenizer1, models.tokenizer2 = tokenizers_via_cache_dir(opts.tokenizer_cache_dir)
    for m in (models.unet, models.vae, models.text_encoder1, models.text_encoder2):
        m.requires_grad_(False)
    return models


def set_attention(unet: torch.nn.Module, attention: str) -> str:
    """Pick the U-Net's attention processor; returns what is in use, for the log."""
    from diffusers.models.attention_processor import (
        AttnProcessor2_0,
        SlicedAttnProcessor,
    )

    if attention == "mem_eff":
        # Sliced attention is diffusers' memory-efficient attention: one slice of heads at a time.
        unet.set_attn_processor(SlicedAttnProcessor(slice_size=1))
        return "sliced attention (--mem_eff_attn)"
    if attention in ("xformers", "auto"):
        why = _xformers_unusable()
        if why is None:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        if attention == "xformers":
            logger.warning("--xformers: %s; using PyTorch SDPA instead (as fast on recent GPUs)", why)
    unet.set_attn_processor(AttnProcessor2_0())
    return "PyTorch SDPA"


def _xformers_unusable() -> str | None:
    if not torch.cuda.is_available():
        return "xformers needs a CUDA GPU and none is available"
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # a build for another torch fails in several ways
        return f"xformers is not usable ({e}); `pip install xformers` matching your torch"
    return None


FP8_MAX = 448.0  # largest float8_e4m3fn value


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` as float8_e4m3fn with one fp32 scale per output channel: ``weight ~= stored * scale``.

    Without a scale, typical weights (|w| ~ 0.02) fall among float8's subnormals and lose most of
    their digits; scaled to the channel's largest value they keep e4m3's 3 mantissa bits.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (w / scale).to(torch.float8_e4m3fn), scale


class _Dequantize(torch.nn.Module):
    """Parametrization: a weight stored in float8, handed to its layer in the compute dtype."""

    def __init__(self, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return (stored.to(self.scale.dtype) * self.scale).to(self.dtype)


def store_weights_in_fp8(unet: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """``--fp8_base``: keep every Linear/Conv2d weight of the frozen U-Net in float8_e4m3fn.

    A parametrization dequantizes each weight to ``compute_dtype`` when its layer runs, so only one
    layer's weight exists in the compute dtype at a time. Norms, biases and embeddings stay in the
    compute dtype (they are a small share and the most sensitive to rounding). Returns the number
    of weights converted.
    """
    converted = 0
    for module in unet.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not parametrize.is_parametrized(module, "weight"):
            stored, scale = quantize_fp8(module.weight)
            module.weight = torch.nn.Parameter(stored, requires_grad=False)
            parametrize.register_parametrization(module, "weight", _Dequantize(scale.to(module.weight.device), compute_dtype),
                                                 unsafe=True)
            converted += 1
    return converted


def prepare_unet(models: SDXLModels, model: ModelOptions, attention: AttentionOptions,
                 weight_dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The frozen U-Net on the device, with its attention, fp8 storage, checkpointing and compilation.

    Returns the module to call: the compiled wrapper with ``--torch_compile``, the U-Net otherwise.
    """
    unet = models.unet
    logger.info("attention: %s", set_attention(unet, attention.attention))
    unet.to(device, dtype=weight_dtype)
    if model.fp8_base:
        n = store_weights_in_fp8(unet, weight_dtype)
        logger.info("--fp8_base: %d U-Net weights stored in float8_e4m3fn, computed in %s", n, weight_dtype)
    if attention.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if attention.compile_backend:
        # accelerate compiles only what is passed to prepare(), which here is the LLLite network;
        # the U-Net is compiled directly with the same backend. The LLLite hooks sit on its linears,
        # so dynamo traces them with it.
        return torch.compile(unet, backend=attention.compile_backend)
    return unet


def create_network(opts: NetworkOptions, unet: torch.nn.Module) -> ControlNetLLLite:
    """A fresh LLLite, or one continued from ``--network_weights``."""
    if opts.weights:
        network = ControlNetLLLite.from_file(unet, opts.weights, dropout=opts.dropout)
        if opts.include_output_blocks and not network.has_output_blocks:
            raise UserError(f"--network_weights {opts.weights} has no output-block modules, so it cannot "
                            "continue with --include_output_blocks; drop the option or start a fresh LLLite")
        return network
    return ControlNetLLLite(unet, opts.cond_emb_dim, opts.network_dim, dropout=opts.dropout,
                            include_output_blocks=opts.include_output_blocks)
