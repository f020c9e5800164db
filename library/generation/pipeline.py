"""SDXL image generation with any number of ControlNet-LLLite models, shared by ``sdxl_gen_img.py`` and training.

:func:`generate` draws images with models that are already in memory (the trainer calls it for
sample images), so it loads nothing and leaves every model as it found it (device, dtype, train/eval
mode, LLLite multiplier/active state, no hooks left). The loop is the plain diffusers recipe::

    scheduler from the model's config -> set_timesteps -> seeded latents (CPU generators)
    -> per step: switch each LLLite on/off for its window, one CFG-batched U-Net call, scheduler.step
    -> VAE decode (in fp32 where the fp16 SDXL VAE would overflow; in strips with vae_slices)

Options on top: img2img (``init_image`` + ``strength``), latent-blend inpainting (``mask``), a
two-pass highres fix with a choice of upscalers (``library/generation/upscalers.py``), Deep Shrink
(``library/generation/deep_shrink.py``), Gradual Latent (``library/generation/gradual_latent.py``), per-model LLLite
multipliers and step windows. What a request is and its rules: ``library/generation/requests.py``.

Definitions used here (also in docs/generation.md):

* CFG: ``eps = uncond + scale * (cond - uncond)``, where uncond is the negative prompt.
  With ``negative_scale`` the batch has three parts, an empty prompt ``e``, the prompt ``c`` and
  the negative prompt ``n``: ``eps = e + scale * (c - e) - negative_scale * (n - e)``.
* LLLite windows: denoising step ``s`` (0-based) of ``n`` steps run in a pass is controlled by a model
  when ``start <= s / n < ratio``. Second-order samplers (heun, dpm_2) evaluate the U-Net twice per
  step; both evaluations belong to the same step.
* Inpainting (standard 4-channel U-Net): white mask pixels are regenerated. After every step the
  unmasked part of the latents is replaced by the original latents noised to the next timestep.
* Highres fix (as sd-scripts): pass 1 at ``highres_fix_scale`` of the final size with
  ``highres_fix_steps`` steps (img2img at ``highres_fix_strength`` when there is an init image),
  then upscale and run img2img at the final size with ``steps`` steps and ``strength``. Guide images
  are resized for each pass; explicit original sizes and crops are scaled for pass 1.
* SDXL size conditioning: ``time_ids = [original_h, original_w, crop_top, crop_left, target_h, target_w]``;
  the uncond part (negative prompt, and the empty prompt with ``negative_scale``) takes
  ``original_*_negative`` when given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from library.errors import UserError
from library.torch_modules import module_device, module_dtype
from library.generation.deep_shrink import deep_shrink
from library.generation.gradual_latent import GradualLatentRun
from library.generation.samplers import build_scheduler, step_accepts_generator
from library.generation.requests import (  # noqa: F401  (re-exported: the public API of generation)
    DEFAULT_STRENGTH,
    LATENT_FACTOR,
    PER_IMAGE_FIELDS,
    DeepShrink,
    GenerationRequest,
    GradualLatent,
    ImageLike,
    Unsharp,
    batch_key,
    checked_size,
    control_settings,
    first_pass_size,
    request_from_prompt_spec,
    validate_request,
)
from library.generation.upscalers import upscale
from library.generation.vae import VaeRunner
from library.sdxl.loading import SDXLModels
from library.sdxl.text_encoding import encode_prompts

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def open_image(image: ImageLike, what: str = "image") -> Image.Image:
    """A PIL image from a path or an image; UserError naming the file when it is missing or unreadable."""
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}. Check the path.")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im) or im
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {what} {path}: {e}. Give a PNG/JPEG/WebP image.") from None


def check_image_readable(image: ImageLike, what: str = "image") -> None:
    """Raise UserError now (before any denoising) for a missing or unreadable image file."""
    open_image(image, what)


def image_to_tensor(image: ImageLike, width: int, height: int, what: str = "image") -> torch.Tensor:
    """(3, height, width) RGB in [-1, 1]; the image is resized as it is (no crop, no preprocessing)."""
    im = open_image(image, what).convert("RGB")
    if im.size != (width, height):
        im = im.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def mask_to_latent(mask: ImageLike, width: int, height: int) -> torch.Tensor:
    """(1, height/8, width/8) in [0, 1], 1 where the image is regenerated (white in the mask)."""
    im = open_image(mask, "mask image").convert("L")
    im = im.resize((width // LATENT_FACTOR, height // LATENT_FACTOR), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def round_size(width: int, height: int, n_models: int = 0) -> tuple[int, int]:
    """A size rounded down to multiples of 8 (a warning names the value that changed); too small: UserError."""
    return checked_size("width", int(width), n_models), checked_size("height", int(height), n_models)


# ----------------------------------------------------------------------------------------------
# Model state
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _inference_state(models: SDXLModels, lllites: Sequence[Any]) -> Iterator[None]:
    """eval + no_grad, attach the LLLites; afterwards restore modes, multipliers, on/off and attachment."""
    modules = [models.unet, models.vae, models.text_encoder1, models.text_encoder2, *lllites]
    training = [m.training for m in modules]
    saved = [(n.multiplier, n.active, getattr(n, "_attached", False)) for n in lllites]
    for m in modules:
        m.eval()
    for n in lllites:
        n.attach()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was in zip(modules, training):
            m.train(was)
        for n, (mult, active, attached) in zip(lllites, saved):
            n.set_cond_image(None)
            n.set_multiplier(mult)
            n.set_active(active)
            if not attached:
                n.detach()




# ----------------------------------------------------------------------------------------------
# One generation call
# ----------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    width: int
    height: int
    steps: int
    strength: float | None  # None: txt2img from pure noise
    control: bool
    size_scale: float = 1.0  # explicit original sizes and crops are scaled by this (highres pass 1)


@dataclass
class _Conditioning:
    hidden: torch.Tensor  # (parts * b, tokens, dim), parts in CFG order
    pooled: torch.Tensor
    parts: int


@dataclass
class _Run:
    """Everything one :func:`generate` call shares between its passes and steps."""

    models: SDXLModels
    requests: list[GenerationRequest]
    lllites: list[Any]
    device: torch.device
    dtype: torch.dtype
    unet_dtype: torch.dtype
    generators: list[torch.Generator]
    windows: list[tuple[float, float]]  # (start, ratio) per LLLite model
    cond: _Conditioning | None = None
    n_passes: int = 1
    progress: bool = True
    on_step: Callable[[int, int, int], None] | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.requests[0]

    def autocast(self) -> ContextManager:
        if self.dtype == self.unet_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _passes(r: GenerationRequest) -> list[_Pass]:
    img2img = r.init_image is not None
    strength = (r.strength or DEFAULT_STRENGTH) if img2img else None
    if not r.highres_fix_scale:
        return [_Pass(r.width, r.height, r.steps, strength, True)]
    first = first_pass_size(r)
    first_strength = (r.highres_fix_strength or strength) if img2img else None
    return [
        _Pass(first[0], first[1], r.highres_fix_steps, first_strength, True, r.highres_fix_scale),
        _Pass(r.width, r.height, r.steps, r.strength or DEFAULT_STRENGTH, not r.highres_fix_disable_control_net),
    ]


def _encode_text(models: SDXLModels, requests: list[GenerationRequest], device, dtype) -> _Conditioning:
    r = requests[0]
    prompts = [q.prompt for q in requests]
    negatives = [q.negative_prompt or "" for q in requests]
    if r.negative_scale is not None:
        groups = [[""] * len(requests), prompts, negatives]
    elif r.scale != 1.0:
        groups = [negatives, prompts]
    else:
        groups = [prompts]
    hidden, pooled = encode_prompts(
        models.text_encoder1, models.text_encoder2, models.tokenizer1, models.tokenizer2,
        [p for g in groups for p in g],
        max_embeddings_multiples=r.max_embeddings_multiples, clip_skip=r.clip_skip, use_weighting=True,
    )
    return _Conditioning(hidden.to(device, dtype), pooled.to(device, dtype), len(groups))


def _time_ids(run: _Run, p: _Pass) -> torch.Tensor:
    """SDXL's added time ids per CFG part; the parts other than the prompt's take the negative original size."""

    def scaled(v: int | None) -> int | None:
        return None if v is None else int(v * p.size_scale + 0.5)

    def row(q: GenerationRequest, negative: bool) -> list[int]:
        oh, ow = scaled(q.original_height) or p.height, scaled(q.original_width) or p.width
        if negative:
            oh, ow = scaled(q.original_height_negative) or oh, scaled(q.original_width_negative) or ow
        return [oh, ow, scaled(q.crop_top) or 0, scaled(q.crop_left) or 0, p.height, p.width]

    parts = run.cond.parts
    cond_part = 1 if parts > 1 else 0  # CFG order: (negative, prompt) or (empty, prompt, negative)
    rows = [row(q, part != cond_part) for part in range(parts) for q in run.requests]
    return torch.tensor(rows, device=run.device, dtype=run.dtype)


def _combine(out: torch.Tensor, r: GenerationRequest, parts: int) -> torch.Tensor:
    if parts == 1:
        return out
    if parts == 2:
        uncond, cond = out.chunk(2)
        return uncond + r.scale * (cond - uncond)
    empty, cond, negative = out.chunk(3)
    return empty + r.scale * (cond - empty) - r.negative_scale * (negative - empty)


def _noise(generators: list[torch.Generator], width: int, height: int, channels: int) -> torch.Tensor:
    shape = (channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def _first_latents(run: _Run, scheduler, p: _Pass, clean: torch.Tensor | None):
    """(latents, timesteps, steps run, noise): pure noise, or ``clean`` noised to the strength's timestep."""
    timesteps = scheduler.timesteps
    noise = _noise(run.generators, p.width, p.height, run.models.unet.config.in_channels).to(run.device)
    if clean is not None and p.strength is not None and p.strength < 1.0:
        n_run = min(p.steps, max(1, int(p.steps * p.strength)))
        begin = (p.steps - n_run) * scheduler.order
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        return scheduler.add_noise(clean, noise, timesteps[:1]), timesteps, n_run, noise
    return noise * scheduler.init_noise_sigma, timesteps, p.steps, noise


