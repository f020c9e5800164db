#!/usr/bin/env python
"""Train, from scratch on the CPU, a tiny SDXL that draws coloured shapes (``models/tiny_sdxl``).

The model has SDXL's component types and single-file key layout (two CLIP text encoders of different
widths, a four-level AutoencoderKL, a ``text_time`` UNet2DConditionModel) and is loaded by
``load_sdxl`` like any SDXL checkpoint. It is trained on :mod:`shapes_domain` (tools/shapes_domain.py): one
flat-coloured shape on a plain background at 64x64, captioned "a red circle on a white background".

Stages (one run, reproducible with ``--seed`` and the same ``--threads``; GroupNorm reference channels
keep colour through SDXL's 32 groups in both the VAE and the U-Net, see ``GroupNormReferences``):

1. train the VAE (L1 + L2 reconstruction, small KL), then reparametrise ``quant_conv`` and
   ``post_quant_conv`` so that latents * 0.13025 have zero mean and unit std per channel while the
   decoder's output stays the same;
2. encode the training images to latents once;
3. train the U-Net and both text encoders with SDXL's epsilon-prediction loss and noise schedule,
   10% caption dropout (so classifier-free guidance works), dropout of the pooled caption alone and
   sharpened initial attention (so that an LLLite, which changes attention inputs, can steer where
   things are drawn) and an EMA of the weights;
4. save a single-file fp16 checkpoint with ``save_sdxl_single_file``, reload it with ``load_sdxl``
   and evaluate the reloaded model: images for held-out and seen captions are scored by the
   procedural check of :func:`shapes_domain.score_images`, and a sample grid is written.

``--eval`` only runs the evaluation of an existing checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.console_logging import take_over_console, tool_console  # noqa: E402

take_over_console()  # before any third-party import: some libraries log while being imported

import numpy as np
import torch
from tqdm import tqdm

from library.atomic_io import atomic_path, atomic_write_text
from library.errors import UserError, run_cli
import shapes_domain
from library.sdxl.keys import SDXL_VAE_SCALING_FACTOR

logger = logging.getLogger("tools.build_tiny_sdxl")

SCRIPT_VERSION = "2"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "models" / "tiny_sdxl"
CHECKPOINT_NAME = "tiny_sdxl.safetensors"
MAX_CHECKPOINT_BYTES = 30 * 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def lr_factor(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``final`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def time_ids(batch: int, size: int) -> torch.Tensor:
    # [original_h, original_w, crop_top, crop_left, target_h, target_w]: uncropped square images.
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)


def save_grid(images: np.ndarray, cols: int, path: Path) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    with atomic_path(path, "the sample grid") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------
# Initialisation: GroupNorm reference channels
# ----------------------------------------------------------------------------------------------

REFERENCE_LEVEL = 20.0
REFERENCE_PERIOD = 3  # channels per GroupNorm group in library.sdxl.tiny.drawing_configs (widths 96)


class GroupNormReferences:
    """Constant reference channels that keep absolute levels through SDXL's 32-group GroupNorms.

    SDXL normalises with 32 groups. In a small model a group holds few channels, and normalising a group
    over the whole image removes each image's mean level: a flat white and a flat black background look
    alike after it, and so do the time embeddings added before a ResNet's ``norm2``. Short training runs do
    not get past that (colours come out wrong), and with one or two channels per group nothing can fix it.
    So in every feature map whose width is a multiple of ``32 * period`` (``period`` 3 or 4 channels per
    group), the channels ``period * i + 1`` hold the constant ``+k`` and the channels ``period * i + 2``
    (period 3) or ``+ 3`` (period 4) the constant ``-k``: layers that create a feature map write them (zero
    weights, bias ``+-k``), layers that add to one write nothing there, and layers that read one ignore
    them. Each group's mean then hardly depends on the image and its scale is set by the constants, so with
    a matching affine weight a GroupNorm passes the data channels nearly unchanged: the network behaves
    like one without normalisation, which trains quickly on flat colours. ``apply()`` imposes the
    constraints; training calls it after every optimizer step, so they hold in the saved weights too (they
    are ordinary weights: any SDXL loader runs the model unchanged). Other feature maps are left alone.
    """

    def __init__(self, model: torch.nn.Module, period: int, k: float = REFERENCE_LEVEL, residual_scale: float = 0.0):
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        if period not in (3, 4):
            raise ValueError("period must be 3 or 4")
        self.k, self.period = k, period
        self._patterns: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = {}
        self.sources: list = []  # (layer) creates a feature map
        self.readers: list = []  # (layer) reads one
        self.adders: list = []  # (layer) adds to the residual stream / to conv1's output
        self.norms: list = []
        residuals = []
        for m in model.modules():
            if isinstance(m, ResnetBlock2D):
                self.norms += [m.norm1, m.norm2]
                self.sources.append(m.conv1)
                self.readers.append(m.conv2)
                self.adders.append(m.conv2)
                residuals.append(m.conv2)
                if m.conv_shortcut is not None:
                    self.sources.append(m.conv_shortcut)
                if m.time_emb_proj is not None:
                    self.adders.append(m.time_emb_proj)
            elif isinstance(m, (Downsample2D, Upsample2D)) and getattr(m, "conv", None) is not None:
                self.sources.append(m.conv)
            elif isinstance(m, Attention) and m.group_norm is not None:  # the VAE's mid-block attention
                self.norms.append(m.group_norm)
                self.readers += [m.to_q, m.to_k, m.to_v]
                self.adders.append(m.to_out[0])
                residuals.append(m.to_out[0])
            elif isinstance(m, Transformer2DModel):
                self.norms.append(m.norm)
                self.readers.append(m.proj_in)
                self.adders.append(m.proj_out)
                residuals.append(m.proj_out)
        parts = [model.encoder, model.decoder] if hasattr(model, "encoder") else [model]
        for part in parts:
            self.sources.append(part.conv_in)
            self.norms.append(part.conv_norm_out)
            self.readers.append(part.conv_out)
        known = {id(n) for n in self.norms}
        missed = [n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm) and id(m) not in known]
        if missed:
            raise RuntimeError(f"GroupNorms not covered: {missed[:5]}")
        with torch.no_grad():
            for layer in residuals:
                layer.weight.mul_(residual_scale)
                layer.bias.mul_(residual_scale)
            for gn in self.norms:
                p = self._pattern(gn.num_channels)
                if p is not None:
                    data = torch.tensor([i for i in range(gn.num_channels) if i % period not in (1, period - 1)])
                    gn.weight[data] = k * math.sqrt(2 / period)  # the constants' RMS within a group
                    gn.bias[data] = 0.0
        self.apply()

    def _pattern(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(+k channels, -k channels, both) of an ``n``-wide feature map; memoised, as ``apply`` runs every step."""
        if n not in self._patterns:
            if n % (32 * self.period):
                self._patterns[n] = None
            else:
                plus, minus = torch.arange(1, n, self.period), torch.arange(self.period - 1, n, self.period)
                self._patterns[n] = (plus, minus, torch.cat([plus, minus]))
        return self._patterns[n]

    @torch.no_grad()
    def apply(self) -> None:
        for layer in self.readers + self.sources:
            p = self._pattern(layer.weight.shape[1])
            if p is not None:
                layer.weight[:, p[2]] = 0
        for layer in self.sources:
            p = self._pattern(layer.weight.shape[0])
            if p is not None:
                layer.weight[p[2]] = 0
                layer.bias[p[0]], layer.bias[p[1]] = self.k, -self.k
        for layer in self.adders:
            p = self._pattern(layer.weight.shape[0])
            if p is not None:
                layer.weight[p[2]] = 0
                layer.bias[p[2]] = 0
        for gn in self.norms:
            p = self._pattern(gn.num_channels)
            if p is not None:
                gn.weight[p[2]] = 1.0
                gn.bias[p[2]] = 0.0


