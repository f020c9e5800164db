"""Gradual Latent: sample small first and let the latents grow during the ancestral Euler steps.

The settings and their meaning are in :class:`library.generation.requests.GradualLatent`. One
:class:`GradualLatentRun` follows one sampling pass: it shrinks the starting latents, says before
each step whether the latents grow at that step, and does that step. A growing step is the
ancestral Euler step written out (``x + d * (sigma_down - sigma)`` plus noise ``* sigma_up``): the
latents (or, with ``target_x`` off, the input and the derivative separately) are resized in the
middle of it, and the noise is drawn at the new size and scaled by ``s_noise``. diffusers draws
that noise inside ``scheduler.step`` at the old size, so the scheduler's step is still run (it
advances the scheduler and gives the predicted clean latents) and its result replaced.
"""

from __future__ import annotations

import logging

import torch

from library.generation.deep_shrink import resize
from library.generation.requests import GradualLatent
from library.generation.upscalers import unsharp_mask

logger = logging.getLogger(__name__)


class GradualLatentRun:
    """Gradual Latent over one pass whose final latents are ``full_size`` (h, w)."""

    def __init__(self, settings: GradualLatent, full_size: tuple[int, int]):
        self.settings = settings
        self.full_size = tuple(full_size)
        self.ratio = settings.ratio
        self.since_growth = settings.every_n_steps  # the first chance to grow comes at once

    def _size(self) -> tuple[int, int]:
        if self.ratio >= 1.0:
            return self.full_size
        return tuple(max(1, int(s * self.ratio)) for s in self.full_size)

    def _resize(self, x: torch.Tensor, size: tuple[int, int], sharpen: bool) -> torch.Tensor:
        x = resize(x, size)
        u = self.settings.unsharp
        return unsharp_mask(x, u.strength, u.sigma, u.ksize) if sharpen and u is not None else x

    def start(self, latents: torch.Tensor) -> torch.Tensor:
        """The starting latents shrunk to the start ratio (and unsharp-masked)."""
        return self._resize(latents, self._size(), True)

    def growth_before_step(self, timestep: float) -> tuple[int, int] | None:
        """The size the latents grow to in this step, or None; call once per step."""
        s = self.settings
        grow = timestep < s.timesteps and self.ratio < 1.0 and self.since_growth >= s.every_n_steps
        if grow:
            self.ratio = min(self.ratio + s.ratio_step, 1.0)
            self.since_growth = 0
        self.since_growth += 1
        return self._size() if grow else None

    def step(self, scheduler, eps: torch.Tensor, t, latents: torch.Tensor, size: tuple[int, int] | None,
             generators: list[torch.Generator]) -> torch.Tensor:
        """One scheduler step; when ``size`` is given, the ancestral step that grows the latents to it."""
        out = scheduler.step(eps, t, latents, generator=generators)
        if size is None:
            return out.prev_sample
        i = scheduler.step_index  # already advanced by step()
        sigma, sigma_next = float(scheduler.sigmas[i - 1]), float(scheduler.sigmas[i])
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (latents - out.pred_original_sample) / sigma
        dt = sigma_down - sigma
        u = self.settings.unsharp
        if u is None or u.target_x:
            prev = self._resize(latents + derivative * dt, size, True)
        else:
            prev = self._resize(latents, size, True) + self._resize(derivative, size, False) * dt
        noise = torch.stack([torch.randn((latents.shape[1], *size), generator=g) for g in generators])
        return prev + noise.to(prev.device, prev.dtype) * sigma_up * self.settings.s_noise

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The last latents at the full size; when the growth did not get there, resized with a warning."""
        if tuple(latents.shape[-2:]) == self.full_size:
            return latents
        s = self.settings
        logger.warning(
            "Gradual Latent reached ratio %g by the last step (start %g, +%g every %d steps below timestep %d): "
            "the last latents were resized to the full size. Use more steps, a larger ratio step (--gls) "
            "or a higher start timestep (--glt)", self.ratio, s.ratio, s.ratio_step, s.every_n_steps, s.timesteps)
        return resize(latents, self.full_size)
