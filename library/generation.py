"""SDXL image generation with any number of ControlNet-LLLite models, shared by ``sdxl_gen_img.py`` and training.

:func:`generate` draws images with models that are already in memory (the trainer calls it for
sample images), so it loads nothing and leaves every model as it found it (device, dtype, train/eval
mode, LLLite multiplier/active state). The loop is the plain diffusers recipe::

    scheduler from the model's config -> set_timesteps -> seeded latents (CPU generators)
    -> per step: switch each LLLite on/off for its window, one CFG-batched U-Net call, scheduler.step
    -> VAE decode (in fp32 where the fp16 SDXL VAE would overflow)

Options on top: img2img (``init_image`` + ``strength``), latent-blend inpainting (``mask``),
a two-pass highres fix, per-model LLLite multipliers and step windows.

Definitions used here (also in docs/generation.md):

* CFG: ``eps = uncond + scale * (cond - uncond)``, where uncond is the negative prompt.
  With ``negative_scale`` the batch has three parts, an empty prompt ``e``, the prompt ``c`` and
  the negative prompt ``n``: ``eps = e + scale * (c - e) - negative_scale * (n - e)``, so the push
  away from the negative prompt has its own strength.
* LLLite windows: denoising step ``s`` (0-based) of ``n`` steps run in a pass is controlled by a model
  when ``start <= s / n < ratio``. Second-order samplers (heun, dpm_2) evaluate the U-Net twice per
  step; both evaluations belong to the same step.
* Inpainting (standard 4-channel U-Net): white mask pixels are regenerated. After every step the
  unmasked part of the latents is replaced by the original latents noised to the next timestep.
* Highres fix: pass 1 at ``highres_fix_scale`` of the final size with ``highres_fix_steps`` steps,
  then upscale (pixels, re-encoded; or latents) and run img2img at the final size with ``steps``
  steps and ``highres_fix_strength``. Guide images are resized for each pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from library.errors import UserError
from library.model_loading import SDXLModels
from library.prompt_lines import PromptSpec
from library.samplers import DEFAULT_SAMPLER, build_scheduler, normalize_sampler_name, step_accepts_generator
from library.text_encoding import encode_prompts

logger = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, Image.Image]
LATENT_FACTOR = 8  # SDXL's VAE downsamples by 8
DEFAULT_STRENGTH = 0.8  # img2img / inpainting strength when none is given


@dataclass
class GenerationRequest:
    """One image to draw (a batch is a list of requests that agree on everything but per-image fields).

    Per-image fields: prompt, negative_prompt, seed, guide_images, init_image, mask, original size, crop.
    Guide images are given one per LLLite model, in the order of the ``lllites`` list.
    """

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 28
    scale: float = 7.0
    negative_scale: float | None = None
    seed: int | None = None  # None: a random seed (stored in the image's info["seed"])
    sampler: str = DEFAULT_SAMPLER
    # LLLite, one entry per model
    guide_images: list[ImageLike | None] = field(default_factory=list)
    control_multipliers: list[float] | None = None  # default 1.0 each
    control_starts: list[float] | None = None  # fraction of the steps before the model switches on (default 0)
    control_ratios: list[float] | None = None  # fraction of the steps, from the start, it stays on (default 1)
    # img2img / inpainting
    init_image: ImageLike | None = None
    strength: float | None = None  # default DEFAULT_STRENGTH
    mask: ImageLike | None = None  # white = regenerate
    # SDXL size conditioning; None: the final image size / 0
    original_width: int | None = None
    original_height: int | None = None
    crop_top: int = 0
    crop_left: int = 0
    # text
    clip_skip: int | None = None
    max_embeddings_multiples: int = 1
    # highres fix
    highres_fix_scale: float | None = None
    highres_fix_steps: int = 28
    highres_fix_strength: float = 0.7
    highres_fix_disable_control_net: bool = False
    highres_fix_latents_upscaling: bool = False
    # LoRA multipliers from a prompt line's --am; applied by whoever merged the LoRAs (the CLI)
    network_multipliers: list[float] | None = None


# Fields that may differ between the images of one batch.
PER_IMAGE_FIELDS = frozenset(
    {"prompt", "negative_prompt", "seed", "guide_images", "init_image", "mask", "original_width",
     "original_height", "crop_top", "crop_left"}
)


def batch_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can be drawn in one batch."""
    shared = tuple(
        (f.name, _hashable(getattr(request, f.name))) for f in dataclasses.fields(request) if f.name not in PER_IMAGE_FIELDS
    )
    return shared + (
        ("n_guides", len(request.guide_images)),
        ("img2img", request.init_image is not None),
        ("mask", request.mask is not None),
    )


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def request_from_prompt_spec(spec: PromptSpec, defaults: GenerationRequest) -> GenerationRequest:
    """``defaults`` with every option that a prompt line (or sample-prompt entry) gives applied.

    ``--d`` gives the seed (the first one when it is a list), ``--cn`` the guide images (one per model),
    ``--ss`` the sampler, ``--am`` the LoRA multipliers. Unset options keep the defaults.
    """
    changes: dict[str, Any] = {"prompt": spec.prompt}
    for spec_field, req_field in (
        ("negative_prompt", "negative_prompt"), ("width", "width"), ("height", "height"), ("steps", "steps"),
        ("scale", "scale"), ("negative_scale", "negative_scale"), ("strength", "strength"),
        ("original_width", "original_width"), ("original_height", "original_height"),
        ("crop_top", "crop_top"), ("crop_left", "crop_left"), ("network_multipliers", "network_multipliers"),
    ):
        value = getattr(spec, spec_field)
        if value is not None:
            changes[req_field] = value
    if spec.seeds:
        changes["seed"] = spec.seeds[0]
    if spec.sampler is not None:
        changes["sampler"] = normalize_sampler_name(spec.sampler)
    if spec.guide_images:
        changes["guide_images"] = list(spec.guide_images)
    return dataclasses.replace(defaults, **changes)