@torch.no_grad()
def sharpen_attention(unet, gain: float) -> None:
    """Scale the U-Net's query and key projections at initialisation.

    With default initialisation a small model's attention starts uniform, and its convolutions learn
    the task before attention is ever needed, so it stays uniform. Uniform attention turns any change
    of a key or value into the same change at every position. An LLLite acts only through those inputs,
    so it could not steer *where* things are drawn. Attention that starts sharp (content-based) stays
    in use.
    """
    from diffusers.models.attention_processor import Attention

    for m in unet.modules():
        if isinstance(m, Attention):
            m.to_q.weight.mul_(gain)
            m.to_k.weight.mul_(gain)


@torch.no_grad()
def init_vae_posterior(vae, logvar: float = -8.0) -> None:
    """Start with a nearly deterministic posterior: with the default log-variance 0 the decoder first sees
    latents drowned in unit noise. The small KL term lets the variance grow where it costs nothing."""
    lc = vae.config.latent_channels
    vae.quant_conv.weight[lc:] = 0
    vae.quant_conv.bias[lc:] = logvar


# ----------------------------------------------------------------------------------------------
# Stage 1: VAE
# ----------------------------------------------------------------------------------------------


def _vae_batch(images: np.ndarray, specs, rng: np.random.Generator, batch: int, crop: int) -> torch.Tensor:
    """Random crops; most of them around the shape so that edges, not flat background, dominate."""
    n, size = images.shape[0], images.shape[1]
    idx = rng.integers(n, size=batch)
    out = np.empty((batch, crop, crop, 3), np.uint8)
    for k, i in enumerate(idx):
        if crop >= size:
            out[k] = images[i]
            continue
        if rng.random() < 0.8:
            s = specs[i]
            ox = int(np.clip(s.cx - crop / 2 + rng.uniform(-crop / 2, crop / 2), 0, size - crop))
            oy = int(np.clip(s.cy - crop / 2 + rng.uniform(-crop / 2, crop / 2), 0, size - crop))
        else:
            ox, oy = (int(rng.integers(0, size - crop + 1)) for _ in range(2))
        out[k] = images[i, oy : oy + crop, ox : ox + crop]
    x = to_tensor(out)
    flip = torch.from_numpy(rng.random(batch) < 0.5)
    x[flip] = x[flip].flip(-1)
    return x


