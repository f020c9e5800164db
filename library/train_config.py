"""Options of ``sdxl_train_control_net_lllite.py`` and the ``--config_file`` TOML that holds them.

Precedence: the command line beats the config file, which beats the defaults. Sections in the file
(``[model]``, ``[training]``, ...) are flattened. Unlike the reference tool, an unknown key is an
error that suggests the closest option, so a typo never silently trains with a default.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

import toml

from library.atomic_io import atomic_write_text
from library.errors import UserError

logger = logging.getLogger(__name__)

OPTIMIZERS = ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "SGDNesterov8bit", "Adafactor", "Prodigy"]
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdxl_train_control_net_lllite.py",
        description="Train a ControlNet-LLLite for SDXL. Options may also come from --config_file train.toml.",
    )
    g = p.add_argument_group("config")
    g.add_argument("--config_file", help="TOML file with options (keys are option names without --)")
    g.add_argument("--output_config", action="store_true", help="write the non-default options to --config_file and exit")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", help="SDXL .safetensors/.ckpt file, diffusers folder or hub id")
    g.add_argument("--vae", help="VAE file or folder that replaces the checkpoint's VAE")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in fp32 (the SDXL VAE overflows in fp16)")
    g.add_argument("--v_parameterization", action="store_true", help="v-prediction training (set for v-pred checkpoints)")
    g.add_argument("--tokenizer_cache_dir", help="accepted for compatibility; tokenizers are bundled and need no cache")
    g.add_argument("--lowram", action="store_true", help="accepted for compatibility; loading already avoids copies")

    g = p.add_argument_group("network (LLLite)")
    g.add_argument("--cond_emb_dim", type=int, default=32, help="conditioning embedding channels C (default 32)")
    g.add_argument("--network_dim", type=int, default=64, help="LLLite rank R (default 64)")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on the mid activations while training")
    g.add_argument("--include_output_blocks", action="store_true",
                   help="also wrap the attention of the U-Net's output (decoder) blocks. Published files skip them; "
                        "kohya's ComfyUI node and sd-webui-controlnet load them. About twice the modules")
    g.add_argument("--network_weights", help="initial LLLite weights, to continue training a file")
    g.add_argument("--network_module", default="networks.control_net_lllite", help="accepted for compatibility")

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset_config", help="dataset TOML (see docs/dataset.md)")
    g.add_argument("--train_data_dir", help="training images (when no --dataset_config)")
    g.add_argument("--conditioning_data_dir", help="conditioning images (when no --dataset_config)")
    g.add_argument("--resolution", help='training area, "1024" or "1024,1024"')
    g.add_argument("--caption_extension", default=None, help="caption file extension (default .txt)")
    g.add_argument("--shuffle_caption", action="store_true", default=None, help="shuffle comma-separated tags")
    g.add_argument("--keep_tokens", type=int, default=None, help="keep the first N tags in place when shuffling")
    g.add_argument("--flip_aug", action="store_true", default=None, help="random horizontal flips (image and conditioning together)")
    g.add_argument("--enable_bucket", action="store_true", default=None, help="aspect-ratio buckets")
    g.add_argument("--min_bucket_reso", type=int, default=None, help="smallest bucket side")
    g.add_argument("--max_bucket_reso", type=int, default=None, help="largest bucket side")
    g.add_argument("--bucket_reso_steps", type=int, default=None, help="bucket sides are multiples of this")
    g.add_argument("--bucket_no_upscale", action="store_true", default=None, help="never upscale an image to fit a bucket")
    g.add_argument("--caption_dropout_rate", type=float, default=None, help="drop the whole caption with this probability")
    g.add_argument("--cache_latents", action="store_true", help="encode every image with the VAE once, before training")
    g.add_argument("--cache_latents_to_disk", action="store_true", help="keep the latent cache on disk beside the images (reused across runs)")
    g.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE call while caching")
    g.add_argument("--cache_text_encoder_outputs", action="store_true", help="encode every caption once, before training")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true", help="keep the text-encoder cache on disk (reused across runs)")
    g.add_argument("--debug_dataset", action="store_true", help="save a few batches as images to check pairing, then exit")
    g.add_argument("--max_data_loader_n_workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep workers alive between epochs")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", default="AdamW", help=f"one of {', '.join(OPTIMIZERS)} (case-insensitive)")
    g.add_argument("--optimizer_args", nargs="*", default=[], help='extra optimizer arguments, e.g. "weight_decay=0.01"')
    g.add_argument("--learning_rate", type=float, default=2e-4, help="learning rate")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    g.add_argument("--lr_scheduler", default="constant", help=f"one of {', '.join(LR_SCHEDULERS)}")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps of the schedule")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="restarts for cosine_with_restarts")
    g.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power for polynomial")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="output", help="where LLLite files, states and samples go")
    g.add_argument("--output_name", default="lllite", help="file name stem of the saved LLLite files")
    g.add_argument("--save_model_as", default="safetensors", choices=["safetensors", "ckpt", "pt"], help="file format of saved LLLite files")
    g.add_argument("--save_precision", default=None, choices=["float", "fp32", "fp16", "bf16"], help="dtype of saved files (default: as trained, fp32)")
    g.add_argument("--save_every_n_epochs", type=int, default=None, help="save an LLLite file every N epochs")
    g.add_argument("--save_every_n_steps", type=int, default=None, help="save an LLLite file every N steps")
    g.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch files")
    g.add_argument("--save_state", action="store_true", help="also save optimizer/scheduler/RNG state to resume from")
    g.add_argument("--resume", help="a state folder written with --save_state")
    g.add_argument("--train_batch_size", type=int, default=None, help="batch size (when the dataset TOML gives none)")
    g.add_argument("--max_train_steps", type=int, default=1600, help="optimizer steps to train")
    g.add_argument("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    g.add_argument("--seed", type=int, default=None, help="seed for data order, noise and initial weights")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute U-Net activations in the backward pass (much less memory)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="compute precision of the frozen U-Net")
    g.add_argument("--full_fp16", action="store_true", help="LLLite weights in fp16 too (no loss scaling)")
    g.add_argument("--full_bf16", action="store_true", help="LLLite weights in bf16 too")
    g.add_argument("--xformers", action="store_true", help="xformers attention (GPU, when installed)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--mem_eff_attn", action="store_true", help="accepted for compatibility; SDPA is used")
    g.add_argument("--torch_compile", action="store_true", help="compile the U-Net with torch.compile")
    g.add_argument("--logging_dir", default=None, help="folder for tensorboard/wandb logs")
    g.add_argument("--log_with", default=None, choices=["tensorboard", "wandb", "all"], help="experiment tracker")
    g.add_argument("--log_prefix", default=None, help="run name prefix in the tracker")

    g = p.add_argument_group("noise and loss")
    g.add_argument("--noise_offset", type=float, default=None, help="per-channel noise offset (e.g. 0.0357)")
    g.add_argument("--zero_terminal_snr", action="store_true", help="rescale the schedule to zero terminal SNR (v-pred models)")
    g.add_argument("--min_timestep", type=int, default=None, help="lowest training timestep (default 0)")
    g.add_argument("--max_timestep", type=int, default=None, help="highest training timestep, exclusive (default 1000)")
    g.add_argument("--min_snr_gamma", type=float, default=None, help="min-SNR-gamma loss weighting (e.g. 5)")
    g.add_argument("--debiased_estimation_loss", action="store_true", help="weight the loss by 1/sqrt(SNR)")
    g.add_argument("--loss_type", default="l2", choices=["l2", "huber", "smooth_l1"], help="loss function")
    g.add_argument("--huber_c", type=float, default=0.1, help="huber/smooth_l1 threshold")

    g = p.add_argument_group("samples during training")
    g.add_argument("--sample_prompts", help="prompt file (.txt/.toml/.json); lines take --cn guide.png")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="draw the sample prompts every N steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None, help="draw the sample prompts every N epochs")
    g.add_argument("--sample_at_first", action="store_true", help="draw the sample prompts before the first step")
    g.add_argument("--sample_sampler", default="euler_a", help="sampler for samples (names as in sdxl_gen_img.py)")
    return p


def _flatten(data: dict, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """{key: (value, section)} with tables flattened one or more levels deep."""
    out: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}[{key}]"))
        else:
            out[key] = (value, prefix or "top level")
    return out


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """Check and convert a config-file value to what the option takes."""
    name = action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        return [_coerce_scalar(action, v, where) for v in items]
    if isinstance(value, list) and name == "resolution":
        return ",".join(str(v) for v in value)
    return _coerce_scalar(action, value, where)


def _coerce_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    name = action.dest
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {name} must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {name} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(value, (dict, list)):
        raise UserError(f"{where}: {name} must be a single value, got {value!r}")
    elif not isinstance(value, str):
        value = str(value)
    if action.choices and value not in action.choices:
        raise UserError(f"{where}: {name} = {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Validated option values from a training TOML."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {file} (given with --config_file)")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {file} is not valid TOML: {e}") from None
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config_file", "output_config")}
    values = {}
    for key, (value, section) in _flatten(data).items():
        where = f"{file} {section}"
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
            hint = f' Did you mean "{close[0]}"?' if close else " See docs/training.md for the option list."
            raise UserError(f'{where}: unknown option "{key}".{hint}')
        values[key] = _coerce(actions[key], value, where)
    return values


def parse_training_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line + ``--config_file`` + defaults, validated."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    if first.config_file and not first.output_config:
        parser.set_defaults(**load_config_file(first.config_file, parser))
    args = parser.parse_args(argv)
    if args.output_config:
        write_config(args, parser)
        raise SystemExit(0)
    validate_args(args)
    return args


def write_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Write the options that differ from the defaults to ``--config_file``."""
    if not args.config_file:
        raise UserError("--output_config needs --config_file PATH: the file to write")
    defaults = build_parser().parse_args([])
    values = {
        k: v
        for k, v in vars(args).items()
        if k not in ("config_file", "output_config") and v != getattr(defaults, k, None) and v is not None
    }
    atomic_write_text(args.config_file, toml.dumps(values))
    logger.info("wrote %d options to %s", len(values), args.config_file)