# ----------------------------------------------------------------------------------------------
# Sizes and images
# ----------------------------------------------------------------------------------------------


def round_size(width: int, height: int, what: str = "size") -> tuple[int, int]:
    """Round a size down to multiples of 8 (what the VAE needs), with a warning when it changes."""
    w, h = max(LATENT_FACTOR, int(width) // LATENT_FACTOR * LATENT_FACTOR), max(
        LATENT_FACTOR, int(height) // LATENT_FACTOR * LATENT_FACTOR
    )
    if (w, h) != (int(width), int(height)):
        logger.warning("%s %dx%d is not a multiple of 8: using %dx%d", what, width, height, w, h)
    return w, h


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


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class _Vae:
    """Encode/decode with the model's VAE, in fp32 where fp16 would overflow (SDXL's original VAE)."""

    def __init__(self, vae, batch_size: int | None):
        self.vae = vae
        self.batch_size = batch_size
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

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        wanted = bool(getattr(self.vae.config, "force_upcast", False))
        out = self._batched(fn, x, wanted)
        if not torch.isfinite(out).all() and _module_dtype(self.vae) == torch.float16 and not wanted:
            logger.warning("the VAE gave NaN/inf in fp16: running it again in fp32 (use --no_half_vae to skip this)")
            out = self._batched(fn, x, True)
        return out

    def _batched(self, fn, x: torch.Tensor, upcast: bool) -> torch.Tensor:
        n = self.batch_size or x.shape[0]
        with self._precision(upcast) as dtype:
            device = _module_device(self.vae)
            return torch.cat([fn(x[i : i + n].to(device, dtype)).float() for i in range(0, x.shape[0], n)])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run(lambda z: self.vae.decode(z / self.scaling + self.shift).sample, latents)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(lambda x: (self.vae.encode(x).latent_dist.mean - self.shift) * self.scaling, pixels)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    width: int
    height: int
    steps: int
    strength: float | None  # None: txt2img from pure noise
    control: bool