def train_vae(vae, images: np.ndarray, specs, args, rng: np.random.Generator, refs: GroupNormReferences | None = None) -> dict:
    """Train on crops first, then on whole images (GroupNorm and the mid attention see whole images at use)."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)
    full_from = int(args.vae_steps * (1 - args.vae_full_fraction))
    size = images.shape[1]
    log = {}
    bar = tqdm(range(args.vae_steps), desc="VAE", dynamic_ncols=True)
    ema_loss = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * lr_factor(step, args.vae_steps, args.warmup_steps // 2)
        if step < full_from:
            x = _vae_batch(images, specs, rng, args.vae_batch, args.vae_crop)
        else:
            # Same pixels per step as the crop phase.
            b = max(1, args.vae_batch * args.vae_crop**2 // size**2)
            x = _vae_batch(images, specs, rng, b, size)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn_like(post.mean)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).pow(2).mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = l1 + l2 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if refs is not None:
            refs.apply()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}", l1=f"{l1.item():.4f}", kl=f"{kl.item():.2f}")
        if step % 100 == 0 or step == args.vae_steps - 1:
            logger.info("VAE step %d: loss %.4f (l1 %.4f, l2 %.4f, kl %.3f)", step, loss.item(), l1.item(), l2.item(), kl.item())
    log.update(final_loss=ema_loss)
    vae.eval().requires_grad_(False)
    return log


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch: int = 32, desc: str = "encode") -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds (unscaled latents) of uint8 images."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc=desc, dynamic_ncols=True):
        post = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def normalise_vae_latents(vae, images: np.ndarray) -> dict:
    """Reparametrise quant_conv/post_quant_conv so latents * scaling_factor have zero mean, unit std per channel.

    The posterior mean becomes ``z' = s * (z - m)`` (per channel ``c``); ``post_quant_conv`` then sees
    ``z = z' / s + m``, which folds into its weights, so decoding is unchanged up to rounding.
    """
    sf = vae.config.scaling_factor
    mean, _ = encode_images(vae, images, desc="latent stats")
    m = mean.mean(dim=(0, 2, 3)).double()
    s = 1.0 / (sf * mean.std(dim=(0, 2, 3)).double())
    lc = m.numel()
    q, pq = vae.quant_conv, vae.post_quant_conv
    qw, qb = q.weight.double(), q.bias.double()
    qw[:lc] *= s.view(-1, 1, 1, 1)
    qb[:lc] = s * (qb[:lc] - m)
    qb[lc:] += 2 * torch.log(s)  # log-variance of s * z
    pw, pb = pq.weight.double(), pq.bias.double()
    pb = pb + (pw[:, :, 0, 0] @ m)
    pw = pw / s.view(1, -1, 1, 1)
    q.weight.copy_(qw.float()), q.bias.copy_(qb.float())
    pq.weight.copy_(pw.float()), pq.bias.copy_(pb.float())
    stats = {"channel_mean_before": m.tolist(), "channel_scale": s.tolist()}
    logger.info("VAE latents: per-channel mean %s, std*scaling_factor %s -> normalised",
                [round(v, 3) for v in m.tolist()], [round(1 / v, 3) for v in s.tolist()])
    return stats


# ----------------------------------------------------------------------------------------------
# Stage 3: U-Net and text encoders
# ----------------------------------------------------------------------------------------------


class CaptionTokens:
    """Token ids of every caption, from the same tokenization that ``encode_prompts`` uses."""

    def __init__(self, tok1, tok2):
        from library.sdxl.text_encoding import tokenize_prompt

        self._tokenize = tokenize_prompt
        self.tok1, self.tok2 = tok1, tok2
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = (
                    self._tokenize(self.tok1, c, 1, use_weighting=False)[0],
                    self._tokenize(self.tok2, c, 1, use_weighting=False)[0],
                )
        return torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions])


def encode_with_grad(te1, te2, ids1: torch.Tensor, ids2: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning as ``library.sdxl.text_encoding.encode_prompts`` computes it (which runs without
    gradients), for training the encoders: penultimate hidden states of both, concatenated, and
    encoder 2's projected final-layer-normed state at the first end-of-text token."""
    h1 = te1(input_ids=ids1, output_hidden_states=True).hidden_states[-2]
    out2 = te2(input_ids=ids2, output_hidden_states=True)
    h2 = out2.hidden_states[-2]
    pos = (ids2 == eos_id).int().argmax(dim=-1)
    pooled = te2.text_projection(out2.last_hidden_state[torch.arange(ids2.shape[0]), pos])
    return torch.cat([h1, h2], dim=-1), pooled


