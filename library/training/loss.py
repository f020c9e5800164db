"""The diffusion training objective: noise, timesteps, targets and loss weighting.

Short pure functions in the style of k-diffusion; the noise schedule itself is diffusers'
``DDPMScheduler`` built from the model's scheduler config.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.cli import Limit, Needs, Options, flag, option, option_label, switched_off
from library.errors import UserError
from library.training.models import ModelOptions

logger = logging.getLogger(__name__)

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
_V_PARAMETERIZATION = option_label(ModelOptions, "v_parameterization")


@dataclass(frozen=True)
class LossOptions(Options):
    group = "noise and loss"

    noise_offset: float | None = option(
        type=float, limit=Limit(0),
        help="offset noise: adds noise_offset * N(0,1) per image and channel, constant over the image, so the "
             "model can learn very dark and very bright images (e.g. 0.0357; >= 0, 0 or unset is off)")
    noise_offset_random_strength: bool = flag(
        needs=Needs("noise_offset"),
        help="draw the offset strength uniformly from 0..noise_offset at each step (one value per batch, "
             "as in sd-scripts); needs --noise_offset")
    adaptive_noise_scale: float | None = option(
        type=float,
        needs=Needs("noise_offset", "adds to the noise offset: it needs --noise_offset (e.g. 0.0357), as in sd-scripts",
                    error=True, off=lambda v: v is None),
        help="adds adaptive_noise_scale * |mean of each latent channel| to the offset strength, per image and "
             "channel (clamped at 0, so negative values can only lower it); needs --noise_offset, as in sd-scripts")
    multires_noise_iterations: int | None = option(
        type=int, limit=Limit(0), what="0 or unset is off",
        help="multi-resolution (pyramid) noise: adds this many levels of upsampled coarser noise, each level "
             "1/2..1/4 the size of the previous one and weighted by multires_noise_discount^level, then "
             "rescales the sum to unit standard deviation (6-10 is typical; >= 0, 0 or unset is off). "
             "Applied after the noise offset, as in sd-scripts")
    multires_noise_discount: float = option(
        0.3, type=float, limit=Limit(0, 1),
        help="weight factor per coarser level of multires noise, 0..1 (used only with --multires_noise_iterations)")
    ip_noise_gamma: float | None = option(
        type=float, limit=Limit(0), what="0 or unset is off",
        help="input perturbation (arxiv.org/abs/2301.11706): the U-Net input is noised with "
             "noise + ip_noise_gamma * N(0,1) while the target keeps the unperturbed noise (~0.1; >= 0)")
    ip_noise_gamma_random_strength: bool = flag(
        needs=Needs("ip_noise_gamma"),
        help="draw the perturbation strength uniformly from 0..ip_noise_gamma at each step (one value per "
             "batch); needs --ip_noise_gamma")
    zero_terminal_snr: bool = flag(help="rescale the schedule to zero terminal SNR (v-pred models)")
    min_timestep: int | None = option(type=int, limit=Limit(0, 999), help="lowest training timestep, 0..999 (default 0)")
    max_timestep: int | None = option(type=int, limit=Limit(1, 1000),
                                      help="highest training timestep, exclusive, 1..1000 (default 1000)")
    min_snr_gamma: float | None = option(
        type=float, limit=Limit(0, low_open=True),
        help="min-SNR-gamma loss weighting: min(SNR, gamma)/SNR, or min(SNR, gamma)/(SNR+1) with "
             "v-prediction (> 0, e.g. 5)")
    debiased_estimation: bool = flag(
        name="debiased_estimation_loss",
        help="weight the loss by 1/sqrt(SNR), or 1/(SNR+1) with v-prediction, SNR capped at 1000 (as in sd-scripts)")
    scale_v_pred_loss_like_noise_pred: bool = flag(
        help="v-prediction only: multiply the loss by SNR/(SNR+1) (SNR capped at 1000), which gives it the "
             "per-timestep scale of a noise-prediction loss")
    v_pred_like_loss: float | None = option(
        type=float, limit=Limit(0), what="0 or unset is off",
        help="noise prediction only: add v_pred_like_loss * loss * (SNR+1)/SNR (SNR capped at 1000), a "
             "v-prediction-like term that weights high-noise timesteps more (>= 0, 0 or unset is off; "
             "cannot be combined with --zero_terminal_snr, where SNR reaches 0)")
    loss_type: str = option(
        "l2", one_of=LOSS_TYPES,
        help="loss function: l2 (squared error), l1, huber (2c(sqrt(d^2+c^2)-c)) or smooth_l1 "
             "(2(sqrt(d^2+c^2)-c)), with d = prediction - target and c the per-timestep threshold of "
             "--huber_schedule (sd-scripts' definitions)")
    huber_schedule: str = option(
        "snr", one_of=HUBER_SCHEDULES,
        help="threshold c of the huber/smooth_l1 loss per timestep t: snr = (1-huber_c)/(1+sigma_t)^2 + "
             "huber_c with sigma_t = sqrt((1-alphabar_t)/alphabar_t) (huber_scale is not used, as in "
             "sd-scripts); exponential = huber_scale * huber_c^(t/1000); constant = huber_scale * huber_c. "
             "One of snr, exponential, constant; the default snr is sd-scripts' default")
    huber_c: float = option(0.1, type=float, limit=Limit(0, low_open=True),
                            help="huber/smooth_l1 threshold parameter (> 0), see --huber_schedule")
    huber_scale: float = option(
        1.0, type=float, limit=Limit(0, low_open=True),
        help="scale of the huber/smooth_l1 threshold for the exponential and constant schedules (> 0)")
    # Declared with the model options (v_parameterization); a v-prediction checkpoint turns it on after loading.
    v_parameterization: bool = False

    def __post_init__(self) -> None:
        # Here rather than in settle: a v-prediction checkpoint turns v_parameterization on after loading.
        if self.v_pred_like_loss and self.v_parameterization:
            raise UserError(f"--v_pred_like_loss {self.v_pred_like_loss} adds a v-prediction-like term to a "
                            f"noise-prediction loss; it cannot apply to v-prediction training ({_V_PARAMETERIZATION} or "
                            "a v-prediction checkpoint). Drop --v_pred_like_loss")
        if self.scale_v_pred_loss_like_noise_pred and not self.v_parameterization:
            raise UserError(f"--scale_v_pred_loss_like_noise_pred applies to v-prediction only: add {_V_PARAMETERIZATION} "
                            "(for a v-prediction checkpoint) or drop it")

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        """The rules between options; each option's own range was checked from its declaration."""
        if v["min_timestep"] is not None and v["max_timestep"] is not None and v["min_timestep"] >= v["max_timestep"]:
            raise UserError(f"--min_timestep {v['min_timestep']} must be below --max_timestep {v['max_timestep']}")
        if v["v_pred_like_loss"] and v["zero_terminal_snr"]:
            raise UserError(f"--v_pred_like_loss {v['v_pred_like_loss']} divides by the SNR, which --zero_terminal_snr "
                            "makes 0 at the last timestep (the loss would be infinite): use one of the two")
        if v["huber_scale"] != 1.0 and (v["loss_type"] not in ("huber", "smooth_l1") or v["huber_schedule"] == "snr"):
            switched_off(f"--huber_scale {v['huber_scale']:g}", "--loss_type huber/smooth_l1 with --huber_schedule "
                         "exponential or constant", "it scales their threshold")
        v_parameterization = bool(args.v_parameterization)
        if v["zero_terminal_snr"] and not v_parameterization:
            logger.warning("--zero_terminal_snr is meant for v-prediction; with epsilon prediction it rarely helps")
        return {**v, "v_parameterization": v_parameterization}


