"""Precision and multi-process training: the options that shape accelerate's ``Accelerator``.

Data-parallel training runs with ``accelerate launch --multi_gpu`` (or several machines, see
docs/training.md); DeepSpeed runs through accelerate's DeepSpeed plugin. Only the LLLite network is
prepared by accelerate, so DDP and DeepSpeed hold and synchronise the LLLite weights alone.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from library.cli import Limit, Needs, Options, flag, option, option_label, switched_off
from library.errors import UserError

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class PrecisionOptions(Options):
    group = "precision"

    mixed_precision: str = option("no", choices=MIXED_PRECISION, help="compute precision of the frozen U-Net")
    full_fp16: bool = flag(help="LLLite weights in fp16 too (no loss scaling)")
    full_bf16: bool = flag(help="LLLite weights in bf16 too")

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        for full, precision in (("full_bf16", "bf16"), ("full_fp16", "fp16")):
            if v[full] and v["mixed_precision"] != precision:
                raise UserError(f"--{full} needs --mixed_precision {precision}, got --mixed_precision {v['mixed_precision']}")
        return v

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the frozen models: half when mixed precision is on."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision, torch.float32)


_DEEPSPEED = Needs("deepspeed", "it is a DeepSpeed option", with_value=False)


@dataclass(frozen=True)
class DeepSpeedOptions(Options):
    group = "DeepSpeed (pip install deepspeed)"

    zero_stage: int = option(2, type=int, choices=(0, 1, 2, 3), needs=_DEEPSPEED,
                             help="ZeRO stage 0, 1 or 2 (default 2); stage 3 is refused: it cannot train an LLLite")
    offload_optimizer_device: str | None = option(choices=OFFLOAD_DEVICES, needs=_DEEPSPEED,
                                                  help="offload optimizer states to cpu or nvme (ZeRO 2 and 3)")
    offload_optimizer_nvme_path: str | None = option(needs=_DEEPSPEED, help="NVMe folder for optimizer offload (ZeRO 3)")
    offload_param_device: str | None = option(choices=OFFLOAD_DEVICES, needs=_DEEPSPEED,
                                              help="offload parameters to cpu or nvme (ZeRO 3)")
    offload_param_nvme_path: str | None = option(needs=_DEEPSPEED, help="NVMe folder for parameter offload (ZeRO 3)")
    zero3_init_flag: bool = flag(needs=_DEEPSPEED, help="build models under deepspeed.zero.Init (ZeRO 3)")
    zero3_save_16bit_model: bool = flag(needs=_DEEPSPEED, help="gather 16-bit weights when saving (ZeRO 3)")
    fp16_master_weights_and_gradients: bool = flag(
        needs=_DEEPSPEED, help="fp16 master weights and gradients (DeepSpeed ZeRO 2 with CPU optimizer offload only)")


@dataclass(frozen=True)
class DistributedOptions(Options):
    group = "multi-GPU (DDP)"

    ddp_timeout_minutes: int | None = option(
        name="ddp_timeout", type=int, limit=Limit(1), what="minutes",
        help="minutes before a silent process fails the run, >= 1 (default: accelerate's, 30)")
    ddp_gradient_as_bucket_view: bool = flag(help="DDP gradients as views of its buckets (less memory)")
    ddp_static_graph: bool = flag(help="tell DDP the graph is the same every step (faster)")
    use_deepspeed: bool = flag(name="deepspeed", help="train through accelerate's DeepSpeed plugin",
                               group="DeepSpeed (pip install deepspeed)")
    deepspeed: DeepSpeedOptions | None = None

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        ds = DeepSpeedOptions.from_args(args)  # a DeepSpeed option without --deepspeed warns there
        if v["use_deepspeed"]:
            _check_deepspeed(ds)
        return {**v, "deepspeed": ds if v["use_deepspeed"] else None}


OPTIONS = (PrecisionOptions, DistributedOptions, DeepSpeedOptions)


def _check_deepspeed(ds: DeepSpeedOptions) -> None:
    if ds.zero_stage == 3:
        raise UserError("--zero_stage 3 cannot train an LLLite: ZeRO stage 3 shards each parameter and gathers it only "
                        "while its module runs, but the LLLite reads its weights outside those calls (the guide "
                        "embedding is computed once per image), and the frozen U-Net, the bulk of the memory, is not "
                        "sharded by DeepSpeed here anyway. Use --zero_stage 2 (optimizer states and gradients "
                        "sharded, optionally --offload_optimizer_device cpu)")
    for kind in ("optimizer", "param"):
        device, path = getattr(ds, f"offload_{kind}_device"), getattr(ds, f"offload_{kind}_nvme_path")
        if device == "nvme" and not path:
            raise UserError(f"--offload_{kind}_device nvme needs --offload_{kind}_nvme_path (a folder on the NVMe drive)")
        if path and device != "nvme":
            switched_off(f"--offload_{kind}_nvme_path {path}", f"--offload_{kind}_device nvme")
    if ds.offload_param_device not in (None, "none") and ds.zero_stage != 3:
        raise UserError(f"--offload_param_device {ds.offload_param_device} needs --zero_stage 3, got {ds.zero_stage}")
    if ds.offload_optimizer_device not in (None, "none") and ds.zero_stage < 2:
        raise UserError(f"--offload_optimizer_device {ds.offload_optimizer_device} needs --zero_stage 2 or 3, got {ds.zero_stage}")
    for flag in ("zero3_init_flag", "zero3_save_16bit_model"):
        if getattr(ds, flag) and ds.zero_stage != 3:
            switched_off(f"--{flag}", "--zero_stage 3", f"this run has --zero_stage {ds.zero_stage}")


def check_deepspeed_installed(distributed: DistributedOptions) -> None:
    """With --deepspeed, name the missing package before any work starts."""
    if distributed.deepspeed is None:
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("--deepspeed needs the deepspeed package: run `DS_BUILD_OPS=0 pip install deepspeed` "
                        "(Linux with a CUDA GPU), or drop --deepspeed") from None


def deepspeed_plugin(ds: DeepSpeedOptions, precision: PrecisionOptions, *, batch_size: int,
                     gradient_accumulation_steps: int, max_grad_norm: float):
    """accelerate's DeepSpeed plugin for these options."""
    from accelerate import DeepSpeedPlugin

    offload = {k: (v if v != "none" else None) for k, v in
               (("offload_optimizer_device", ds.offload_optimizer_device), ("offload_param_device", ds.offload_param_device))}
    plugin = DeepSpeedPlugin(
        zero_stage=ds.zero_stage, gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_clipping=max_grad_norm or None, offload_optimizer_nvme_path=ds.offload_optimizer_nvme_path,
        offload_param_nvme_path=ds.offload_param_nvme_path, zero3_init_flag=ds.zero3_init_flag,
        zero3_save_16bit_model=ds.zero3_save_16bit_model, **offload,
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    plugin.deepspeed_config["train_batch_size"] = batch_size * gradient_accumulation_steps * world
    plugin.set_mixed_precision(precision.mixed_precision)
    if precision.mixed_precision == "fp16":
        plugin.deepspeed_config["fp16"]["initial_scale_power"] = 0  # start at scale 1: LLLite's first steps overflow otherwise
    if precision.full_fp16 or ds.fp16_master_weights_and_gradients:
        if ds.offload_optimizer_device == "cpu" and ds.zero_stage == 2:
            plugin.deepspeed_config["fp16"]["fp16_master_weights_and_grads"] = True
        else:
            raise UserError("--fp16_master_weights_and_gradients (and --full_fp16 with --deepspeed) works only with "
                            "--zero_stage 2 and --offload_optimizer_device cpu")
    return plugin


def create_accelerator(precision: PrecisionOptions, distributed: DistributedOptions, *, gradient_accumulation_steps: int,
                       log_with: list[str] | None, project_dir: str | None, batch_size: int = 1,
                       max_grad_norm: float = 0.0) -> Accelerator:
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = []
    if distributed.ddp_timeout_minutes:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=distributed.ddp_timeout_minutes)))
    if distributed.ddp_gradient_as_bucket_view or distributed.ddp_static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=distributed.ddp_gradient_as_bucket_view,
                                                      static_graph=distributed.ddp_static_graph))
    plugin = None
    if distributed.deepspeed is not None:
        plugin = deepspeed_plugin(distributed.deepspeed, precision, batch_size=batch_size,
                                  gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm)
    # full_fp16 keeps fp16 weights, which accelerate's loss scaler refuses to unscale: run it without autocast.
    mixed = "no" if precision.full_fp16 and plugin is None else precision.mixed_precision
    try:
        return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed,
                           log_with=log_with, project_dir=project_dir, kwargs_handlers=handlers, deepspeed_plugin=plugin)
    except (ValueError, ImportError) as e:
        from library.training.tracking import TrackingOptions

        raise UserError(f"could not set up training (--mixed_precision {precision.mixed_precision}, "
                        f"{option_label(TrackingOptions, 'log_with')} {','.join(log_with or []) or 'none'}): {e}") from None