def alphas_cumprod(sched_config: dict) -> torch.Tensor:
    if sched_config.get("beta_schedule") != "scaled_linear":
        raise UserError(f"unexpected beta_schedule {sched_config.get('beta_schedule')!r} in the scheduler config")
    n = sched_config["num_train_timesteps"]
    betas = torch.linspace(sched_config["beta_start"] ** 0.5, sched_config["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class EMA:
    """Exponential moving average of the trainable weights, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_diffusion(unet, te1, te2, tok1, tok2, lat_mean, lat_std, captions, args, rng, gen,
                    refs: GroupNormReferences | None = None) -> dict:
    from library.sdxl.loading import bundled_config

    size = args.image_size
    ac = alphas_cumprod(bundled_config("scheduler")).float()
    n_t = ac.numel()
    snr = ac / (1 - ac)
    # Min-SNR-gamma weighting for epsilon prediction: min(SNR, gamma) / SNR.
    weight = torch.clamp(snr, max=args.min_snr_gamma) / snr if args.min_snr_gamma > 0 else torch.ones_like(snr)
    tokens = CaptionTokens(tok1, tok2)
    eos_id = tok2.eos_token_id
    modules = [unet, te1, te2]
    for m in modules:
        m.train().requires_grad_(True)
    params_u = list(unet.parameters())
    params_t = [p for m in (te1, te2) for p in m.parameters()]
    opt = torch.optim.AdamW(
        [{"params": params_u, "lr": args.lr}, {"params": params_t, "lr": args.te_lr}],
        betas=(0.9, 0.99), weight_decay=0.01, fused=True,
    )
    base_lrs = [args.lr, args.te_lr]
    ema = EMA(modules, args.ema_decay)
    n = lat_mean.shape[0]
    sf = SDXL_VAE_SCALING_FACTOR
    tid = time_ids(args.batch_size, size)
    bar = tqdm(range(args.unet_steps), desc="U-Net", dynamic_ncols=True)
    ema_loss = None
    for step in bar:
        f = lr_factor(step, args.unet_steps, args.warmup_steps)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        idx = torch.from_numpy(rng.integers(n, size=args.batch_size))
        drop = rng.random(args.batch_size) < args.caption_dropout
        caps = ["" if d else captions[i] for d, i in zip(drop, idx.tolist())]
        # The pooled caption reaches every ResNet through the time embedding. Dropping it alone makes
        # the model read the caption through cross-attention too, per position, as SDXL does; an
        # LLLite steers the image by changing those attention inputs, so it needs them to matter.
        drop_pooled = torch.from_numpy(rng.random(args.batch_size) < args.pooled_dropout)
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * sf
        t = torch.randint(0, n_t, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # Encode each distinct caption of the batch once.
        uniq = sorted(set(caps) | {""})
        ids1, ids2 = tokens(uniq)
        hid_u, pooled_u = encode_with_grad(te1, te2, ids1, ids2, eos_id)
        where = torch.tensor([uniq.index(c) for c in caps])
        pooled = torch.where(drop_pooled[:, None], pooled_u[uniq.index("")], pooled_u[where])
        pred = unet(xt, t, hid_u[where], added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], 1.0)
        opt.step()
        if refs is not None:
            refs.apply()
        ema.update()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{args.lr * f:.1e}")
        if step % 200 == 0 or step == args.unet_steps - 1:
            logger.info("U-Net step %d: loss %.4f (smoothed %.4f)", step, loss.item(), ema_loss)
    ema.copy_to_params()
    for m in modules:
        m.eval().requires_grad_(False)
    return {"final_loss": ema_loss}


# ----------------------------------------------------------------------------------------------
# Generation and evaluation
# ----------------------------------------------------------------------------------------------


def make_scheduler(sampler: str, sched_config: dict):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(sched_config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(sched_config)
    raise UserError(f"unknown sampler {sampler!r}: use euler or ddim")


@torch.no_grad()
def generate(models, captions: list[str], *, seed: int, steps: int, cfg: float, sampler: str, size: int = shapes_domain.IMAGE_SIZE,
             batch: int = 32, negative: str = "") -> np.ndarray:
    """Images (N, H, W, 3 uint8) for ``captions`` with classifier-free guidance against ``negative``."""
    from library.sdxl.text_encoding import encode_prompts

    unet, vae = models.unet, models.vae
    sf = vae.config.scaling_factor
    out = []
    gen = torch.Generator().manual_seed(seed)
    for i in tqdm(range(0, len(captions), batch), desc=f"sample ({sampler}, {steps} steps, cfg {cfg})", dynamic_ncols=True):
        caps = captions[i : i + batch]
        b = len(caps)
        hid, pooled = encode_prompts(models.text_encoder1, models.text_encoder2, models.tokenizer1, models.tokenizer2, caps)
        nhid, npooled = encode_prompts(models.text_encoder1, models.text_encoder2, models.tokenizer1, models.tokenizer2, [negative] * b)
        sched = make_scheduler(sampler, models.scheduler_config)
        sched.set_timesteps(steps)
        lat = torch.randn((b, 4, size // 8, size // 8), generator=gen) * sched.init_noise_sigma
        hid2, pooled2 = torch.cat([nhid, hid]), torch.cat([npooled, pooled])
        tid = time_ids(2 * b, size)
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            eps = unet(inp, t, hid2, added_cond_kwargs={"text_embeds": pooled2, "time_ids": tid}).sample
            u, c = eps.chunk(2)
            lat = sched.step(u + cfg * (c - u), t, lat).prev_sample
        out.append(to_uint8(vae.decode(lat / sf).sample))
    return np.concatenate(out)


def evaluate(models, args, out_dir: Path | None) -> dict:
    """Score generated images for held-out and seen captions; write the sample grid."""
    captions = shapes_domain.evaluation_captions(args.eval_samples)
    t0 = time.time()
    images = generate(models, captions, seed=args.seed + 1000, steps=args.eval_steps, cfg=args.eval_cfg,
                      sampler=args.sampler, size=args.image_size)
    scores = shapes_domain.score_images(images, captions)
    summary = {k: v for k, v in scores.items() if k != "rows"}
    summary.update(sampler=args.sampler, steps=args.eval_steps, cfg=args.eval_cfg, seconds=round(time.time() - t0, 1))
    logger.info(
        "evaluation of %d images: colour %.1f%%, shape %.1f%%, both %.1f%%, background %.1f%% "
        "(held-out combinations: colour %.1f%%, shape %.1f%%; seen: colour %.1f%%, shape %.1f%%)",
        scores["n"], 100 * scores["colour"], 100 * scores["shape"], 100 * scores["both"], 100 * scores["background"],
        100 * scores["held_out_colour"], 100 * scores["held_out_shape"], 100 * scores["seen_colour"], 100 * scores["seen_shape"],
    )
    if out_dir is not None:
        # Grid: one row per shape, one column per colour, backgrounds cycling.
        grid_caps = [shapes_domain.make_caption(c, s, list(shapes_domain.BACKGROUNDS)[(i + j) % 3])
                     for i, s in enumerate(shapes_domain.SHAPES) for j, c in enumerate(shapes_domain.COLOURS)]
        grid = generate(models, grid_caps, seed=args.seed + 2000, steps=args.eval_steps, cfg=args.eval_cfg,
                        sampler=args.sampler, size=args.image_size)
        save_grid(grid, len(shapes_domain.COLOURS), out_dir / "samples.png")
        grid_scores = shapes_domain.score_images(grid, grid_caps)
        summary["grid_both"] = grid_scores["both"]
        atomic_write_text(out_dir / "eval.json", json.dumps({"summary": summary, "grid_captions": grid_caps, "rows": [
            {k: (v if k != "found" else {kk: vv for kk, vv in v.items() if kk != "shape_scores"}) for k, v in r.items()}
            for r in scores["rows"]]}, indent=1))
    return summary


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


def check_round_trip(path: Path, configs: dict, unet, vae, te1, te2):
    """Reload with load_sdxl; the rebuilt architecture must equal the trained one."""
    from library.sdxl.loading import load_sdxl

    models = load_sdxl(str(path))
    for name, mine, theirs in (("unet", unet, models.unet), ("vae", vae, models.vae),
                               ("text_encoder", te1, models.text_encoder1), ("text_encoder_2", te2, models.text_encoder2)):
        a = {k: tuple(v.shape) for k, v in mine.state_dict().items() if not k.endswith("position_ids")}
        b = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if not k.endswith("position_ids")}
        if a != b:
            raise RuntimeError(f"reloaded {name} differs from the trained one: {sorted(set(a.items()) ^ set(b.items()))[:5]}")
        cfg = dict(theirs.config) if name in ("unet", "vae") else theirs.config.to_dict()
        for k, v in configs[name].items():
            if k.startswith("_") or k == "architectures":
                continue
            got = cfg.get(k)
            if isinstance(got, tuple):
                got = list(got)
            if got != v and not (k == "num_attention_heads" or k.endswith("token_id")):
                raise RuntimeError(f"reloaded {name} config {k}={got!r}, trained with {v!r}")
        sd_mine, sd_theirs = mine.state_dict(), theirs.state_dict()
        max_diff = max((sd_mine[k].float() - sd_theirs[k].float()).abs().max().item() for k in a)
        logger.info("reloaded %s: same architecture, max weight difference %.2e (fp16 storage)", name, max_diff)
    return models


def build(args) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    from library.sdxl.loading import save_sdxl_single_file
    from library.sdxl.text_encoding import encode_prompts, load_sdxl_tokenizers
    from library.sdxl.tiny import build_random_models, drawing_configs

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings = {}
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    configs = drawing_configs()
    unet, vae, te1, te2 = build_random_models(configs, seed=args.seed)
    vae_refs = GroupNormReferences(vae, REFERENCE_PERIOD)
    init_vae_posterior(vae)
    unet_refs = GroupNormReferences(unet, REFERENCE_PERIOD)
    sharpen_attention(unet, args.attn_init_gain)
    tok1, tok2 = load_sdxl_tokenizers(None)
    logger.info("parameters: U-Net %.2fM, VAE %.2fM, text encoders %.2fM + %.2fM",
                *(sum(p.numel() for p in m.parameters()) / 1e6 for m in (unet, vae, te1, te2)))

    t0 = time.time()
    images, captions, specs = shapes_domain.generate(args.num_images, args.seed, args.image_size)
    logger.info("generated %d training images in %.1fs (%d caption combinations, %d held out)", len(images),
                time.time() - t0, len(shapes_domain.training_combinations()), len(shapes_domain.HELD_OUT))

    # Stage 1: VAE.
    t0 = time.time()
    vae_cache = work / "vae.pt" if work else None
    # The VAE stage's own time is kept beside the cached VAE, so that a README written by a run that
    # reuses it still reports what a build from scratch costs.
    vae_timing = work / "vae_seconds.json" if work else None
    vae_reused = False
    if vae_cache and vae_cache.is_file() and not args.retrain_vae:
        vae.load_state_dict(torch.load(vae_cache))
        vae.eval().requires_grad_(False)
        logger.info("VAE from %s", vae_cache)
        if vae_timing and vae_timing.is_file():
            timings["vae"] = float(json.loads(vae_timing.read_text())["seconds"])
            vae_reused = True
    else:
        train_vae(vae, images, specs, args, rng, vae_refs)
        normalise_vae_latents(vae, images[: min(1024, len(images))])
        if vae_cache:
            with atomic_path(vae_cache, "the VAE cache") as tmp:
                torch.save(vae.state_dict(), tmp)
            atomic_write_text(vae_timing, json.dumps({"seconds": time.time() - t0, "threads": args.threads}))
    timings.setdefault("vae", time.time() - t0)

    # Stage 2: latents, once.
    t0 = time.time()
    lat_cache = work / f"latents_{args.num_images}.pt" if work else None
    if lat_cache and lat_cache.is_file() and not args.retrain_vae and vae_cache and vae_cache.is_file():
        lat_mean, lat_std = torch.load(lat_cache)
    else:
        lat_mean, lat_std = encode_images(vae, images)
        if lat_cache:
            with atomic_path(lat_cache, "the latent cache") as tmp:
                torch.save((lat_mean, lat_std), tmp)
    sf = vae.config.scaling_factor
    with torch.no_grad():
        rec = to_uint8(vae.decode(lat_mean[-64:]).sample)
        psnr = 10 * math.log10(255**2 / float(np.mean((rec.astype(np.float32) - images[-64:].astype(np.float32)) ** 2)))
        rec_scores = shapes_domain.score_images(rec, captions[-64:])
    logger.info("latents: %s, scaled std %.3f, mean %.3f; VAE reconstruction PSNR %.1f dB, check on reconstructions: "
                "colour %.0f%%, shape %.0f%%", tuple(lat_mean.shape), float((lat_mean * sf).std()), float((lat_mean * sf).mean()),
                psnr, 100 * rec_scores["colour"], 100 * rec_scores["shape"])
    timings["encode"] = time.time() - t0

    # Stage 3: U-Net + text encoders, with their own random streams so that a VAE reused from
    # --work_dir gives the same U-Net as a run from scratch.
    t0 = time.time()
    torch.manual_seed(args.seed + 1)
    rng_u = np.random.default_rng(args.seed + 1)
    gen_u = torch.Generator().manual_seed(args.seed + 1)
    train_diffusion(unet, te1, te2, tok1, tok2, lat_mean, lat_std, captions, args, rng_u, gen_u, unet_refs)
    timings["unet"] = time.time() - t0

    # The training-time encoding must be the one generation uses.
    with torch.no_grad():
        probe = [captions[0], ""]
        ids1, ids2 = CaptionTokens(tok1, tok2)(probe)
        mine = encode_with_grad(te1, te2, ids1, ids2, tok2.eos_token_id)
        ref = encode_prompts(te1, te2, tok1, tok2, probe)
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # Stage 4: save, reload through the ordinary loader, evaluate the reloaded model.
    path = out_dir / CHECKPOINT_NAME
    total_train = time.time() - t_start
    metadata = {
        "tiny_sdxl.script": "tools/build_tiny_sdxl.py",
        "tiny_sdxl.script_version": SCRIPT_VERSION,
        "tiny_sdxl.seed": str(args.seed),
        "tiny_sdxl.vae_steps": str(args.vae_steps),
        "tiny_sdxl.unet_steps": str(args.unet_steps),
        "tiny_sdxl.batch_size": str(args.batch_size),
        "tiny_sdxl.num_images": str(args.num_images),
        "tiny_sdxl.image_size": str(args.image_size),
        "tiny_sdxl.domain": "library/evaluation/shapes_domain.py: 'a {colour} {shape} on a {background} background'",
        "tiny_sdxl.args": json.dumps(vars(args), sort_keys=True),
        "tiny_sdxl.torch": torch.__version__,
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.title": "tiny SDXL (shapes)",
        "modelspec.resolution": f"{args.image_size}x{args.image_size}",
    }
    save_sdxl_single_file(path, unet, vae, te1, te2, dtype=torch.float16, metadata=metadata)
    size = path.stat().st_size
    logger.info("saved %s (%.1f MB)", path, size / 1e6)
    if size > MAX_CHECKPOINT_BYTES:
        logger.warning("the checkpoint is larger than %.0f MB", MAX_CHECKPOINT_BYTES / 1e6)
    models = check_round_trip(path, configs, unet, vae, te1, te2)
    t0 = time.time()
    summary = evaluate(models, args, out_dir)
    timings["eval"] = time.time() - t0
    timings["total"] = time.time() - t_start + (timings["vae"] if vae_reused else 0.0)
    logger.info("timings (s): %s", {k: round(v, 1) for k, v in timings.items()})
    write_readme(out_dir, args, summary, timings, size, psnr, rec_scores, configs, total_train, vae_reused)


def write_readme(out_dir: Path, args, summary: dict, timings: dict, size: int, psnr: float, rec_scores: dict,
                 configs: dict, total_train: float, vae_reused: bool = False) -> None:
    u = configs["unet"]
    v = configs["vae"]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    cmd = ("python tools/build_tiny_sdxl.py --seed {seed} --threads {threads} --num_images {num_images} "
           "--vae_steps {vae_steps} --unet_steps {unet_steps} --batch_size {batch_size} "
           "--attn_init_gain {attn_init_gain:g} --pooled_dropout {pooled_dropout:g}").format(**vars(args))
    held = ", ".join(shapes_domain.make_caption(*t) for t in shapes_domain.HELD_OUT)
    reused = ("; the VAE stage ran in an earlier run of the same command and was reused through --work_dir, "
              "which the U-Net stage does not depend on: it has its own random streams") if vae_reused else ""
    text = f"""# tiny SDXL that draws shapes

`tiny_sdxl.safetensors` ({size / 1e6:.1f} MB, fp16) is a very small model with SDXL's exact component types and
single-file key layout, trained from scratch on the CPU so that the whole LLLite story (train a control adapter,
generate with it) can be tried without a GPU and without downloading SDXL. It is loaded like any SDXL checkpoint:

```python
from library.sdxl.loading import load_sdxl
models = load_sdxl("models/tiny_sdxl/tiny_sdxl.safetensors")
```

It draws one flat-coloured shape on a plain background at **{args.image_size}x{args.image_size}** (latents
{args.image_size // 8}x{args.image_size // 8}x4), for captions of the form

    a {{colour}} {{shape}} on a {{background}} background

- colours: {", ".join(shapes_domain.COLOURS)}
- shapes: {", ".join(shapes_domain.SHAPES)}
- backgrounds: {", ".join(shapes_domain.BACKGROUNDS)}

The position and size of the shape are random and not in the caption: that is what a control image decides.
The domain (images, captions, and the procedural check used below) is `library/evaluation/shapes_domain.py`.
Five combinations were held out of training: {held}.

## Components

| component | class | size |
|---|---|---|
| U-Net | UNet2DConditionModel, `text_time` conditioning | block_out_channels {u["block_out_channels"]}, attention (1 transformer block) at every level including the first, layers_per_block {u["layers_per_block"]}, cross-attention width {u["cross_attention_dim"]} |
| VAE | AutoencoderKL | block_out_channels {v["block_out_channels"]} (4 levels, 8x downsampling), 4 latent channels, scaling_factor 0.13025 |
| text encoder 1 | CLIPTextModel | width {configs["text_encoder"]["hidden_size"]}, {configs["text_encoder"]["num_hidden_layers"]} layers, vocabulary 49408 |
| text encoder 2 | CLIPTextModelWithProjection | width {configs["text_encoder_2"]["hidden_size"]}, {configs["text_encoder_2"]["num_hidden_layers"]} layers, projection {configs["text_encoder_2"]["projection_dim"]} |

Configs: `library.sdxl.tiny.drawing_configs()`. `load_sdxl` infers the same architecture from the tensor shapes
(the build script checks this). Conditioning is SDXL's: penultimate hidden states of both encoders concatenated
({u["cross_attention_dim"]} wide), pooled = encoder 2's projected end-of-text state, time_ids =
[{args.image_size}, {args.image_size}, 0, 0, {args.image_size}, {args.image_size}]. Noise schedule and prediction
type: SDXL's (bundled scheduler config, epsilon).

### Why 64x64, and widths of 96

SDXL's GroupNorms have 32 groups, and the loader assumes that. Normalising a group over the whole image
removes each image's mean level, so with the 1 or 2 channels per group of a 32- or 64-wide layer a flat white
and a flat black background look alike afterwards (and the timestep embedding added before a ResNet's `norm2`
is erased). Trained like that, the VAE and the U-Net got shapes but not colours. The builder therefore uses
widths of 96 (3 channels per group) where it matters and keeps two of every three channels of those feature
maps at the constants +20 / -20 (`GroupNormReferences` in the build script): a group's mean and scale then come
from the constants and the data channels pass the GroupNorm almost unchanged. These are ordinary weights (zeros
and biases), so any SDXL loader runs the model unchanged; fine-tuning the U-Net itself would have to keep them.
A 96-wide first VAE level is expensive at full resolution, which is why the images are 64x64 rather than 128x128.

## How it was made

```
{cmd}
```

Seed {args.seed}, script version {SCRIPT_VERSION}, {args.threads} CPU thread(s); the whole build took
{timings["total"] / 60:.1f} minutes here (VAE {timings["vae"] / 60:.1f}, encoding {timings["encode"] / 60:.1f},
U-Net {timings["unet"] / 60:.1f}, evaluation {timings["eval"] / 60:.1f}){reused}. Results depend slightly on the thread count.

1. {args.num_images} procedurally drawn images (the held-out combinations excluded).
2. VAE: {args.vae_steps} AdamW steps (lr {args.vae_lr}), L1 + L2 reconstruction + {args.vae_kl} x KL, on {args.vae_crop}x{args.vae_crop}
   crops and then whole images; afterwards `quant_conv`/`post_quant_conv` are reparametrised exactly so that
   latents x 0.13025 have zero mean and unit std per channel. Reconstruction PSNR {psnr:.1f} dB; the procedural
   check recognises {pct(rec_scores["colour"])} of colours and {pct(rec_scores["shape"])} of shapes in reconstructions.
3. U-Net + both text encoders: {args.unet_steps} AdamW steps of batch {args.batch_size} (lr {args.lr}, warmup
   {args.warmup_steps}, cosine decay), epsilon loss with min-SNR-{args.min_snr_gamma:g} weighting, {pct(args.caption_dropout)}
   caption dropout to the empty prompt, {pct(args.pooled_dropout)} dropout of the pooled caption alone (so that
   the model also reads the caption through cross-attention, where an LLLite acts), attention query/key weights
   scaled by {args.attn_init_gain:g} at initialisation (so that attention starts, and stays, position-dependent: an
   LLLite changes attention inputs, and through uniform attention it could not say *where*), EMA {args.ema_decay} of
   all trained weights (the EMA is what is saved).
4. Saved in fp16 with `save_sdxl_single_file`, reloaded with `load_sdxl`, and evaluated after reloading.

## Measured quality

{summary["n"]} images generated for captions of which half use held-out combinations
({summary["sampler"]}, {summary["steps"]} steps, CFG {summary["cfg"]:g}, negative prompt ""), scored by
`shapes_domain.score_images` (background from the border, the largest differing region's colour by nearest
palette colour, its shape by template matching in its bounding box):

| | colour | shape | both | background |
|---|---|---|---|---|
| all | {pct(summary["colour"])} | {pct(summary["shape"])} | {pct(summary["both"])} | {pct(summary["background"])} |
| held-out combinations | {pct(summary["held_out_colour"])} | {pct(summary["held_out_shape"])} | {pct(summary["held_out_both"])} | {pct(summary["held_out_background"])} |
| seen combinations | {pct(summary["seen_colour"])} | {pct(summary["seen_shape"])} | {pct(summary["seen_both"])} | {pct(summary["seen_background"])} |

`samples.png`: one row per shape ({", ".join(shapes_domain.SHAPES)}), one column per colour
({", ".join(shapes_domain.COLOURS)}), backgrounds cycling white, black, gray. `eval.json` has every score.

Re-run the evaluation: `python tools/build_tiny_sdxl.py --eval` (options `--sampler`, `--eval_steps`,
`--eval_cfg`, `--eval_samples`).

Recommended generation settings: {args.image_size}x{args.image_size}, {summary["sampler"]} (or DDIM) with {summary["steps"]} steps, CFG about
{summary["cfg"]:g}, empty negative prompt.
"""
    atomic_write_text(out_dir / "README.md", text)


def run_eval(args) -> None:
    from library.sdxl.loading import load_sdxl

    path = Path(args.checkpoint or Path(args.output_dir) / CHECKPOINT_NAME)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}. Build it first with `python tools/build_tiny_sdxl.py`, or give --checkpoint.")
    models = load_sdxl(str(path))
    summary = evaluate(models, args, Path(args.eval_output) if args.eval_output else None)
    print(json.dumps(summary, indent=1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default=str(DEFAULT_OUTPUT), help="where the checkpoint, README.md and samples.png go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="torch CPU threads")
    p.add_argument("--image_size", type=int, default=shapes_domain.IMAGE_SIZE)
    p.add_argument("--num_images", type=int, default=3000, help="training images (encoded to latents once)")
    p.add_argument("--vae_steps", type=int, default=900)
    p.add_argument("--vae_batch", type=int, default=16)
    p.add_argument("--vae_crop", type=int, default=32, help="crop size of the first VAE phase")
    p.add_argument("--vae_full_fraction", type=float, default=0.2, help="last fraction of VAE steps on whole images")
    p.add_argument("--vae_lr", type=float, default=1.5e-3)
    p.add_argument("--vae_kl", type=float, default=1e-4, help="weight of the KL term (per latent element)")
    p.add_argument("--unet_steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="U-Net learning rate")
    p.add_argument("--te_lr", type=float, default=1e-3, help="text encoders' learning rate")
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--min_snr_gamma", type=float, default=5.0, help="0 disables min-SNR weighting")
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--attn_init_gain", type=float, default=2.0,
                   help="scale of the U-Net's attention query/key weights at initialisation")
    p.add_argument("--pooled_dropout", type=float, default=0.9,
                   help="fraction of samples whose pooled caption alone is replaced by the empty prompt's")
    p.add_argument("--work_dir", default=None, help="keep the VAE and latents here and reuse them (for experiments)")
    p.add_argument("--retrain_vae", action="store_true", help="ignore a VAE cached in --work_dir")
    p.add_argument("--eval", action="store_true", help="only evaluate an existing checkpoint")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval (default: OUTPUT_DIR/tiny_sdxl.safetensors)")
    p.add_argument("--eval_output", default=None, help="with --eval: also write samples.png and eval.json here")
    p.add_argument("--eval_samples", type=int, default=100)
    p.add_argument("--eval_steps", type=int, default=25)
    p.add_argument("--eval_cfg", type=float, default=5.0)
    p.add_argument("--sampler", choices=("euler", "ddim"), default="euler")
    args = p.parse_args(argv)
    if args.image_size % 32 or args.image_size < 64:
        raise UserError(f"--image_size must be a multiple of 32 and at least 64, got {args.image_size}")
    if args.vae_crop % 8 or args.vae_crop > args.image_size:
        raise UserError(f"--vae_crop must be a multiple of 8 and at most --image_size, got {args.vae_crop}")
    for name in ("num_images", "vae_steps", "unet_steps", "batch_size", "eval_samples", "eval_steps", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    tool_console()
    torch.set_num_threads(args.threads)
    logger.info("%s, torch %s, %d thread(s)", platform.platform(), torch.__version__, args.threads)
    if args.eval:
        run_eval(args)
    else:
        build(args)


if __name__ == "__main__":
    run_cli(main)