OPTIONS = (LossOptions,)


@dataclass(frozen=True)
class TrainingSchedule:
    """What the run trains and draws with: the options' prediction type and SNR rescaling, or the checkpoint's.

    Derived once after loading, beside the options, which stay as the user gave them.
    """

    v_prediction: bool = False
    zero_terminal_snr: bool = False

    def loss_options(self, opts: LossOptions) -> LossOptions:
        """The loss options the run trains with (checked again: a v-prediction checkpoint is v-prediction training)."""
        return replace(opts, v_parameterization=self.v_prediction, zero_terminal_snr=self.zero_terminal_snr)

    def scheduler_config(self, base: dict) -> dict:
        """``base`` (the checkpoint's scheduler config) saying this schedule, so samples are drawn as the run trains."""
        return {**base, "prediction_type": "v_prediction" if self.v_prediction else "epsilon",
                "rescale_betas_zero_snr": self.zero_terminal_snr}


def checkpoint_schedule(opts: LossOptions, models) -> TrainingSchedule:
    """The schedule a checkpoint's own markers call for: a file with a ``v_pred`` key is trained with v-prediction
    and one with ``ztsnr`` with zero terminal SNR, even without the options (a warning says so)."""
    turned_on = []
    if models.v_prediction and not opts.v_parameterization:
        turned_on.append(_V_PARAMETERIZATION)
    if models.zero_terminal_snr and not opts.zero_terminal_snr:
        turned_on.append("--zero_terminal_snr")
    if turned_on:
        logger.warning("the checkpoint %s carries the markers of %s, which were not given: training with them",
                       models.name, " and ".join(turned_on))
    return TrainingSchedule(v_prediction=opts.v_parameterization or models.v_prediction,
                            zero_terminal_snr=opts.zero_terminal_snr or models.zero_terminal_snr)