def validate_args(args: argparse.Namespace) -> None:
    """Cross-option checks, so mistakes show before any model is loaded."""
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (an SDXL .safetensors file, diffusers folder or hub id)")
    if args.optimizer_type.lower() not in {o.lower() for o in OPTIMIZERS}:
        close = difflib.get_close_matches(args.optimizer_type, OPTIMIZERS, n=1, cutoff=0.3)
        raise UserError(
            f"unknown --optimizer_type {args.optimizer_type!r}"
            + (f'; did you mean "{close[0]}"?' if close else f"; choose one of {', '.join(OPTIMIZERS)}")
        )
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise UserError(f"unknown --lr_scheduler {args.lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision bf16")
    if args.full_fp16 and args.mixed_precision != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision fp16")
    if args.v_parameterization is False and args.zero_terminal_snr:
        logger.warning("--zero_terminal_snr is meant for v-prediction; with epsilon prediction it rarely helps")
    if args.cache_latents_to_disk:
        args.cache_latents = True
    if args.cache_text_encoder_outputs_to_disk:
        args.cache_text_encoder_outputs = True
    if args.gradient_accumulation_steps < 1:
        raise UserError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    if args.min_timestep is not None and args.max_timestep is not None and args.min_timestep >= args.max_timestep:
        raise UserError(f"--min_timestep ({args.min_timestep}) must be below --max_timestep ({args.max_timestep})")
    if args.resume and not Path(args.resume).is_dir():
        raise UserError(f"--resume {args.resume}: no such state folder (it is written by --save_state)")