@dataclass
class _Conditioning:
    hidden: torch.Tensor  # (parts * b, tokens, dim), parts in CFG order
    pooled: torch.Tensor
    parts: int


def _check_requests(requests: list[GenerationRequest], n_models: int) -> None:
    if not requests:
        raise ValueError("generate() needs at least one request")
    keys = {batch_key(r) for r in requests}
    if len(keys) > 1:
        raise ValueError("the requests of one batch must agree on everything but per-image fields (see batch_key)")
    r = requests[0]
    normalize_sampler_name(r.sampler)
    if r.steps < 1:
        raise UserError(f"steps must be at least 1, got {r.steps}")
    if r.mask is not None and r.init_image is None:
        raise UserError("a mask (--mask_path) needs the image to inpaint (--image_path)")
    if r.strength is not None and not 0.0 < r.strength <= 1.0:
        raise UserError(f"strength must be in (0, 1], got {r.strength}")
    if r.highres_fix_scale is not None and not 0.0 < r.highres_fix_scale < 1.0:
        raise UserError(f"highres_fix_scale is the first pass's fraction of the final size: use 0 < scale < 1, got {r.highres_fix_scale}")
    for name in ("control_multipliers", "control_starts", "control_ratios"):
        values = getattr(r, name)
        if values is not None and n_models and len(values) not in (1, n_models):
            raise UserError(f"{name} has {len(values)} values for {n_models} LLLite models: give one per model")
        if values is not None and name != "control_multipliers" and any(not 0.0 <= v <= 1.0 for v in values):
            raise UserError(f"{name} are fractions of the steps: use values from 0 to 1, got {values}")
    for req in requests:
        if n_models and (len(req.guide_images) < n_models or any(g is None for g in req.guide_images[:n_models])):
            raise UserError(
                f"{n_models} LLLite model(s) but {len([g for g in req.guide_images if g is not None])} guide image(s) "
                f"for prompt {req.prompt[:40]!r}: give one guide image per model (--guide_image_path / --cn)"
            )


def _per_model(values: list[float] | None, n: int, default: float) -> list[float]:
    if not values:
        return [default] * n
    return list(values) * n if len(values) == 1 else list(values)[:n]


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


def _time_ids(requests: list[GenerationRequest], p: _Pass, parts: int, device, dtype) -> torch.Tensor:
    rows = [
        [q.original_height or q.height, q.original_width or q.width, q.crop_top, q.crop_left, p.height, p.width]
        for q in requests
    ]
    return torch.tensor(rows * parts, device=device, dtype=dtype)


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