def training_noise_scheduler(scheduler_config: dict, v_prediction: bool, zero_terminal_snr: bool) -> DDPMScheduler:
    """SDXL's training schedule (1000 steps, scaled_linear), optionally with zero terminal SNR."""
    keep = {k: scheduler_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule") if k in scheduler_config}
    return DDPMScheduler(
        **keep,
        prediction_type="v_prediction" if v_prediction else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
        clip_sample=False,
    )


def sample_noise(latents: torch.Tensor, opts: LossOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise the model learns to predict: Gaussian, then offset noise, then multires noise (sd-scripts' order).

    Drawn from ``generator`` (on the CPU) for reproducibility, combined on the latents' device.
    """
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if opts.noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(latents.device)
        noise = noise + offset_strength(latents, opts, generator) * offset
    if opts.multires_noise_iterations:
        noise = multires_noise(noise, opts.multires_noise_iterations, opts.multires_noise_discount, generator)
    return noise.to(dtype=latents.dtype)


def offset_strength(latents: torch.Tensor, opts: LossOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """Strength of the per-channel offset noise: a scalar, or (B, C, 1, 1) with --adaptive_noise_scale."""
    strength = torch.tensor(float(opts.noise_offset), device=latents.device)
    if opts.noise_offset_random_strength:
        strength = strength * torch.rand((), generator=generator).to(latents.device)
    if opts.adaptive_noise_scale is not None:
        # Images whose channels are far from zero on average get more offset (never less than 0).
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = (strength + opts.adaptive_noise_scale * channel_mean).clamp(min=0)
    return strength


def multires_noise(noise: torch.Tensor, iterations: int, discount: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Pyramid noise: ``noise`` plus upsampled coarser Gaussian levels weighted by ``discount**level``, at unit std.

    Written here because torch and diffusers have no pyramid noise. As in sd-scripts, level ``i`` is
    ``1/r**i`` of the full size with ``r`` drawn from [2, 4) at each level, it stops once a side reaches
    1, and the sum is divided by its standard deviation over the whole batch. ``r`` comes from
    ``generator`` instead of Python's global random, so a seeded run repeats.
    """
    b, c, h, w = noise.shape
    out = noise
    for level in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        hn, wn = max(1, int(h / r**level)), max(1, int(w / r**level))
        coarse = torch.randn((b, c, hn, wn), generator=generator).to(noise.device, noise.dtype)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**level
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def noisy_latents(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  opts: LossOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """The U-Net input: ``latents`` noised to ``timesteps``.

    With --ip_noise_gamma the noise put into the input is perturbed by ``gamma * N(0, 1)``; the
    target stays ``noise`` (input perturbation, arxiv.org/abs/2301.11706).
    """
    if opts.ip_noise_gamma:
        strength = opts.ip_noise_gamma
        if opts.ip_noise_gamma_random_strength:
            strength = strength * torch.rand((), generator=generator).item()
        noise = noise + strength * torch.randn(latents.shape, generator=generator).to(noise)
    return scheduler.add_noise(latents, noise, timesteps)


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


def capped_snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR capped at 1000 (timestep 0's SNR is about 1175 for SDXL), as sd-scripts uses it for the weights below."""
    return snr(scheduler, timesteps).clamp(max=1000)


# Per-sample loss weights, one signature: (scheduler, timesteps, opts) -> weights of shape (B,), or None when off.


def min_snr_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, opts: LossOptions) -> torch.Tensor | None:
    if not opts.min_snr_gamma:
        return None
    s = snr(scheduler, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, opts.min_snr_gamma))
    return clipped / (s + 1) if opts.v_parameterization else clipped / s.clamp(min=1e-8)


def v_pred_noise_scale_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, opts: LossOptions) -> torch.Tensor | None:
    """--scale_v_pred_loss_like_noise_pred: SNR/(SNR+1)."""
    if not opts.scale_v_pred_loss_like_noise_pred:
        return None
    s = capped_snr(scheduler, timesteps)
    return s / (s + 1)


def v_pred_like_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, opts: LossOptions) -> torch.Tensor | None:
    """--v_pred_like_loss v: the loss plus v * loss * (SNR+1)/SNR, as the factor 1 + v * (SNR+1)/SNR."""
    if not opts.v_pred_like_loss:
        return None
    s = capped_snr(scheduler, timesteps)
    return 1 + opts.v_pred_like_loss * (s + 1) / s


def debiased_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, opts: LossOptions) -> torch.Tensor | None:
    """--debiased_estimation_loss: 1/sqrt(SNR), or 1/(SNR+1) with v-prediction."""
    if not opts.debiased_estimation:
        return None
    s = capped_snr(scheduler, timesteps)
    return 1 / (s + 1) if opts.v_parameterization else 1 / s.clamp(min=1e-8).sqrt()