def _unet_eps(run: _Run, scheduler, latents: torch.Tensor, t, added: dict) -> torch.Tensor:
    """The CFG-combined noise prediction for ``latents`` at timestep ``t``."""
    cond = run.cond
    x = scheduler.scale_model_input(torch.cat([latents] * cond.parts), t)
    with run.autocast():
        out = run.models.unet(x.to(run.dtype), t, encoder_hidden_states=cond.hidden, added_cond_kwargs=added).sample
    return _combine(out.float(), run.request, cond.parts)


def _denoise(run: _Run, p: _Pass, pass_index: int, clean: torch.Tensor | None, keep: torch.Tensor | None,
             mask: torch.Tensor | None) -> torch.Tensor:
    """One sampling pass from ``clean`` (img2img) or noise; returns the denoised latents (fp32).

    With a mask, the unmasked region is taken from ``keep`` (the init image), noised to each next step.
    """
    r = run.request
    scheduler = build_scheduler(r.sampler, run.models.scheduler_config)
    scheduler.set_timesteps(p.steps, device=run.device)
    latents, timesteps, n_run, noise = _first_latents(run, scheduler, p, clean)
    growth = GradualLatentRun(r.gradual_latent, latents.shape[-2:]) if r.gradual_latent.enabled else None
    if growth is not None:
        latents = growth.start(latents)
    added = {"text_embeds": run.cond.pooled, "time_ids": _time_ids(run, p)}
    step_kwargs = {"generator": run.generators} if step_accepts_generator(scheduler) else {}
    desc = f"pass {pass_index + 1}" if run.n_passes > 1 else "sampling"
    t_values = timesteps.tolist() if growth is not None else None  # one host copy per pass, not one per step
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not run.progress, leave=False)):
        step = min(n_run - 1, i * n_run // len(timesteps))
        for net, (start, end) in zip(run.lllites, run.windows):
            net.set_active(p.control and start <= step / n_run < end)
        if run.on_step is not None:
            run.on_step(pass_index, step, i)
        eps = _unet_eps(run, scheduler, latents, t, added)
        if growth is not None:
            latents = growth.step(scheduler, eps, t, latents, growth.growth_before_step(t_values[i]), run.generators)
        else:
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        if mask is not None and keep is not None:
            original = keep
            if i < len(timesteps) - 1:
                original = scheduler.add_noise(keep, noise, timesteps[i + 1: i + 2])
            latents = (1.0 - mask) * original + mask * latents
    return growth.finish(latents) if growth is not None else latents


def _set_guides(lllites: Sequence[Any], requests: list[GenerationRequest], width: int, height: int, device) -> None:
    """Embed each model's guide images at this pass's size: once per pass, not per step."""
    for m, net in enumerate(lllites):
        batch = torch.stack([image_to_tensor(q.guide_images[m], width, height, "guide image") for q in requests])
        net.set_cond_image(batch.to(device))


def _pass_inputs(run: _Run, p: _Pass, latents: torch.Tensor | None, vae: VaeRunner):
    """(start latents, init latents, mask) of a pass: the init image's, or the upscaled previous pass's."""
    r, requests, device = run.request, run.requests, run.device
    init = None  # the init image's latents at this pass's size
    if r.init_image is not None:
        pixels = torch.stack([image_to_tensor(q.init_image, p.width, p.height, "init image") for q in requests])
        init = vae.encode(pixels).to(device)
    start = init
    if latents is not None:  # highres fix: the second pass starts from the upscaled first one
        name = r.highres_fix_upscaler or ("latent_bilinear" if r.highres_fix_latents_upscaling else None)
        start = upscale(name, r.highres_fix_upscaler_args, latents, (p.height, p.width), vae).to(device)
    mask = None
    if r.mask is not None:
        mask = torch.stack([mask_to_latent(q.mask, p.width, p.height) for q in requests]).to(device)
    return start, init, mask


def _draw_passes(run: _Run, vae: VaeRunner, first_pass: Callable[[list[Image.Image]], None] | None) -> torch.Tensor:
    passes = _passes(run.request)
    run.n_passes = len(passes)
    latents = None
    for index, p in enumerate(passes):
        start, init, mask = _pass_inputs(run, p, latents, vae)
        if p.control and run.lllites:
            _set_guides(run.lllites, run.requests, p.width, p.height, run.device)
        latents = _denoise(run, p, index, start, init, mask)
        if first_pass is not None and index == 0 and len(passes) > 1:
            first_pass(tensor_to_images(vae.decode(latents)))
    return latents


def generate(
    models: SDXLModels,
    lllites: Sequence[Any],
    request: GenerationRequest | Sequence[GenerationRequest],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    vae_batch_size: float | None = None,
    vae_slices: int | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    first_pass: Callable[[list[Image.Image]], None] | None = None,
) -> list[Image.Image]:
    """Draw one image per request, as one batch, with the models and LLLite networks already in memory.

    Args:
        models: the base model (U-Net, VAE, text encoders, tokenizers, scheduler config).
        lllites: ControlNetLLLite networks created on ``models.unet``; attached for the call if they are not.
        request: one request, or several that agree on everything but per-image fields (:func:`batch_key`).
        device: where inputs go; default the U-Net's device. Nothing is moved to it.
        dtype: compute dtype; default the U-Net's. A different one runs the U-Net under autocast.
        progress: show a tqdm bar per pass.
        vae_batch_size: images per VAE call (default: all); below 1, that share of the batch.
        vae_slices: decode and encode each image in this many horizontal strips (less VAE memory).
        on_step: called as ``on_step(pass_index, step, evaluation_index)`` before every U-Net call,
            after the LLLite windows are applied (for progress reports and tests).
        first_pass: with the highres fix, called with the first pass's decoded images.

    Returns:
        PIL images; ``image.info["seed"]`` holds the seed used.
    """
    lllites = list(lllites)
    requests = _checked_requests(request, len(lllites))
    r = requests[0]
    seeds = [q.seed if q.seed is not None else random.randint(0, 2**32 - 1) for q in requests]
    multipliers, starts, ratios = control_settings(r, len(lllites))
    unet_dtype = module_dtype(models.unet)
    run = _Run(
        models, requests, lllites, device=torch.device(device) if device is not None else module_device(models.unet),
        dtype=dtype or unet_dtype, unet_dtype=unet_dtype,
        generators=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds], windows=list(zip(starts, ratios)),
        progress=progress, on_step=on_step,
    )
    vae = VaeRunner(models.vae, vae_batch_size, vae_slices)
    with _inference_state(models, lllites), deep_shrink(models.unet, r.deep_shrink):
        for net, mult in zip(lllites, multipliers):
            net.set_multiplier(mult)
        run.cond = _encode_text(models, requests, run.device, run.dtype)
        images = tensor_to_images(vae.decode(_draw_passes(run, vae, first_pass)))
    for im, seed in zip(images, seeds):
        im.info["seed"] = seed
    return images