def _denoise(
    ctx: dict, p: _Pass, pass_index: int, clean: torch.Tensor | None, keep: torch.Tensor | None,
    mask: torch.Tensor | None,
    generators: list[torch.Generator], on_step: Callable[[int, int, int], None] | None, progress: bool,
) -> torch.Tensor:
    """One sampling pass from ``clean`` (img2img) or noise; returns the denoised latents (fp32).

    With a mask, the unmasked region is taken from ``keep`` (the init image), noised to each next step.
    """
    models: SDXLModels = ctx["models"]
    r: GenerationRequest = ctx["requests"][0]
    device, dtype, cond = ctx["device"], ctx["dtype"], ctx["cond"]
    unet = models.unet

    scheduler = build_scheduler(r.sampler, models.scheduler_config)
    scheduler.set_timesteps(p.steps, device=device)
    timesteps = scheduler.timesteps
    noise = _noise(generators, p.width, p.height, unet.config.in_channels).to(device)
    if clean is not None and p.strength is not None and p.strength < 1.0:
        n_run = min(p.steps, max(1, int(p.steps * p.strength)))
        begin = (p.steps - n_run) * scheduler.order
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        latents = scheduler.add_noise(clean, noise, timesteps[:1])
    else:
        n_run = p.steps
        latents = noise * scheduler.init_noise_sigma

    time_ids = _time_ids(ctx["requests"], p, cond.parts, device, dtype)
    added = {"text_embeds": cond.pooled, "time_ids": time_ids}
    windows = ctx["windows"]
    step_kwargs = {"generator": generators} if step_accepts_generator(scheduler) else {}
    bar = tqdm(timesteps, desc=f"pass {pass_index + 1}" if ctx["n_passes"] > 1 else "sampling", disable=not progress,
               leave=False)
    for i, t in enumerate(bar):
        step = min(n_run - 1, i * n_run // len(timesteps))
        for net, (start, end) in zip(ctx["lllites"], windows):
            net.set_active(p.control and start <= step / n_run < end)
        if on_step is not None:
            on_step(pass_index, step, i)
        x = scheduler.scale_model_input(torch.cat([latents] * cond.parts), t)
        with ctx["autocast"]():
            out = unet(x.to(dtype), t, encoder_hidden_states=cond.hidden, added_cond_kwargs=added).sample
        latents = scheduler.step(_combine(out.float(), r, cond.parts), t, latents, **step_kwargs).prev_sample
        if mask is not None and keep is not None:
            original = keep
            if i < len(timesteps) - 1:
                original = scheduler.add_noise(keep, noise, timesteps[i + 1 : i + 2])
            latents = (1.0 - mask) * original + mask * latents
    return latents


def _set_guides(lllites: Sequence[Any], requests: list[GenerationRequest], width: int, height: int, device) -> None:
    """Embed each model's guide images at this pass's size: once per pass, not per step."""
    for m, net in enumerate(lllites):
        batch = torch.stack([image_to_tensor(q.guide_images[m], width, height, "guide image") for q in requests])
        net.set_cond_image(batch.to(device))


def generate(
    models: SDXLModels,
    lllites: Sequence[Any],
    request: GenerationRequest | Sequence[GenerationRequest],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    vae_batch_size: int | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> list[Image.Image]:
    """Draw one image per request, as one batch, with the models and LLLite networks already in memory.

    Args:
        models: the base model (U-Net, VAE, text encoders, tokenizers, scheduler config).
        lllites: ControlNetLLLite networks created on ``models.unet``; attached for the call if they are not.
        request: one request, or several that agree on everything but per-image fields (:func:`batch_key`).
        device: where inputs go; default the U-Net's device. Nothing is moved to it.
        dtype: compute dtype; default the U-Net's. A different one runs the U-Net under autocast.
        progress: show a tqdm bar per pass.
        vae_batch_size: images per VAE decode call (default: all).
        on_step: called as ``on_step(pass_index, step, evaluation_index)`` before every U-Net call,
            after the LLLite windows are applied (for progress reports and tests).

    Returns:
        PIL images; ``image.info["seed"]`` holds the seed used.
    """
    requests = [request] if isinstance(request, GenerationRequest) else list(request)
    lllites = list(lllites)
    _check_requests(requests, len(lllites))
    r = requests[0]
    width, height = round_size(r.width, r.height)
    if (width, height) != (r.width, r.height):
        requests = [dataclasses.replace(q, width=width, height=height) for q in requests]
        r = requests[0]
    unet_dtype = _module_dtype(models.unet)
    device = torch.device(device) if device is not None else _module_device(models.unet)
    dtype = dtype or unet_dtype

    def autocast():
        if dtype == unet_dtype:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    seeds = [q.seed if q.seed is not None else random.randint(0, 2**32 - 1) for q in requests]
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    init_strength = (r.strength or DEFAULT_STRENGTH) if r.init_image is not None else None
    if r.highres_fix_scale:
        first = round_size(width * r.highres_fix_scale, height * r.highres_fix_scale, "highres fix first pass size")
        passes = [
            _Pass(first[0], first[1], r.highres_fix_steps, init_strength, True),
            _Pass(width, height, r.steps, r.highres_fix_strength, not r.highres_fix_disable_control_net),
        ]
    else:
        passes = [_Pass(width, height, r.steps, init_strength, True)]

    n = len(lllites)
    starts = _per_model(r.control_starts, n, 0.0)
    ratios = _per_model(r.control_ratios, n, 1.0)
    multipliers = _per_model(r.control_multipliers, n, 1.0)
    vae = _Vae(models.vae, vae_batch_size)

    with _inference_state(models, lllites):
        for net, mult in zip(lllites, multipliers):
            net.set_multiplier(mult)
        ctx = {
            "models": models, "requests": requests, "device": device, "dtype": dtype, "autocast": autocast,
            "cond": _encode_text(models, requests, device, dtype), "lllites": lllites,
            "windows": list(zip(starts, ratios)), "n_passes": len(passes),
        }
        latents = None
        for index, p in enumerate(passes):
            init = None  # the init image's latents at this pass's size
            if r.init_image is not None:
                pixels = torch.stack([image_to_tensor(q.init_image, p.width, p.height, "init image") for q in requests])
                init = vae.encode(pixels).to(device)
            start = init
            if latents is not None:  # highres fix: the second pass starts from the upscaled first one
                if r.highres_fix_latents_upscaling:
                    size = (p.height // LATENT_FACTOR, p.width // LATENT_FACTOR)
                    start = F.interpolate(latents, size=size, mode="bilinear", align_corners=False)
                else:
                    pixels = F.interpolate(vae.decode(latents), size=(p.height, p.width), mode="bicubic",
                                           align_corners=False).clamp(-1, 1)
                    start = vae.encode(pixels).to(device)
            mask = None
            if r.mask is not None:
                mask = torch.stack([mask_to_latent(q.mask, p.width, p.height) for q in requests]).to(device)
            if p.control and lllites:
                _set_guides(lllites, requests, p.width, p.height, device)
            latents = _denoise(ctx, p, index, start, init, mask, generators, on_step, progress)
        images = tensor_to_images(vae.decode(latents))
    for im, seed in zip(images, seeds):
        im.info["seed"] = seed
    return images


def request_metadata(request: GenerationRequest, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """The parameters of a request as a flat dict for PNG metadata (see library.png_metadata)."""
    r = request

    def name(x):
        return None if x is None else (f"<{type(x).__name__}>" if isinstance(x, Image.Image) else str(x))

    meta: dict[str, Any] = {
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "steps": r.steps,
        "sampler": r.sampler,
        "scale": r.scale,
        "negative_scale": r.negative_scale,
        "seed": seed if seed is not None else r.seed,
        "size": f"{r.width}x{r.height}",
        "width": r.width,
        "height": r.height,
        "clip_skip": r.clip_skip,
        "max_embeddings_multiples": r.max_embeddings_multiples,
        "strength": (r.strength or DEFAULT_STRENGTH) if r.init_image is not None else None,
        "init_image": name(r.init_image),
        "mask": name(r.mask),
        "original_size": f"{r.original_width}x{r.original_height}" if r.original_width or r.original_height else None,
        "crop": f"{r.crop_top},{r.crop_left}" if r.crop_top or r.crop_left else None,
        "guide_images": [name(g) for g in r.guide_images],
        "lllite_multipliers": r.control_multipliers,
        "lllite_starts": r.control_starts,
        "lllite_ratios": r.control_ratios,
        "network_multipliers": r.network_multipliers,
    }
    if r.highres_fix_scale:
        meta.update(highres_fix_scale=r.highres_fix_scale, highres_fix_steps=r.highres_fix_steps,
                    highres_fix_strength=r.highres_fix_strength,
                    highres_fix_disable_control_net=r.highres_fix_disable_control_net)
    meta.update(extra)
    return {k: v for k, v in meta.items() if v is not None}
