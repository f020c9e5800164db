"""The VAE half of generation: encode/decode in batches, in fp32 where fp16 overflows, and in strips.

``--vae_slices N`` (sd-scripts' option) runs the VAE's full-resolution layers strip by strip: each
resnet, up/downsampler and outer convolution of the decoder's up blocks (the encoder's down
blocks) is computed on ``N`` horizontal strips of its input with the rows its 3x3 convolutions
need from the neighbouring strips, and written into the layer's output. The large temporaries of
a layer (GroupNorm and SiLU outputs, the first convolution's output) then exist for one strip at
a time; what stays whole is each layer's input and output. The layers at the latent's size (the
middle block with its attention) run whole: they are small.

The result is the whole-image decode up to float rounding: every GroupNorm normalises with the
whole image's statistics, summed over the strips first (for the second norm of a resnet, from a
first pass over the strips' first convolution, which therefore runs twice). This is the approach
of sd-scripts' ``SlicingAutoencoderKL``; diffusers has no strip-wise VAE (its ``enable_tiling``
normalises each tile by itself, which shifts colours per tile), so the layers' forward passes are
written out here from diffusers' modules. Any layer of another shape runs whole.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from library.torch_modules import module_device, module_dtype

logger = logging.getLogger(__name__)



def strip_bounds(rows: int, slices: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` rows of each strip; empty strips are left out."""
    cuts = [round(k * rows / slices) for k in range(slices + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


class _GroupStats:
    """A GroupNorm's per-(image, group) mean and variance, summed over strips in float64."""

    def __init__(self, norm: nn.GroupNorm):
        self.norm = norm
        self.total = self.squares = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        g = x.double().reshape(x.shape[0], self.norm.num_groups, -1)
        total, squares = g.sum(dim=2), g.square().sum(dim=2)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += g.shape[2]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm of ``x`` (any rows of the image) with the whole image's statistics and the norm's affine."""
        mean = self.total / self.count
        var = (self.squares / self.count - mean.square()).clamp_min(0)
        b, c, h, w = x.shape
        g = x.float().reshape(b, self.norm.num_groups, -1, h, w)
        g = (g - mean.float()[..., None, None, None]) * torch.rsqrt(var.float() + self.norm.eps)[..., None, None, None]
        y = g.reshape(b, c, h, w)
        if self.norm.affine:
            y = y * self.norm.weight.float()[:, None, None] + self.norm.bias.float()[:, None, None]
        return y.to(x.dtype)


def _stats(norm: nn.GroupNorm, x: torch.Tensor, slices: int) -> _GroupStats:
    stats = _GroupStats(norm)
    for a, b in strip_bounds(x.shape[2], slices):
        stats.add(x[:, :, a:b])
    return stats


def _rows(x: torch.Tensor, a: int, b: int, halo: int) -> tuple[torch.Tensor, int]:
    """Rows ``[a - halo, b + halo)`` of ``x`` (clipped to the image) and where row ``a`` is in them."""
    lo = max(0, a - halo)
    return x[:, :, lo: min(x.shape[2], b + halo)], a - lo


def _norm_act_conv(stats: _GroupStats, act: nn.Module, conv: nn.Module, x: torch.Tensor, a: int, b: int,
                   halo: int = 1) -> torch.Tensor:
    """Rows ``[a, b)`` of ``conv(act(norm(x)))`` for a 3x3 convolution with padding 1."""
    part, offset = _rows(x, a, b, halo)
    return conv(act(stats.apply(part)))[:, :, offset: offset + b - a]


def _is_plain_resnet(block: nn.Module) -> bool:
    return (getattr(block, "upsample", 1) is None and getattr(block, "downsample", 1) is None
            and getattr(block, "time_emb_proj", 1) is None and getattr(block, "time_embedding_norm", "") in ("default", "group"))


def sliced_resnet(block: nn.Module, x: torch.Tensor, slices: int) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D`` (the VAE's: no time embedding, no resampling) computed in strips."""
    if not _is_plain_resnet(block):
        return block(x, None)
    norm1 = _stats(block.norm1, x, slices)
    act = block.nonlinearity
    bounds = strip_bounds(x.shape[2], slices)
    norm2 = _GroupStats(block.norm2)
    for a, b in bounds:  # first pass: the second norm's statistics over conv1's whole output
        norm2.add(_norm_act_conv(norm1, act, block.conv1, x, a, b))
    out = None
    for a, b in bounds:
        part, offset = _rows(x, a, b, 2)
        h = block.conv1(act(norm1.apply(part)))
        h = block.conv2(block.dropout(act(norm2.apply(h))))[:, :, offset: offset + b - a]
        skip = x[:, :, a:b] if block.conv_shortcut is None else block.conv_shortcut(x[:, :, a:b])
        y = (skip + h) / block.output_scale_factor
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], x.shape[2], y.shape[3])
        out[:, :, a:b] = y
    return out


