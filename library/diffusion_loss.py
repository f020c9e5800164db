"""The diffusion training objective: noise, timesteps, targets and loss weighting.

Short pure functions in the style of k-diffusion; the noise schedule itself is diffusers'
``DDPMScheduler`` built from the model's scheduler config.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.cli import check_range
from library.errors import UserError

logger = logging.getLogger(__name__)

LOSS_TYPES = ("l2", "huber", "smooth_l1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("noise and loss")
    g.add_argument("--noise_offset", type=float, default=None, help="per-channel noise offset (e.g. 0.0357)")
    g.add_argument("--zero_terminal_snr", action="store_true", help="rescale the schedule to zero terminal SNR (v-pred models)")
    g.add_argument("--min_timestep", type=int, default=None, help="lowest training timestep, 0..999 (default 0)")
    g.add_argument("--max_timestep", type=int, default=None, help="highest training timestep, exclusive, 1..1000 (default 1000)")
    g.add_argument("--min_snr_gamma", type=float, default=None, help="min-SNR-gamma loss weighting (e.g. 5)")
    g.add_argument("--debiased_estimation_loss", action="store_true", help="weight the loss by 1/sqrt(SNR)")
    g.add_argument("--loss_type", default="l2", choices=LOSS_TYPES, help="loss function")
    g.add_argument("--huber_c", type=float, default=0.1, help="huber/smooth_l1 threshold")


@dataclass(frozen=True)
class LossOptions:
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    noise_offset: float | None = None
    min_timestep: int | None = None
    max_timestep: int | None = None
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    loss_type: str = "l2"
    huber_c: float = 0.1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LossOptions":
        check_range("noise_offset", args.noise_offset, low=0)
        check_range("min_timestep", args.min_timestep, low=0, high=999)
        check_range("max_timestep", args.max_timestep, low=1, high=1000)
        if args.min_timestep is not None and args.max_timestep is not None and args.min_timestep >= args.max_timestep:
            raise UserError(f"--min_timestep {args.min_timestep} must be below --max_timestep {args.max_timestep}")
        check_range("min_snr_gamma", args.min_snr_gamma, low=0, low_open=True)
        check_range("huber_c", args.huber_c, low=0, low_open=True)
        if args.zero_terminal_snr and not args.v_parameterization:
            logger.warning("--zero_terminal_snr is meant for v-prediction; with epsilon prediction it rarely helps")
        return cls(v_parameterization=args.v_parameterization, zero_terminal_snr=args.zero_terminal_snr,
                   noise_offset=args.noise_offset, min_timestep=args.min_timestep, max_timestep=args.max_timestep,
                   min_snr_gamma=args.min_snr_gamma, debiased_estimation=args.debiased_estimation_loss,
                   loss_type=args.loss_type, huber_c=args.huber_c)


def training_noise_scheduler(scheduler_config: dict, v_prediction: bool, zero_terminal_snr: bool) -> DDPMScheduler:
    """SDXL's training schedule (1000 steps, scaled_linear), optionally with zero terminal SNR."""
    keep = {k: scheduler_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule") if k in scheduler_config}
    return DDPMScheduler(
        **keep,
        prediction_type="v_prediction" if v_prediction else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
        clip_sample=False,
    )


def sample_noise(latents: torch.Tensor, noise_offset: float | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise like ``latents``, drawn on the generator's device (the CPU) for reproducibility."""
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        # A per-channel constant lets the model learn very dark and very bright images.
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_timesteps(batch: int, num_train_timesteps: int, opts: LossOptions,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    low = opts.min_timestep or 0
    high = opts.max_timestep or num_train_timesteps
    return torch.randint(low, high, (batch,), generator=generator).long()


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1 - ac).clamp(min=1e-8)


def target_for(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               v_parameterization: bool) -> torch.Tensor:
    return scheduler.get_velocity(latents, noise, timesteps) if v_parameterization else noise


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, opts: LossOptions) -> torch.Tensor | None:
    """Per-sample weights for min-SNR-gamma and debiased estimation, or None."""
    if not opts.min_snr_gamma and not opts.debiased_estimation:
        return None
    s = snr(scheduler, timesteps)
    w = torch.ones_like(s)
    if opts.min_snr_gamma:
        clipped = torch.minimum(s, torch.full_like(s, opts.min_snr_gamma))
        w = w * (clipped / (s + 1) if opts.v_parameterization else clipped / s.clamp(min=1e-8))
    if opts.debiased_estimation:
        denom = (s + 1) if opts.v_parameterization else s
        w = w * torch.clamp(1 / denom.clamp(min=1e-8).sqrt(), max=1000)
    return w


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if opts.loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif opts.loss_type == "huber":
        c = opts.huber_c
        loss = 2 * c * (torch.sqrt((pred - target) ** 2 + c * c) - c)
    elif opts.loss_type == "smooth_l1":
        loss = F.smooth_l1_loss(pred, target, reduction="none", beta=opts.huber_c)
    else:
        raise ValueError(f"unknown loss_type {opts.loss_type}")
    return loss.mean(dim=list(range(1, loss.ndim)))


def diffusion_loss(scheduler: DDPMScheduler, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    loss = per_sample_loss(pred, target_for(scheduler, latents, noise, timesteps, opts.v_parameterization), opts)
    w = loss_weights(scheduler, timesteps, opts)
    if w is not None:
        loss = loss * w
    return loss.mean()