LOSS_WEIGHTS = (min_snr_weight, v_pred_noise_scale_weight, v_pred_like_weight, debiased_weight)


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, opts: LossOptions) -> torch.Tensor | None:
    """The product of the active per-sample weights, or None when none is active.

    sd-scripts applies them one after another to the per-sample loss; each (the added
    v-prediction-like term included) multiplies it, so the product is the same.
    """
    w = None
    for weight in LOSS_WEIGHTS:
        factor = weight(scheduler, timesteps, opts)
        if factor is not None:
            w = factor if w is None else w * factor
    return w


def huber_threshold(scheduler: DDPMScheduler, timesteps: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """The huber/smooth_l1 threshold c per sample, by --huber_schedule (sd-scripts' definitions)."""
    if opts.huber_schedule == "snr":
        ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = ((1 - ac) / ac).sqrt()
        return (1 - opts.huber_c) / (1 + sigma) ** 2 + opts.huber_c
    if opts.huber_schedule == "exponential":
        # huber_scale at t=0, falling to huber_scale * huber_c at t=num_train_timesteps.
        rate = math.log(opts.huber_c) / scheduler.config.num_train_timesteps
        return opts.huber_scale * torch.exp(rate * timesteps.float())
    return torch.full(timesteps.shape, opts.huber_c * opts.huber_scale, device=timesteps.device)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, opts: LossOptions,
                    huber_c: torch.Tensor | None = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss per sample; ``huber_c`` is the per-sample threshold (default: huber_c * huber_scale).

    ``mask`` (``alpha_mask``): weights [B,1,h,w] in [0, 1] that multiply the loss of each latent pixel
    before the mean over all pixels, as sd-scripts does (a half-masked image weighs half).
    """
    pred, target = pred.float(), target.float()
    if opts.loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif opts.loss_type == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif opts.loss_type in ("huber", "smooth_l1"):
        # sd-scripts' pseudo-Huber forms, with a threshold per sample: torch's piecewise huber/smooth_l1 losses
        # are other functions and take one float threshold.
        c = torch.as_tensor(opts.huber_c * opts.huber_scale if huber_c is None else huber_c, device=pred.device)
        c = c.float().reshape(-1, *([1] * (pred.ndim - 1)))
        loss = 2 * (torch.sqrt((pred - target) ** 2 + c * c) - c)
        if opts.loss_type == "huber":
            loss = c * loss  # sd-scripts' smooth_l1 is its huber divided by c
    else:
        raise ValueError(f"unknown loss_type {opts.loss_type}")
    if mask is not None:
        loss = loss * mask.to(loss.device, loss.dtype)
    return loss.mean(dim=list(range(1, loss.ndim)))


def diffusion_loss(scheduler: DDPMScheduler, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, opts: LossOptions, mask: torch.Tensor | None = None) -> torch.Tensor:
    huber_c = huber_threshold(scheduler, timesteps, opts) if opts.loss_type in ("huber", "smooth_l1") else None
    loss = per_sample_loss(pred, target_for(scheduler, latents, noise, timesteps, opts.v_parameterization), opts, huber_c,
                           mask=mask)
    w = loss_weights(scheduler, timesteps, opts)
    if w is not None:
        loss = loss * w
    return loss.mean()