def _checked_requests(request: GenerationRequest | Sequence[GenerationRequest], n_models: int) -> list[GenerationRequest]:
    """The batch's requests, each checked, with the size rounded down to multiples of 8."""
    requests = [request] if isinstance(request, GenerationRequest) else list(request)
    if not requests:
        raise ValueError("generate() needs at least one request")
    if len({batch_key(r) for r in requests}) > 1:
        raise ValueError("the requests of one batch must agree on everything but per-image fields (see batch_key)")
    for q in requests:
        validate_request(q, n_models)
        _check_guides(q, n_models)
    width, height = round_size(requests[0].width, requests[0].height, n_models)
    return [dataclasses.replace(q, width=width, height=height) for q in requests]


def _check_guides(q: GenerationRequest, n_models: int) -> None:
    if n_models and (len(q.guide_images) < n_models or any(g is None for g in q.guide_images[:n_models])):
        raise UserError(
            f"{n_models} LLLite model(s) but {len([g for g in q.guide_images if g is not None])} guide image(s) "
            f"for prompt {q.prompt[:40]!r}: give one guide image per model (--guide_image_path / --cn)"
        )


def _name(x: Any) -> str | None:
    return None if x is None else (f"<{type(x).__name__}>" if isinstance(x, Image.Image) else str(x))


