"""``sdxl_gen_img.py``'s options: the parser, and one pass that turns them into typed, checked objects.

Every option of sd-scripts' ``sdxl_gen_img.py`` (78) plus this project's own (``--control_net_starts``,
``--negative_prompt``, ``--device``, ``--no_progress``) is declared once, as a field of one of the ``ARGS``
dataclasses (library/cli.py's spec: type, default, range, help); :func:`build_parser` is built from them.
:func:`resolve` checks every value against its meaning (ranges, combinations, files that must
exist) and returns a frozen :class:`GenOptions`; nothing reads the ``argparse.Namespace`` after it
and nothing changes it. Each failure is a ``UserError`` that names the option, the value and what
is allowed. Options that cannot apply here parse (so launch scripts written for sd-scripts get a
reason, not "unrecognized arguments") and are refused when set, with what to use instead.

Folders are checked last and by creating them (:func:`prepare_folders`), after the prompt lines and
images have been read, so that a failing run writes nothing.

Heavy libraries are not imported here: ``--help`` and option errors stay fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library import console_logging
from library.atomic_io import make_output_folders
from library.cli import (
    OptionParser,
    Options,
    PromptKey,
    check_refused,
    flag,
    option,
    option_label,
    option_values,
    options_of,
    refused,
    switched_off,
)
from library.console_logging import ConsoleLogOptions
from library.errors import UserError
from library.generation.samplers import SAMPLER_NAMES
from library.generation.requests import (
    LIMITS,
    DeepShrink,
    GenerationRequest,
    GradualLatent,
    Unsharp,
    check_limit,
    checked_size,
)
from library.sdxl.model_source import check_model_source

LORA_MODULES = ("networks.lora", "lora")
REFUSED = {
    "network_args": "networks.lora reads no arguments when it generates (sd-scripts hands them to the network module, "
                    "and its LoRA uses them only for training's block learning rates); weight a LoRA with "
                    "--network_mul or a prompt line's --am instead",
    "network_regional_mask_max_color_codes": "regional LoRA (a colour-coded mask that confines each LoRA to a region) "
                                             "is not supported: --mask_path is the inpainting mask here; apply a LoRA "
                                             "to the whole image with --network_mul",
    "clip_vision_strength": "CLIP Vision conditioning needs a CLIP vision model (IP-Adapter style), which this project "
                            "does not load; for img2img use --image_path with --strength",
}
SAMPLER = "ddim"  # sd-scripts' sdxl_gen_img.py default (the trainer's samples have their own)
SIZE = 1024  # --W / --H when not given (sd-scripts' fallback)
MAX_EMBEDDINGS_MULTIPLES = 1  # --max_embeddings_multiples when not given (sd-scripts': 75 tokens)


@dataclass(frozen=True)
class RefusedOptions:
    """sd-scripts' generation options that cannot apply here: they parse, and stop the run with the reason."""

    network_args: None = refused(REFUSED["network_args"], nargs="*", group="LoRA")
    network_regional_mask_max_color_codes: None = refused(REFUSED["network_regional_mask_max_color_codes"], group="LoRA")
    clip_vision_strength: None = refused(REFUSED["clip_vision_strength"], type=float, group="ControlNet-LLLite")


HIGHRES_FIX_STEPS = 28  # --highres_fix_steps when not given (Deep Shrink / Gradual Latent: their settings' defaults)


