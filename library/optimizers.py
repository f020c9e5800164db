"""Optimizers and learning-rate schedules by the names users put in their configs."""

from __future__ import annotations

import ast
import logging
from typing import Any, Iterable

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)


def parse_optimizer_args(items: Iterable[str]) -> dict[str, Any]:
    """``["weight_decay=0.01", "betas=0.9,0.999"]`` -> ``{"weight_decay": 0.01, "betas": (0.9, 0.999)}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f'--optimizer_args item "{item}" must look like name=value, e.g. "weight_decay=0.01"')
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # plain strings such as "decouple=True" parse above; names stay strings
        if isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


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