def sliced_upsample(block: nn.Module, x: torch.Tensor, slices: int) -> torch.Tensor:
    """diffusers' ``Upsample2D`` (nearest x2, then a 3x3 convolution) computed in strips of its output."""
    conv = getattr(block, "conv", None)
    if getattr(block, "norm", None) is not None or getattr(block, "use_conv_transpose", True) or conv is None \
            or not getattr(block, "interpolate", False):
        return block(x)
    out = None
    for a, b in strip_bounds(x.shape[2], slices):
        part, offset = _rows(x, a, b, 1)
        y = conv(F.interpolate(part, scale_factor=2.0, mode="nearest"))[:, :, 2 * offset: 2 * (offset + b - a)]
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], 2 * x.shape[2], y.shape[3])
        out[:, :, 2 * a: 2 * b] = y
    return out


def sliced_downsample(block: nn.Module, x: torch.Tensor, slices: int) -> torch.Tensor:
    """diffusers' ``Downsample2D`` of the VAE (pad right/bottom by one, 3x3 convolution with stride 2) in strips."""
    conv = getattr(block, "conv", None)
    if getattr(block, "norm", None) is not None or getattr(block, "padding", None) != 0 or not isinstance(conv, nn.Conv2d):
        return block(x)
    rows = (x.shape[2] + 1 - 3) // 2 + 1  # output rows of the padded input
    out = None
    for a, b in strip_bounds(rows, slices):
        part = x[:, :, 2 * a: min(x.shape[2], 2 * b + 1)]
        part = F.pad(part, (0, 1, 0, 2 * (b - a) + 1 - part.shape[2]))
        y = conv(part)
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], rows, y.shape[3])
        out[:, :, a:b] = y
    return out


def _sliced_head(norm: nn.GroupNorm, act: nn.Module, conv: nn.Module, x: torch.Tensor, slices: int) -> torch.Tensor:
    """``conv(act(norm(x)))`` (the decoder's last layers) in strips."""
    stats = _stats(norm, x, slices)
    return torch.cat([_norm_act_conv(stats, act, conv, x, a, b) for a, b in strip_bounds(x.shape[2], slices)], dim=2)


def _sliced_conv(conv: nn.Module, x: torch.Tensor, slices: int) -> torch.Tensor:
    """A 3x3 convolution with padding 1 (the encoder's first layer) in strips."""
    parts = []
    for a, b in strip_bounds(x.shape[2], slices):
        part, offset = _rows(x, a, b, 1)
        parts.append(conv(part)[:, :, offset: offset + b - a])
    return torch.cat(parts, dim=2)


def sliced_decode(vae: nn.Module, z: torch.Tensor, slices: int) -> torch.Tensor:
    """``vae.decode(z).sample`` with the up blocks and the last layers in strips (diffusers' Decoder.forward)."""
    dec = vae.decoder
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    h = dec.mid_block(dec.conv_in(z), None).to(next(iter(dec.up_blocks.parameters())).dtype)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            h = sliced_resnet(resnet, h, slices)
        for upsampler in block.upsamplers or []:
            h = sliced_upsample(upsampler, h, slices)
    return _sliced_head(dec.conv_norm_out, dec.conv_act, dec.conv_out, h, slices)


def sliced_encode(vae: nn.Module, x: torch.Tensor, slices: int) -> torch.Tensor:
    """The mean of ``vae.encode(x).latent_dist`` with the first layer and the down blocks in strips."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    enc = vae.encoder
    h = _sliced_conv(enc.conv_in, x, slices)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            h = sliced_resnet(resnet, h, slices)
        for downsampler in block.downsamplers or []:
            h = sliced_downsample(downsampler, h, slices)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
    if getattr(vae, "quant_conv", None) is not None:
        h = vae.quant_conv(h)
    return DiagonalGaussianDistribution(h).mean


class VaeRunner:
    """Encode/decode with the model's VAE: batches, strips, and fp32 where fp16 would overflow."""

    def __init__(self, vae, batch_size: float | None = None, slices: int | None = None):
        self.vae = vae
        self.batch_size = batch_size  # images per call; below 1: that share of the batch (sd-scripts)
        self.slices = slices  # --vae_slices: strips of the full-resolution layers (None: whole)
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @contextlib.contextmanager
    def _precision(self, upcast: bool) -> Iterator[torch.dtype]:
        dtype = module_dtype(self.vae)
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

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        wanted = bool(getattr(self.vae.config, "force_upcast", False))
        out = self._batched(fn, x, wanted)
        if not torch.isfinite(out).all() and module_dtype(self.vae) == torch.float16 and not wanted:
            logger.warning("the VAE gave NaN/inf in fp16: running it again in fp32 (use --no_half_vae to skip this)")
            out = self._batched(fn, x, True)
        return out

    def _batched(self, fn, x: torch.Tensor, upcast: bool) -> torch.Tensor:
        n = self._images_per_call(x.shape[0])
        with self._precision(upcast) as dtype:
            device = module_device(self.vae)
            return torch.cat([fn(x[i: i + n].to(device, dtype)).float() for i in range(0, x.shape[0], n)])

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.slices:
            return sliced_decode(self.vae, z, self.slices)
        return self.vae.decode(z).sample

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.slices:
            return sliced_encode(self.vae, x, self.slices)
        return self.vae.encode(x).latent_dist.mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (fp32) from scaled latents."""
        return self._run(lambda z: self._decode(z / self.scaling + self.shift), latents)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents (the distribution's mean, fp32) from pixels in [-1, 1]."""
        return self._run(lambda x: (self._encode(x) - self.shift) * self.scaling, pixels)
