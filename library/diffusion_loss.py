"""The diffusion training objective: noise, timesteps, targets and loss weighting.

Short pure functions in the style of k-diffusion; the noise schedule itself is diffusers'
``DDPMScheduler`` built from the model's scheduler config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


@dataclass(frozen=True)
class LossOptions:
    v_parameterization: bool = False
    noise_offset: float | None = None
    min_timestep: int | None = None
    max_timestep: int | None = None
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    loss_type: str = "l2"
    huber_c: float = 0.1


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
