"""The VAE half of generation: encode/decode in batches, in fp32 where fp16 overflows, and in strips.

``--vae_slices N`` (sd-scripts' option) decodes and encodes each image in ``N`` horizontal strips,
so the VAE's activations exist for one strip at a time: its peak memory falls roughly with the
strip's share of the image (figures in docs/benchmarks.md). Each strip is run with
``STRIP_CONTEXT`` latent rows (64 px) of its neighbours above and below, and around every cut the
two strips' outputs are blended linearly over those rows, so no seam shows. The result is not
bit-identical to a whole-image pass: the decoder's GroupNorm sees one strip's statistics, which
moves pixel values slightly (the tolerance is measured in tests/test_gen_features.py and the
benchmark). sd-scripts instead recomputes every layer strip by strip with its GroupNorm on the
CPU; diffusers' ``enable_tiling`` cuts square tiles of a fixed size, so it only starts to work
above 1024 px for SDXL's VAE. Strips were chosen because their count is what the option gives.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

logger = logging.getLogger(__name__)

LATENT_FACTOR = 8
STRIP_CONTEXT = 8  # latent rows of overlap on each side of a cut


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def strip_bounds(latent_rows: int, slices: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` latent rows of each strip's own part; empty strips are left out."""
    cuts = [round(k * latent_rows / slices) for k in range(slices + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _ramp(length: int, rows_per_unit: float, up: bool, device) -> torch.Tensor:
    n = max(1, round(length * rows_per_unit))
    r = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
    return r if up else r.flip(0)


def in_strips(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, slices: int, in_per_latent: int,
              out_per_latent: int, context: int = STRIP_CONTEXT) -> torch.Tensor:
    """``fn(x)`` computed on horizontal strips of ``x`` and blended where they overlap.

    ``fn`` maps rows to rows at a fixed ratio: ``in_per_latent`` input rows and ``out_per_latent``
    output rows per latent row (decoding: 1 and 8; encoding: 8 and 1).
    """
    latent_rows = x.shape[2] // in_per_latent
    bounds = strip_bounds(latent_rows, slices)
    out = weight = None
    for k, (a, b) in enumerate(bounds):
        lo, hi = max(0, a - context), min(latent_rows, b + context)
        y = fn(x[:, :, lo * in_per_latent: hi * in_per_latent]).float()
        if out is None:
            out = torch.zeros(*y.shape[:2], latent_rows * out_per_latent, y.shape[3], device=y.device)
            weight = torch.zeros(latent_rows * out_per_latent, device=y.device)
        w = torch.ones(y.shape[2], device=y.device)
        if k > 0:  # fade in over the rows above this strip's own part
            n = (a - lo) * out_per_latent
            w[:n] = _ramp(a - lo, out_per_latent, True, y.device)[:n]
        if k < len(bounds) - 1:  # fade out over the rows below it
            n = (hi - b) * out_per_latent
            if n:
                w[-n:] = _ramp(hi - b, out_per_latent, False, y.device)[-n:]
        out[:, :, lo * out_per_latent: hi * out_per_latent] += y * w[None, None, :, None]
        weight[lo * out_per_latent: hi * out_per_latent] += w
        del y
    return out / weight[None, None, :, None]


class VaeRunner:
    """Encode/decode with the model's VAE: batches, strips, and fp32 where fp16 would overflow."""

    def __init__(self, vae, batch_size: float | None = None, slices: int | None = None):
        self.vae = vae
        self.batch_size = batch_size  # images per call; below 1: that share of the batch (sd-scripts)
        self.slices = slices
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @contextlib.contextmanager
    def _precision(self, upcast: bool) -> Iterator[torch.dtype]:
        dtype = _module_dtype(self.vae)
        if upcast and dtype == torch.float16:
            self.vae.to(torch.float32)
            try:
                yield torch.float32
            finally:
                self.vae.to(dtype)
        else:
            yield dtype

    def _images_per_call(self, n: int) -> int:
        if not self.batch_size:
            return n
        if self.batch_size < 1:
            return max(1, int(n * self.batch_size))
        return int(self.batch_size)

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, ratio: tuple[int, int]) -> torch.Tensor:
        wanted = bool(getattr(self.vae.config, "force_upcast", False))
        out = self._batched(fn, x, wanted, ratio)
        if not torch.isfinite(out).all() and _module_dtype(self.vae) == torch.float16 and not wanted:
            logger.warning("the VAE gave NaN/inf in fp16: running it again in fp32 (use --no_half_vae to skip this)")
            out = self._batched(fn, x, True, ratio)
        return out

    def _batched(self, fn, x: torch.Tensor, upcast: bool, ratio: tuple[int, int]) -> torch.Tensor:
        n = self._images_per_call(x.shape[0])
        with self._precision(upcast) as dtype:
            device = _module_device(self.vae)
            parts = []
            for i in range(0, x.shape[0], n):
                chunk = x[i: i + n].to(device, dtype)
                if self.slices and self.slices > 1:
                    parts.append(in_strips(fn, chunk, self.slices, *ratio))
                else:
                    parts.append(fn(chunk).float())
            return torch.cat(parts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (fp32) from scaled latents."""
        return self._run(lambda z: self.vae.decode(z / self.scaling + self.shift).sample, latents, (1, LATENT_FACTOR))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents (the distribution's mean, fp32) from pixels in [-1, 1]."""
        return self._run(lambda x: (self.vae.encode(x).latent_dist.mean - self.shift) * self.scaling, pixels,
                         (LATENT_FACTOR, 1))
