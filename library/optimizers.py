"""Optimizers and learning-rate schedules by the names users put in their configs."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from library.cli import check_choice, check_range, parse_key_values
from library.errors import UserError

logger = logging.getLogger(__name__)

OPTIMIZERS = ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "SGDNesterov8bit", "Adafactor", "Prodigy"]
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer_type", default="AdamW", help=f"one of {', '.join(OPTIMIZERS)} (case-insensitive)")
    g.add_argument("--optimizer_args", nargs="*", default=[], help='extra optimizer arguments, e.g. "weight_decay=0.01"')
    g.add_argument("--learning_rate", type=float, default=2e-4, help="learning rate (> 0)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    g.add_argument("--lr_scheduler", default="constant", help=f"one of {', '.join(LR_SCHEDULERS)}")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps of the schedule")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="restarts for cosine_with_restarts")
    g.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power for polynomial")


@dataclass(frozen=True)
class OptimizerOptions:
    name: str = "AdamW"  # canonical spelling, one of OPTIMIZERS
    args: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 2e-4
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OptimizerOptions":
        name = check_choice("optimizer_type", args.optimizer_type, OPTIMIZERS, case_sensitive=False)
        check_range("learning_rate", args.learning_rate, low=0, low_open=True)
        check_range("max_grad_norm", args.max_grad_norm, low=0, what="0 turns clipping off")
        check_choice("lr_scheduler", args.lr_scheduler, LR_SCHEDULERS)
        check_range("lr_warmup_steps", args.lr_warmup_steps, low=0)
        check_range("lr_scheduler_num_cycles", args.lr_scheduler_num_cycles, low=1)
        check_range("lr_scheduler_power", args.lr_scheduler_power, low=0, low_open=True)
        return cls(name=name, args=parse_key_values("optimizer_args", args.optimizer_args),
                   learning_rate=args.learning_rate, max_grad_norm=args.max_grad_norm, lr_scheduler=args.lr_scheduler,
                   lr_warmup_steps=args.lr_warmup_steps, lr_scheduler_num_cycles=args.lr_scheduler_num_cycles,
                   lr_scheduler_power=args.lr_scheduler_power)


def _require(module: str, package: str, optimizer: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise UserError(
            f"--optimizer_type {optimizer} needs the package {package}: run `pip install {package}` "
            "or choose another optimizer (AdamW needs nothing extra)."
        ) from None


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, extra: dict[str, Any]) -> torch.optim.Optimizer:
    """An optimizer for the trainable parameters; ``name`` is case-insensitive."""
    key = name.lower()
    try:
        if key == "adamw":
            # The fused kernel is faster on GPUs; it needs all parameters on one CUDA device in float types.
            fused = all(p.is_cuda for p in params) and "fused" not in extra
            return torch.optim.AdamW(params, lr=lr, **({"fused": True} if fused else {}), **extra)
        if key == "adamw8bit":
            bnb = _require("bitsandbytes", "bitsandbytes", name)
            return bnb.optim.AdamW8bit(params, lr=lr, **extra)
        if key == "lion":
            lion = _require("lion_pytorch", "lion-pytorch", name)
            return lion.Lion(params, lr=lr, **extra)
        if key == "lion8bit":
            bnb = _require("bitsandbytes", "bitsandbytes", name)
            return bnb.optim.Lion8bit(params, lr=lr, **extra)
        if key == "sgdnesterov":
            return torch.optim.SGD(params, lr=lr, nesterov=True, **{"momentum": 0.9, **extra})
        if key == "sgdnesterov8bit":
            bnb = _require("bitsandbytes", "bitsandbytes", name)
            return bnb.optim.SGD8bit(params, lr=lr, nesterov=True, **{"momentum": 0.9, **extra})
        if key == "adafactor":
            from transformers.optimization import Adafactor

            opts = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **extra}
            return Adafactor(params, lr=None if opts["relative_step"] else lr, **opts)
        if key == "prodigy":
            prodigy = _require("prodigyopt", "prodigyopt", name)
            if lr < 0.1:
                logger.warning("Prodigy expects learning_rate around 1.0 (it adapts the step size); got %g", lr)
            return prodigy.Prodigy(params, lr=lr, **extra)
    except TypeError as e:
        raise UserError(f"--optimizer_args do not fit {name}: {e}") from None
    raise UserError(f"unknown --optimizer_type {name!r}")


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       num_cycles: int = 1, power: float = 1.0):
    """diffusers' schedules by name (constant, cosine, ...)."""
    from diffusers.optimization import get_scheduler

    kwargs: dict[str, Any] = {"num_warmup_steps": warmup_steps, "num_training_steps": total_steps}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    if name == "constant":
        kwargs = {}
    return get_scheduler(name, optimizer, **kwargs)