# ----------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArgs(Options):
    group = "model"

    ckpt: str | None = option(required=True,
        help="SDXL checkpoint: .safetensors/.ckpt file, diffusers folder or hub id")
    vae: str | None = option(
        help="a VAE to use instead of the checkpoint's (e.g. an fp16-fixed SDXL VAE)")
    tokenizer_cache_dir: str | None = option(
        help="read the tokenizers from this folder; when it has none, the "
             "bundled ones are written there first (for offline machines, as in sd-scripts)")
    textual_inversion_embeddings: list = option([], nargs="*",
        help="SDXL embeddings (clip_l/clip_g); the token is the file name")
    fp16: bool = flag(help="U-Net, text encoders and LLLite in float16")
    bf16: bool = flag(help="U-Net, text encoders and LLLite in bfloat16")
    no_half_vae: bool = flag(help="keep the VAE in float32")
    sdpa: bool = flag(help="PyTorch scaled-dot-product attention (also the default)")
    xformers: bool = flag(help="xformers attention (CUDA only; else SDPA with a warning)")
    diffusers_xformers: bool = flag(help="diffusers' xformers attention, here the same as the xformers option")
    opt_channels_last: bool = flag(help="U-Net, VAE and networks in channels-last memory format")
    device: str | None = option(
        help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    vae_batch_size: float | None = option(type=float, limit=LIMITS["vae_batch_size"],
        help="images per VAE call (default: the batch size); below 1: that share of the batch size")
    vae_slices: int | None = option(type=int, limit=LIMITS["vae_slices"],
        help="decode/encode each image in this many horizontal strips: less VAE memory, a little slower")


@dataclass(frozen=True)
class LoraArgs(Options):
    group = "LoRA"

    network_module: list = option([], nargs="*",
        help="networks.lora, one per --network_weights file (as in "
             "sd-scripts, a file without a module is not loaded)")
    network_weights: list = option([], nargs="*",
        help="kohya-format SDXL LoRA files")
    network_mul: list = option([], type=float, nargs="*", limit=LIMITS["number"],
        prompt_key=PromptKey("am", "LoRA multipliers, one per --network_weights file", field="network_multipliers"),
        help="LoRA multipliers in file order; files without one get 1.0")
    network_merge: bool = flag(help="merge every LoRA into the weights for good (fixed multiplier)")
    network_merge_n_models: int | None = option(type=int,  # its range is checked with the files (_merged_count)
        help="merge only the first N LoRA files")
    network_pre_calc: bool = flag(help="merge the LoRAs that are not merged for good before each batch (from kept original weights)")
    network_show_meta: bool = flag(help="print each LoRA/LLLite file's metadata")


@dataclass(frozen=True)
class ControlArgs(Options):
    group = "ControlNet-LLLite"

    control_net_lllite_models: list = option([], nargs="*",
        help="LLLite files; several are stacked")
    guide_image_path: list = option([], nargs="*",
        prompt_key=PromptKey("cn", "guide image path(s), one per LLLite model", field="guide_images", accumulate=True),
        help="guide images (or folders of them), taken in groups of one per model; groups cycle over the images")
    control_net_multipliers: list = option(type=float, nargs="*",
        help="strength per model, in model order (default 1.0)")
    control_net_ratios: list = option(type=float, nargs="*",
        help="fraction of the steps, from the start, during which each model stays on (default 1.0)")
    control_net_starts: list = option(type=float, nargs="*",
        help="fraction of the steps before each model switches on (default 0.0; not in sd-scripts)")


@dataclass(frozen=True)
class PromptArgs(Options):
    group = "prompts"

    prompt: str | None = option(
        help="a prompt line (may carry options: --n negative --d seed --w --h --s --l ...)")
    negative_prompt: str | None = option("", prompt_key=PromptKey("n", "negative prompt (replaces --negative_prompt)"),
        help="default negative prompt (a line's --n replaces it)")
    from_file: str | None = option(
        help="prompt file: one prompt line per line, or .toml/.json")
    interactive: bool = flag(help="read prompt lines from stdin until EOF or an empty line")
    no_preview: bool = flag(help="in --interactive mode, do not open each image in a viewer")
    clip_skip: int | None = option(type=int, limit=LIMITS["clip_skip"],
        help="text encoder hidden state counted from the end (default 2)")
    max_embeddings_multiples: int | None = option(type=int, limit=LIMITS["count"],
        help="prompt length in units of 75 tokens; longer prompts are cut (default 1, as sd-scripts)")


@dataclass(frozen=True)
class SamplingArgs(Options):
    group = "sampling"

    images_per_prompt: int | None = option(1, type=int, limit=LIMITS["count"],
        help="images per prompt (default 1)")
    n_iter: int | None = option(1, type=int, limit=LIMITS["count"],
        help="repeat the whole prompt list this many times (default 1)")
    batch_size: int | None = option(1, type=int, limit=LIMITS["count"],
        help="images per U-Net call (default 1)")
    W: int | None = option(type=int, prompt_key=PromptKey("w", "width", field="width"),
        help="width, rounded down to a multiple of 8 (default 1024; img2img "
             "without the highres fix: the init image's, see docs/generation.md)")
    H: int | None = option(type=int, prompt_key=PromptKey("h", "height", field="height"),
        help="height, rounded down to a multiple of 8 (default 1024; img2img "
             "without the highres fix: the init image's, see docs/generation.md)")
    steps: int | None = option(50, type=int, limit=LIMITS["count"], prompt_key=PromptKey("s", "number of steps"),
        help="sampling steps (default 50)")
    sampler: str | None = option(SAMPLER, type=str.lower, choices=SAMPLER_NAMES,
        prompt_key=PromptKey("ss", "sampler", kind="sampler"),
        help=f"sampler (default {SAMPLER})")
    scale: float | None = option(7.5, type=float, limit=LIMITS["number"], prompt_key=PromptKey("l", "CFG scale"),
        help="CFG scale (default 7.5)")
    negative_scale: float | None = option(type=float, limit=LIMITS["number"],
        prompt_key=PromptKey("nl", "negative scale (none switches it off)", kind="float/none"),
        help="separate scale for the negative prompt")
    seed: int | None = option(type=int, limit=LIMITS["seed"],
        prompt_key=PromptKey("d", "seed, or a comma list of seeds", field="seeds", kind="ints"),
        help="seed of the first image; the next images count up from it")
    iter_same_seed: bool = flag(help="all images of one --n_iter iteration use one seed")
    original_width: int | None = option(type=int, limit=LIMITS["size_conditioning"],
        prompt_key=PromptKey("ow", "SDXL original width"), help="SDXL original-size conditioning (default: the pass's size)")
    original_height: int | None = option(type=int, limit=LIMITS["size_conditioning"],
        prompt_key=PromptKey("oh", "SDXL original height"), help="SDXL original-size conditioning (default: the pass's size)")
    original_width_negative: int | None = option(type=int, limit=LIMITS["size_conditioning"],
        prompt_key=PromptKey("nw", "original width of the negative half of CFG"), help="original size for the negative half of CFG (default: original)")
    original_height_negative: int | None = option(type=int, limit=LIMITS["size_conditioning"],
        prompt_key=PromptKey("nh", "original height of the negative half of CFG"), help="original size for the negative half of CFG (default: original)")
    crop_top: int | None = option(type=int, limit=LIMITS["crop"], prompt_key=PromptKey("ct", "SDXL crop top"), help="SDXL crop conditioning (default 0)")
    crop_left: int | None = option(type=int, limit=LIMITS["crop"], prompt_key=PromptKey("cl", "SDXL crop left"), help="SDXL crop conditioning (default 0)")


@dataclass(frozen=True)
class ImageArgs(Options):
    group = "img2img, inpainting, highres fix"

    image_path: str | None = option(
        help="init image (or folder of images) for img2img")
    strength: float | None = option(type=float, limit=LIMITS["strength"], prompt_key=PromptKey("t", "img2img strength"),
        help="img2img strength, and the highres fix's second pass's (default 0.8)")
    mask_path: str | None = option(
        help="inpainting mask (or folder): white is regenerated; needs --image_path")
    highres_fix_scale: float | None = option(type=float, limit=LIMITS["highres_fix_scale"],
        help="first pass at this fraction of the final size")
    highres_fix_steps: int | None = option(type=int, limit=LIMITS["count"],
        help="steps of the first pass (default 28)")
    highres_fix_strength: float | None = option(type=float, limit=LIMITS["strength"],
        help="img2img strength of the first pass, with --image_path (default: --strength)")
    highres_fix_save_1st: bool = flag(help="also save the first pass's image (*_1st.png)")
    highres_fix_latents_upscaling: bool = flag(help="upscale latents (= upscaler latent_bilinear)")
    highres_fix_upscaler: str | None = option(
        help="bicubic (default), bilinear, nearest, lanczos, "
             "latent_bilinear, latent_bicubic, latent_nearest")
    highres_fix_upscaler_args: str | None = option(
        help='"sharpen=0.5;sharpen_sigma=1.0" for pixel upscalers')
    highres_fix_disable_control_net: bool = flag(help="no LLLite in the second pass")


@dataclass(frozen=True)
class ShrinkArgs(Options):
    group = "Deep Shrink and Gradual Latent (see docs/generation.md)"

    ds_depth_1: int | None = option(type=int, limit=LIMITS["ds_depth"], sets="deep_shrink.depth_1",
        prompt_key=PromptKey("dsd1", "Deep Shrink depth 1"),
        help="Deep Shrink: shrink before this input block (0-8)")
    ds_timesteps_1: int | None = option(type=int, limit=LIMITS["timesteps"], sets="deep_shrink.timesteps_1",
        prompt_key=PromptKey("dst1", "Deep Shrink timesteps 1"),
        help="... while the timestep is at least this (default 650)")
    ds_depth_2: int | None = option(type=int, limit=LIMITS["ds_depth"], sets="deep_shrink.depth_2",
        prompt_key=PromptKey("dsd2", "Deep Shrink depth 2"),
        help="Deep Shrink: a second depth for later timesteps")
    ds_timesteps_2: int | None = option(type=int, limit=LIMITS["timesteps"], sets="deep_shrink.timesteps_2",
        prompt_key=PromptKey("dst2", "Deep Shrink timesteps 2"),
        help="... while the timestep is at least this (default 650)")
    ds_ratio: float | None = option(type=float, limit=LIMITS["shrink_ratio"], sets="deep_shrink.ratio",
        prompt_key=PromptKey("dsr", "Deep Shrink ratio"),
        help="Deep Shrink resize ratio (default 0.5)")
    gradual_latent_timesteps: int | None = option(type=int, limit=LIMITS["timesteps"], sets="gradual_latent.timesteps",
        prompt_key=PromptKey("glt", "Gradual Latent: start growing below this timestep", field="gl_timesteps"),
        help="Gradual Latent: start small, grow the latents below this timestep (euler_a only)")
    gradual_latent_ratio: float | None = option(type=float, limit=LIMITS["shrink_ratio"], sets="gradual_latent.ratio",
        prompt_key=PromptKey("glr", "Gradual Latent start ratio", field="gl_ratio"),
        help="starting size ratio (default 0.5)")
    gradual_latent_ratio_step: float | None = option(type=float, limit=LIMITS["ratio_step"],
        sets="gradual_latent.ratio_step", prompt_key=PromptKey("gls", "Gradual Latent ratio step", field="gl_ratio_step"),
        help="ratio added at each growth (default 0.125)")
    gradual_latent_every_n_steps: int | None = option(type=int, limit=LIMITS["count"],
        sets="gradual_latent.every_n_steps",
        prompt_key=PromptKey("gle", "Gradual Latent: grow every n steps", field="gl_every_n_steps"),
        help="steps between growths (default 3)")
    gradual_latent_s_noise: float | None = option(type=float, limit=LIMITS["s_noise"], sets="gradual_latent.s_noise",
        prompt_key=PromptKey("glsn", "Gradual Latent s_noise", field="gl_s_noise"),
        help="noise scale at a growth (default 1.0)")
    gradual_latent_unsharp_params: str | None = option(sets="gradual_latent.unsharp",
        prompt_key=PromptKey("glus", "Gradual Latent unsharp mask ksize,sigma,strength[,target_x]", field="gl_unsharp",
                             kind="unsharp"),
        help="unsharp mask at each growth: ksize,sigma,strength[,target_x], e.g. 3,0.5,0.5,1")


@dataclass(frozen=True)
class OutputArgs(Options):
    group = "output and logging"

    outdir: str | None = option("outputs",
        help="folder for the PNG files (default outputs)")
    sequential_file_name: bool = flag(help="name files im_000001.png, im_000002.png, ...")
    use_original_file_name: bool = flag(help="start file names with the init/guide image's name")
    no_progress: bool = flag(help="no progress bars")


# The command line's options, in --help order (sdxl_gen_img.py's console options and the refusals follow).
ARGS = (ModelArgs, LoraArgs, ControlArgs, PromptArgs, SamplingArgs, ImageArgs, ShrinkArgs, OutputArgs)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The parser of ``sdxl_gen_img.py``: sd-scripts' options and this project's own."""
    p = OptionParser(description=description)
    p.add_options(*ARGS, *console_logging.OPTIONS, RefusedOptions)  # the refusals join the LoRA and LLLite groups
    return p


# ----------------------------------------------------------------------------------------------
# The typed options
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOptions:
    ckpt: str
    vae: str | None = None
    precision: str = "fp32"  # fp32, fp16 or bf16: U-Net, text encoders, LLLite
    vae_fp32: bool = False
    device: str | None = None
    attention: str = "sdpa"  # sdpa or xformers
    channels_last: bool = False
    tokenizer_cache_dir: str | None = None
    textual_inversion: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoraSpec:
    path: str
    multiplier: float = 1.0
    mode: str = "hooked"  # hooked (sd-scripts' default), pre_calc, or merged (for good)


@dataclass(frozen=True)
class InputOptions:
    """What to draw: prompts, counts, seeds and the image files that cycle over the images."""

    prompt: str | None = None
    from_file: str | None = None
    interactive: bool = False
    images_per_prompt: int = 1
    n_iter: int = 1
    seed: int | None = None
    iter_same_seed: bool = False
    lllite_models: tuple[str, ...] = ()
    guide_paths: tuple[str, ...] = ()
    image_path: str | None = None
    mask_path: str | None = None
    # --W and --H, when both are given: img2img without the highres fix resizes its init image to this (sd-scripts)
    init_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class DrawOptions:
    """How batches run: passed to ``generate`` for every batch."""

    batch_size: int = 1
    vae_batch_size: float | None = None
    vae_slices: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class OutputOptions:
    outdir: Path = Path("outputs")
    sequential: bool = False
    original_name: bool = False
    save_first_pass: bool = False
    preview: bool = False  # interactive mode without --no_preview
    log: ConsoleLogOptions = ConsoleLogOptions()


@dataclass(frozen=True)
class GenOptions:
    model: ModelOptions
    loras: tuple[LoraSpec, ...]
    show_meta: bool
    inputs: InputOptions
    draw: DrawOptions
    output: OutputOptions
    defaults: GenerationRequest  # the request every prompt line starts from (frozen, like every field here)
    # Deep Shrink / Gradual Latent settings that only a prompt line can switch on: (feature, option, switch)
    waiting_for_lines: tuple[tuple[str, str, str], ...] = ()


# ----------------------------------------------------------------------------------------------
# Resolving
# ----------------------------------------------------------------------------------------------


def _given(args: argparse.Namespace, name: str) -> bool:
    value = getattr(args, name)
    return value not in (None, False, [], "")


def _shown(value: Any) -> str:
    if value is True:
        return ""
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) else str(value)


def _switch_off(values: dict[str, Any], names: tuple[str, ...], needed: str, why: str,
                defaults: dict[str, Any]) -> None:
    """Each of ``names`` given without ``needed`` does nothing in sd-scripts: one warning each, then its default."""
    for name in names:
        if values[name] not in (None, False, [], ""):
            shown = _shown(values[name])
            switched_off(f"--{name}{' ' + shown if shown else ''}", needed, why)
            values[name] = defaults[name]


def _existing(label: str, path: str | None, folder_ok: bool = False) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UserError(f"{label} {path}: no such file. Check the path.")
    if p.is_dir() and not folder_ok:
        raise UserError(f"{label} {path} is a folder; give a file")


def _check_files(args: argparse.Namespace) -> None:
    check_model_source(args.ckpt, "--ckpt")
    _existing("--vae", args.vae, folder_ok=True)
    for name in ("control_net_lllite_models", "network_weights", "textual_inversion_embeddings"):
        for path in getattr(args, name):
            _existing(f"--{name}", path)
    _existing("--from_file", args.from_file)
    for name in ("image_path", "mask_path"):
        _existing(f"--{name}", getattr(args, name), folder_ok=True)
    for path in args.guide_image_path:
        _existing("--guide_image_path", path, folder_ok=True)
    if args.tokenizer_cache_dir and Path(args.tokenizer_cache_dir).is_file():
        raise UserError(f"--tokenizer_cache_dir {args.tokenizer_cache_dir} is a file; give a folder")


def _model_options(args: argparse.Namespace) -> ModelOptions:
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 both given: choose one precision")
    xformers = args.xformers or args.diffusers_xformers
    if xformers and args.sdpa:
        raise UserError(f"--sdpa and --{'xformers' if args.xformers else 'diffusers_xformers'} both given: choose one "
                        "attention implementation")
    return ModelOptions(
        ckpt=args.ckpt, vae=args.vae, precision="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
        vae_fp32=args.no_half_vae, device=args.device, attention="xformers" if xformers else "sdpa",
        channels_last=args.opt_channels_last, tokenizer_cache_dir=args.tokenizer_cache_dir,
        textual_inversion=tuple(args.textual_inversion_embeddings),
    )


def _lora_specs(args: argparse.Namespace) -> tuple[LoraSpec, ...]:
    files = list(args.network_weights)
    modules = list(args.network_module)  # one per file: _ignore_switched_off dropped the files without one
    for module in modules:
        if module == "networks.control_net_lllite":
            raise UserError("--network_module networks.control_net_lllite: give LLLite files with "
                            "--control_net_lllite_models, not --network_weights")
        if module not in LORA_MODULES:
            raise UserError(f"--network_module {module}: only networks.lora (kohya-format LoRA/LoCon) is supported here")
    merged = _merged_count(args, len(files))
    muls = list(args.network_mul) + [1.0] * (len(files) - len(args.network_mul))
    modes = ["merged" if i < merged else "pre_calc" if args.network_pre_calc else "hooked" for i in range(len(files))]
    return tuple(LoraSpec(f, m, mode) for f, m, mode in zip(files, muls, modes))


def _merged_count(args: argparse.Namespace, n_files: int) -> int:
    if args.network_merge and args.network_merge_n_models is not None:
        raise UserError(f"--network_merge and --network_merge_n_models {args.network_merge_n_models} both given: "
                        "--network_merge merges every file; give one of them")
    if args.network_merge_n_models is not None:
        check_limit("--network_merge_n_models", args.network_merge_n_models, "count")
        if args.network_merge_n_models > n_files:
            raise UserError(f"--network_merge_n_models {args.network_merge_n_models} is more than the {n_files} "
                            "--network_weights file(s): it must be at most the number of files")
        return args.network_merge_n_models
    return n_files if args.network_merge else 0


def _feature_options(feature: str) -> list:
    """The declared options that fill ``feature`` (``deep_shrink``, ``gradual_latent``), in declaration order."""
    return [o for o in options_of(ShrinkArgs) if o.sets and o.sets.startswith(feature + ".")]


def _shrink_settings(args: argparse.Namespace) -> tuple[DeepShrink, GradualLatent]:
    """The command line's Deep Shrink and Gradual Latent settings (off unless their switch is given)."""
    settings = []
    for feature, cls in (("deep_shrink", DeepShrink), ("gradual_latent", GradualLatent)):
        values = {}
        for opt in _feature_options(feature):
            value = getattr(args, opt.name)  # its range was checked from its declaration
            if value is not None and opt.sets == "gradual_latent.unsharp":
                try:
                    value = Unsharp.parse(value)
                except ValueError as e:
                    raise UserError(f"{opt.label} {value!r}: {e}") from None
            if value is not None:  # not given: the settings' own default
                values[opt.sets.split(".", 1)[1]] = value
        settings.append(cls(**values))
    return settings[0], settings[1]


def _default_request(args: argparse.Namespace, n_models: int) -> GenerationRequest:
    deep_shrink, gradual_latent = _shrink_settings(args)
    width, height = (SIZE if value is None else checked_size(label, value, n_models)
                     for label, value in (("--W", args.W), ("--H", args.H)))
    upscaler, upscaler_args = _upscaler(args)
    return GenerationRequest(
        negative_prompt=args.negative_prompt, width=width, height=height, steps=args.steps, scale=args.scale,
        negative_scale=args.negative_scale, sampler=args.sampler,
        control_multipliers=args.control_net_multipliers, control_starts=args.control_net_starts,
        control_ratios=args.control_net_ratios, strength=args.strength,
        original_width=args.original_width, original_height=args.original_height,
        original_width_negative=args.original_width_negative, original_height_negative=args.original_height_negative,
        crop_top=args.crop_top or 0, crop_left=args.crop_left or 0, clip_skip=args.clip_skip,
        max_embeddings_multiples=args.max_embeddings_multiples or MAX_EMBEDDINGS_MULTIPLES,
        highres_fix_scale=args.highres_fix_scale,
        highres_fix_steps=args.highres_fix_steps or HIGHRES_FIX_STEPS,
        highres_fix_strength=args.highres_fix_strength,
        highres_fix_disable_control_net=args.highres_fix_disable_control_net,
        highres_fix_latents_upscaling=args.highres_fix_latents_upscaling, highres_fix_upscaler=upscaler,
        highres_fix_upscaler_args=upscaler_args, deep_shrink=deep_shrink, gradual_latent=gradual_latent,
    )


def _upscaler(args: argparse.Namespace) -> tuple[str | None, tuple[tuple[str, float], ...]]:
    from library.generation.upscalers import (
        DEFAULT_UPSCALER,
        check_upscaler,
        parse_upscaler_args,
    )

    name = check_upscaler(args.highres_fix_upscaler) if args.highres_fix_upscaler else None
    if name and args.highres_fix_latents_upscaling and name != "latent_bilinear":
        raise UserError(f"--highres_fix_upscaler {name} and --highres_fix_latents_upscaling both choose the upscaler: "
                        "give one of them")
    effective = name or ("latent_bilinear" if args.highres_fix_latents_upscaling else DEFAULT_UPSCALER)
    return name, parse_upscaler_args(effective, args.highres_fix_upscaler_args)


def _ignore_switched_off(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Options whose switch is off are ignored with one warning each, as sd-scripts ignores them (cli.switched_off).

    Returns a copy of ``args`` with each of them back at its default, so that the run (and the PNG
    metadata) is the one sd-scripts draws. The cases that stay errors say why where they are raised.
    """
    v = dict(vars(args))
    defaults = {action.dest: action.default for action in parser._actions}
    if v["highres_fix_scale"] is None and (v["highres_fix_upscaler"] or v["highres_fix_upscaler_args"]):
        _upscaler(args)  # a bad name or argument stays an error (sd-scripts imports the module even then)
    if v["mask_path"] is not None and v["image_path"] is None:
        # Not ignored by sd-scripts: without LoRAs it fails on the mask (no init image to go with it), with
        # LoRAs the mask becomes a regional-LoRA mask, which is not supported here.
        raise UserError(f"--mask_path {v['mask_path']} needs --image_path: the mask says which part of the init image "
                        "is drawn again")
    modules, files = v["network_module"], v["network_weights"]
    if len(modules) > len(files):
        # sd-scripts stops here too ("No weight. Weight is required.").
        raise UserError(f"--network_module {' '.join(modules)} needs --network_weights: {len(modules)} module(s) for "
                        f"{len(files)} file(s); give one LoRA file per module")
    if len(files) > len(modules):  # sd-scripts loads one file per module and ignores the rest
        switched_off(f"--network_weights {' '.join(files[len(modules):])}", "a --network_module networks.lora for each "
                     "file", "a file without a module is not loaded")
        v["network_weights"] = files[:len(modules)]
    image, hires, lora = v["image_path"] is not None, v["highres_fix_scale"] is not None, bool(v["network_weights"])
    switches = [
        (not hires, ("highres_fix_steps", "highres_fix_strength", "highres_fix_save_1st", "highres_fix_latents_upscaling",
                     "highres_fix_upscaler", "highres_fix_upscaler_args", "highres_fix_disable_control_net"),
         "--highres_fix_scale", "it configures the highres fix"),
        (not image, ("highres_fix_strength",), "--image_path",
         "it is the first highres pass's img2img strength; the second pass's is --strength"),
        (not (image or hires), ("strength",), "--image_path or --highres_fix_scale", "it is the img2img strength"),
        (not v["control_net_lllite_models"], ("guide_image_path", "control_net_multipliers", "control_net_ratios",
                                              "control_net_starts", "highres_fix_disable_control_net"),
         "--control_net_lllite_models", "it is for LLLite models"),
        (not lora, ("network_mul", "network_merge", "network_merge_n_models", "network_pre_calc"),
         "--network_weights", "it sets how LoRA files are applied"),
        (not v["interactive"], ("no_preview",), "--interactive", "images are shown only in interactive mode"),
        (not (lora or v["control_net_lllite_models"]), ("network_show_meta",),
         "--network_weights or --control_net_lllite_models", "there is no file to show"),
    ]
    for off, names, needed, why in switches:
        if off:
            _switch_off(v, names, needed, why, defaults)
    if image and not hires and (v["W"] is None) != (v["H"] is None):
        given, other = ("W", "H") if v["W"] is not None else ("H", "W")
        _switch_off(v, (given,), f"--{other}", "img2img draws at the init image's size, resized to --W x --H only "
                    "when both are given", defaults)
    for name, files in (("network_mul", "network_weights"), ("control_net_multipliers", "control_net_lllite_models"),
                        ("control_net_ratios", "control_net_lllite_models"),
                        ("control_net_starts", "control_net_lllite_models")):
        n, given = len(v[files]), v[name] or []
        if n and len(given) > n:  # sd-scripts reads one value per file and never looks at the rest
            switched_off(f"--{name} {_shown(given[n:])}", f"a --{files} file for each value",
                         f"{n} file{'s' if n > 1 else ''} given")
            v[name] = given[:n]
    n_files = len(v["network_weights"])
    if v["network_pre_calc"] and _merged_count(argparse.Namespace(**v), n_files) == n_files:
        switched_off("--network_pre_calc", "a LoRA that is not merged for good",
                     "--network_merge / --network_merge_n_models merge every file")
        v["network_pre_calc"] = False
    if not (v["prompt"] or v["from_file"] or v["interactive"]):
        raise UserError("nothing to draw: give --prompt, --from_file or --interactive")
    return argparse.Namespace(**v)


def _waiting_for_lines(args: argparse.Namespace) -> tuple[tuple[str, str, str], ...]:
    """Deep Shrink / Gradual Latent settings given without their switch: (feature, option, how to switch it on).

    A prompt line's key for the switch (or for any of their options) may switch the feature on with
    these settings, so they are checked once the lines are read (``generation_jobs.check_waiting_settings``).
    """
    waiting = []
    for feature, cls in (("deep_shrink", DeepShrink), ("gradual_latent", GradualLatent)):
        declared = _feature_options(feature)
        switch = next(o for o in declared if o.sets == f"{feature}.{cls.SWITCH}")
        if getattr(args, switch.name) is not None:
            continue
        for opt in declared:
            if opt is not switch and _given(args, opt.name):
                waiting.append((feature, f"{opt.label} {_shown(getattr(args, opt.name))}",
                                f"{switch.label} (or a prompt line's --{switch.prompt_key.key})"))
    return tuple(waiting)


def resolve(args: argparse.Namespace) -> GenOptions:
    """Every option checked and turned into typed objects; a UserError naming the first bad one."""
    parser = build_parser()  # the parser costs milliseconds
    check_refused(parser, args)  # cli's rule, shared with the trainer
    for declared in ARGS:
        option_values(declared, args)  # each value against its declared range
    _check_files(args)  # before ignoring: a missing file stays an error (sd-scripts opens the images it is given)
    args = _ignore_switched_off(args, parser)
    defaults = _default_request(args, len(args.control_net_lllite_models))
    return GenOptions(
        model=_model_options(args), loras=_lora_specs(args), show_meta=args.network_show_meta,
        inputs=InputOptions(
            prompt=args.prompt, from_file=args.from_file, interactive=args.interactive,
            images_per_prompt=args.images_per_prompt, n_iter=args.n_iter, seed=args.seed,
            iter_same_seed=args.iter_same_seed, lllite_models=tuple(args.control_net_lllite_models),
            guide_paths=tuple(args.guide_image_path), image_path=args.image_path, mask_path=args.mask_path,
            init_size=None if args.W is None or args.H is None else (defaults.width, defaults.height),
        ),
        draw=DrawOptions(args.batch_size, args.vae_batch_size, args.vae_slices, not args.no_progress),
        output=OutputOptions(
            outdir=Path(args.outdir), sequential=args.sequential_file_name, original_name=args.use_original_file_name,
            save_first_pass=args.highres_fix_save_1st, preview=args.interactive and not args.no_preview,
            log=ConsoleLogOptions.from_args(args),
        ),
        defaults=defaults, waiting_for_lines=_waiting_for_lines(args),
    )


def prepare_folders(opts: GenOptions) -> list[Path]:
    """Create the output folders (checked by writing into them); on failure nothing created is left behind.

    Returns the folders this created, for ``atomic_io.remove_empty`` when the run fails later.
    """
    folders = [(option_label(OutputArgs, "outdir"), opts.output.outdir)]
    if opts.output.log.file is not None:
        folders.append((option_label(ConsoleLogOptions, "file"), opts.output.log.file.parent))
    if opts.model.tokenizer_cache_dir:
        folders.append(("--tokenizer_cache_dir", Path(opts.model.tokenizer_cache_dir)))
    return make_output_folders(folders)


def options_summary(opts: GenOptions) -> dict[str, Any]:
    """What every PNG of this run records besides its request: model, VAE, LLLite and LoRA file names."""
    return {
        "model": Path(opts.model.ckpt).name, "vae": Path(opts.model.vae).name if opts.model.vae else None,
        "lllite_models": [Path(p).name for p in opts.inputs.lllite_models] or None,
        "networks": [Path(s.path).name for s in opts.loras] or None,
    }