def _feature_metadata(r: GenerationRequest) -> dict[str, Any]:
    """The highres fix, Deep Shrink and Gradual Latent settings in use, for the PNG."""
    meta: dict[str, Any] = {}
    if r.highres_fix_scale:
        meta.update(highres_fix_scale=r.highres_fix_scale, highres_fix_steps=r.highres_fix_steps,
                    highres_fix_strength=r.highres_fix_strength,
                    highres_fix_upscaler=r.highres_fix_upscaler or ("latent_bilinear" if r.highres_fix_latents_upscaling
                                                                    else None),
                    highres_fix_upscaler_args=dict(r.highres_fix_upscaler_args) or None,
                    highres_fix_disable_control_net=r.highres_fix_disable_control_net or None)
    if r.deep_shrink.enabled:
        meta["deep_shrink"] = dataclasses.asdict(r.deep_shrink)
    if r.gradual_latent.enabled:
        meta["gradual_latent"] = dataclasses.asdict(r.gradual_latent)
    return meta


def request_metadata(request: GenerationRequest, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """The parameters of a request as a flat dict for PNG metadata (see library.generation.png_metadata)."""
    r = request
    negative_size = (r.original_width_negative, r.original_height_negative)
    meta: dict[str, Any] = {
        "prompt": r.prompt, "negative_prompt": r.negative_prompt, "clip_prompt": r.clip_prompt, "steps": r.steps,
        "sampler": r.sampler, "scale": r.scale, "negative_scale": r.negative_scale,
        "seed": seed if seed is not None else r.seed, "size": f"{r.width}x{r.height}", "width": r.width,
        "height": r.height, "clip_skip": r.clip_skip, "max_embeddings_multiples": r.max_embeddings_multiples,
        "strength": (r.strength or DEFAULT_STRENGTH) if r.init_image is not None or r.highres_fix_scale else None,
        "init_image": _name(r.init_image), "mask": _name(r.mask),
        "original_size": f"{r.original_width}x{r.original_height}" if r.original_width or r.original_height else None,
        "original_size_negative": "{}x{}".format(*negative_size) if any(negative_size) else None,
        "crop": f"{r.crop_top},{r.crop_left}" if r.crop_top or r.crop_left else None,
        "guide_images": [_name(g) for g in r.guide_images], "lllite_multipliers": r.control_multipliers,
        "lllite_starts": r.control_starts, "lllite_ratios": r.control_ratios,
        "network_multipliers": r.network_multipliers,
    }
    meta.update(_feature_metadata(r))
    meta.update(extra)
    return {k: v for k, v in meta.items() if v is not None}
