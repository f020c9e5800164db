"""What one image to draw is: :class:`GenerationRequest`, its Deep Shrink / Gradual Latent settings, and its rules.

This module imports no torch, diffusers or PIL, so that ``sdxl_gen_img.py`` can check every option
and every prompt line before anything heavy loads. The rules live here once and serve three
callers: the command-line options (``library/generation/options.py``), prompt lines
(``library/generation/prompt_lines.py``) and :func:`validate_request`, which :func:`library.generation.pipeline.generate`
runs for every caller (the trainer's sample images too).

Definitions (also in docs/generation.md):

* Deep Shrink (sd-scripts' ``--ds_*``): while the timestep ``t >= timesteps_1``, the U-Net's hidden
  state is resized by ``ratio`` (bicubic) before input block ``depth_1`` (the original SDXL layout
  counts 9 input blocks: 0 = conv_in, 1-2 the first level's resnets, 3 its downsampler, ...); while
  ``timesteps_2 <= t < timesteps_1`` the same happens before block ``depth_2``. The decoder resizes
  it back to each skip connection's size.
* Gradual Latent (``--gradual_latent_*``): sampling starts on latents resized by ``ratio``; once
  ``t < timesteps``, every ``every_n_steps`` steps the ratio grows by ``ratio_step`` (up to 1) and
  the latents are resized (bicubic, optionally unsharp-masked) inside the ancestral Euler step, which
  then adds fresh noise at the new size scaled by ``s_noise``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence, Union

from library.cli import Limit
from library.errors import UserError
from library.sdxl import CLIP_SKIP_MAX
from library.generation.samplers import (
    ANCESTRAL_EULER,
    DEFAULT_SAMPLER,
    normalize_sampler_name,
)

if TYPE_CHECKING:
    from PIL import Image

    from library.generation.prompt_lines import PromptSpec

logger = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, "Image.Image"]
LATENT_FACTOR = 8  # SDXL's VAE downsamples by 8
DEFAULT_STRENGTH = 0.8  # img2img strength when none is given (sd-scripts' default)
SMALLEST_SIZE = LATENT_FACTOR  # one latent pixel
# LLLite's deepest conditioning stack downsamples the guide by 32 (4 x 4 x 2): a smaller guide has no pixels left.
SMALLEST_SIZE_LLLITE = 32
SDXL_INPUT_BLOCKS = 9  # conv_in + 3 levels of (2 resnets + downsampler), the last without a downsampler
DEFAULT_DS_DEPTH = 3  # what a prompt line's Deep Shrink options use when no depth is given (as sd-scripts)
DEFAULT_GL_TIMESTEPS = 650  # the same for Gradual Latent
MAX_SEED = 2**64 - 1


# ----------------------------------------------------------------------------------------------
# Value limits: one table for options, prompt lines and requests
# ----------------------------------------------------------------------------------------------


FRACTION = Limit(0, 1)
LIMITS: dict[str, Limit] = {
    "count": Limit(1),  # steps, images, batches, chunks
    "strength": Limit(0, 1, low_open=True),
    "highres_fix_scale": Limit(0, 1, low_open=True, high_open=True),
    "size_conditioning": Limit(1),
    "crop": Limit(0),
    "fraction": FRACTION,
    "number": Limit(),
    "seed": Limit(0, MAX_SEED),
    "ds_depth": Limit(0, SDXL_INPUT_BLOCKS - 1),
    "timesteps": Limit(0, 1000),
    "shrink_ratio": Limit(0, 1, low_open=True, high_open=True),
    "ratio_step": Limit(0, 1, low_open=True),
    "s_noise": Limit(0),
    "vae_slices": Limit(2),
    "vae_batch_size": Limit(0, low_open=True),
    "clip_skip": Limit(1, CLIP_SKIP_MAX),
}


def check_limit(label: str, value: float | None, kind: str, where: str = "") -> None:
    """Refuse ``value`` outside ``LIMITS[kind]``; the message names ``label``, the value and the range."""
    LIMITS[kind].check(f"{where}{label}", value)


def smallest_size(n_models: int) -> int:
    return SMALLEST_SIZE_LLLITE if n_models else SMALLEST_SIZE


def checked_size(label: str, value: int, n_models: int, where: str = "") -> int:
    """A width or height rounded down to a multiple of 8, or a UserError below the smallest size."""
    low = smallest_size(n_models)
    if value < low:
        why = " with LLLite models (their guide embedding downsamples by 32)" if n_models else ""
        raise UserError(f"{where}{label} {value} is too small: the smallest size is {low} px{why}")
    rounded = value // LATENT_FACTOR * LATENT_FACTOR
    if rounded != value:
        logger.warning("%s%s %d is not a multiple of 8: using %d", where, label, value, rounded)
    return rounded


# ----------------------------------------------------------------------------------------------
# Deep Shrink, Gradual Latent, highres fix upscaler
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeepShrink:
    """sd-scripts' Deep Shrink (see the module docstring); off while ``depth_1`` is None."""

    SWITCH: ClassVar[str] = "depth_1"  # the setting that switches it on
    LINE_DEFAULT: ClassVar[int] = DEFAULT_DS_DEPTH  # the switch's value when a prompt line gives only the others

    depth_1: int | None = None
    timesteps_1: int = 650
    depth_2: int | None = None
    timesteps_2: int = 650
    ratio: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.depth_1 is not None

    def depth_at(self, timestep: float) -> int | None:
        """The input block shrunk at ``timestep``, or None."""
        if self.depth_1 is None:
            return None
        if timestep >= self.timesteps_1:
            return self.depth_1
        if self.depth_2 is not None and timestep >= self.timesteps_2:
            return self.depth_2
        return None


@dataclass(frozen=True)
class Unsharp:
    """Gradual Latent's unsharp mask: ``x + strength * (x - gaussian_blur(x, ksize, sigma))``."""

    ksize: int
    sigma: float
    strength: float
    target_x: bool = True  # True: sharpen the stepped latents; False: the input latents before the step

    @classmethod
    def parse(cls, text: str) -> Unsharp:
        """``"ksize,sigma,strength[,target_x]"``, e.g. ``3,0.5,0.5,1``; ValueError saying what is allowed."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            ksize, sigma, strength = int(parts[0]), float(parts[1]), float(parts[2])
            target = parts[3] if len(parts) == 4 else "1"
            if target not in ("0", "1") or ksize < 1 or ksize % 2 == 0 or not sigma > 0 or not math.isfinite(strength):
                raise ValueError
        except ValueError:
            raise ValueError("give ksize,sigma,strength[,target_x] with an odd ksize >= 1, sigma > 0 and target_x "
                             "0 or 1, e.g. 3,0.5,0.5,1") from None
        return cls(ksize, sigma, strength, target == "1")


@dataclass(frozen=True)
class GradualLatent:
    """sd-scripts' Gradual Latent (see the module docstring); off while ``timesteps`` is None."""

    SWITCH: ClassVar[str] = "timesteps"
    LINE_DEFAULT: ClassVar[int] = DEFAULT_GL_TIMESTEPS

    timesteps: int | None = None
    ratio: float = 0.5
    ratio_step: float = 0.125
    every_n_steps: int = 3
    s_noise: float = 1.0
    unsharp: Unsharp | None = None

    @property
    def enabled(self) -> bool:
        return self.timesteps is not None


# ----------------------------------------------------------------------------------------------
# The request
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One image to draw (a batch is a list of requests that agree on everything but per-image fields).

    Frozen: the options' default request is shared by every prompt line, so a change is a new request
    (``dataclasses.replace``).

    Per-image fields: prompt, negative_prompt, seed, guide_images, init_image, mask, original sizes,
    crop, clip_prompt. Guide images are given one per LLLite model, in the order of the ``lllites`` list.
    """

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    seed: int | None = None  # None: a random seed (stored in the image's info["seed"])
    steps: int = 28
    scale: float = 7.0
    negative_scale: float | None = None
    sampler: str = DEFAULT_SAMPLER
    # LLLite, in model order; a model without a value gets the default (1.0, 0.0, 1.0) as in sd-scripts
    guide_images: list[ImageLike | None] = field(default_factory=list)
    control_multipliers: list[float] | None = None
    control_starts: list[float] | None = None  # fraction of the steps before the model switches on
    control_ratios: list[float] | None = None  # fraction of the steps, from the start, it stays on
    # img2img / inpainting; with the highres fix, ``strength`` is the second pass's
    init_image: ImageLike | None = None
    strength: float | None = None  # default DEFAULT_STRENGTH
    mask: ImageLike | None = None  # white = regenerate
    # SDXL size conditioning; None: the size of the pass being drawn. *_negative: the uncond half's
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int = 0
    crop_left: int = 0
    clip_prompt: str | None = None  # sd-scripts' --c: recorded in the PNG only (SDXL has no CLIP guidance)
    # text
    clip_skip: int | None = None
    max_embeddings_multiples: int = 1
    # highres fix: pass 1 at highres_fix_scale with highres_fix_steps, pass 2 img2img at ``strength``
    highres_fix_scale: float | None = None
    highres_fix_steps: int = 28
    highres_fix_strength: float | None = None  # pass 1's img2img strength (needs init_image); default strength
    highres_fix_disable_control_net: bool = False
    highres_fix_latents_upscaling: bool = False  # the same as highres_fix_upscaler="latent_bilinear"
    highres_fix_upscaler: str | None = None  # library.generation.upscalers name; default bicubic on pixels
    highres_fix_upscaler_args: tuple[tuple[str, float], ...] = ()
    deep_shrink: DeepShrink = DeepShrink()
    gradual_latent: GradualLatent = GradualLatent()
    # LoRA multipliers from a prompt line's --am; applied by whoever loaded the LoRAs (the CLI)
    network_multipliers: list[float] | None = None


# Fields that may differ between the images of one batch.
PER_IMAGE_FIELDS = frozenset(
    {"prompt", "negative_prompt", "seed", "guide_images", "init_image", "mask", "original_width",
     "original_height", "original_width_negative", "original_height_negative", "crop_top", "crop_left",
     "clip_prompt"}
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


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------

# (request field, option name, default per model, LIMITS kind): the one rule for the LLLite control lists.
CONTROL_FIELDS = (
    ("control_multipliers", "--control_net_multipliers", 1.0, "number"),
    ("control_starts", "--control_net_starts", 0.0, "fraction"),
    ("control_ratios", "--control_net_ratios", 1.0, "fraction"),
)


def per_model(values: Sequence[float] | None, n_models: int, default: float, label: str, kind: str) -> list[float]:
    """One value per LLLite model, in model order; models without a value get ``default`` (as sd-scripts)."""
    values = list(values or [])
    if len(values) > n_models:
        raise UserError(f"{label} {' '.join(f'{v:g}' for v in values)}: {len(values)} value(s) for {n_models} "
                        "LLLite model(s); give at most one per --control_net_lllite_models file")
    for v in values:
        check_limit(label, v, kind)
    return values + [default] * (n_models - len(values))


def control_settings(request: GenerationRequest, n_models: int) -> tuple[list[float], list[float], list[float]]:
    """(multipliers, starts, ratios), one per model; a model whose window holds no step is refused."""
    multipliers, starts, ratios = (
        per_model(getattr(request, name), n_models, default, option, kind)
        for name, option, default, kind in CONTROL_FIELDS
    )
    for i, (start, ratio) in enumerate(zip(starts, ratios), start=1):
        if start >= ratio:
            raise UserError(f"--control_net_starts {start:g} of LLLite model {i} is not below its --control_net_ratios "
                            f"{ratio:g}: the model would never be on; give a start below the ratio")
    return multipliers, starts, ratios


@functools.cache
def _declared_limits() -> tuple[tuple[str, str, Limit], ...]:
    """(request field, label, limit) of every declared range a request holds, from the options' declarations.

    A request field named like its option is labelled with its name, a Deep Shrink / Gradual Latent
    setting (``sets``) with its option's. Imported here: options.py imports this module.
    """
    from library.cli import options_of
    from library.generation import options

    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    out = []
    for cls in options.ARGS:
        for opt in options_of(cls):
            if opt.limit is not None and (opt.sets or opt.field in fields):
                out.append((opt.sets or opt.field, opt.label if opt.sets else opt.field, opt.limit))
    return tuple(out)


def _check_fields(r: GenerationRequest, where: str) -> None:
    for path, label, limit in _declared_limits():
        value = r
        for part in path.split("."):
            value = getattr(value, part)
        limit.check(f"{where}{label}", value)


def _label(name: str) -> str:
    """``--name`` of a generation option, from its declaration (imported here: options.py imports this module)."""
    from library.cli import option_label
    from library.generation import options

    return next(option_label(c, name) for c in options.ARGS if name in {f.name for f in dataclasses.fields(c)})


def _check_combinations(r: GenerationRequest, where: str) -> None:
    # For callers of generate(): sdxl_gen_img.py has already ignored, with a warning, what sd-scripts ignores
    # (highres_fix_strength without its switches, Gradual Latent with another sampler; jobs.Planner, options.py).
    # The mask rules stay errors there too: sd-scripts fails on them.
    if r.mask is not None and r.init_image is None:
        raise UserError(f"{where}a mask ({_label('mask_path')}) needs the image to inpaint ({_label('image_path')})")
    if r.highres_fix_strength is not None and (r.init_image is None or not r.highres_fix_scale):
        raise UserError(f"{where}highres_fix_strength {r.highres_fix_strength:g} is the first highres pass's img2img "
                        f"strength: it needs {_label('highres_fix_scale')} and {_label('image_path')} (the second pass's strength is "
                        f"{_label('strength')})")
    if r.highres_fix_latents_upscaling and r.highres_fix_upscaler not in (None, "latent_bilinear"):
        raise UserError(f"{where}{_label('highres_fix_latents_upscaling')} and {_label('highres_fix_upscaler')} {r.highres_fix_upscaler} "
                        "both choose the upscaler: give one of them")
    if r.gradual_latent.enabled:
        if normalize_sampler_name(r.sampler) not in ANCESTRAL_EULER:
            raise UserError(f"{where}Gradual Latent ({_label('gradual_latent_timesteps')} / --glt) works with "
                            f"{_label('sampler')} euler_a only (as in sd-scripts), got {_label('sampler')} {r.sampler}")
        if r.mask is not None:
            raise UserError(f"{where}Gradual Latent changes the latent size while sampling; inpainting ({_label('mask_path')}) "
                            "cannot follow it: drop one of them")


def without_unsupported_gradual_latent(r: GenerationRequest, label: str,
                                       warn: Callable[[str, str, str], None]) -> GenerationRequest:
    """``r`` without Gradual Latent when its sampler has no ancestral step, after ``warn(label, needs, why)``.

    sd-scripts draws such a request without it ("gradual_latent is not supported for this scheduler.
    Ignoring."); ``validate_request`` still refuses the combination for direct callers.
    """
    if not r.gradual_latent.enabled or normalize_sampler_name(r.sampler) in ANCESTRAL_EULER:
        return r
    warn(label, "--sampler euler_a", f"--sampler {r.sampler} has no ancestral step to grow the latents in")
    return dataclasses.replace(r, gradual_latent=GradualLatent())


def validate_request(r: GenerationRequest, n_models: int, where: str = "") -> None:
    """Every rule a single request must meet; ``where`` (e.g. ``"prompts.txt line 3: "``) starts the message."""
    normalize_sampler_name(r.sampler)
    _check_fields(r, where)
    _check_combinations(r, where)
    low = smallest_size(n_models)
    for label, value in (("width", r.width), ("height", r.height)):
        if value < low:
            checked_size(f"{label}", value, n_models, where)  # raises with the smallest size
    if r.highres_fix_scale:
        first = first_pass_size(r)
        if min(first) < low:
            raise UserError(
                f"{where}{_label('highres_fix_scale')} {r.highres_fix_scale:g} makes the first pass {first[0]}x{first[1]}, below "
                f"the smallest size {low} px{' with LLLite models' if n_models else ''}: use a larger scale")
    control_settings(r, n_models)


FIRST_PASS_MULTIPLE = 32  # sd-scripts rounds the highres fix's first pass down to a multiple of 32


def first_pass_size(r: GenerationRequest) -> tuple[int, int]:
    """The highres fix's first-pass size, as sd-scripts: the final size times the scale, rounded to the nearest
    pixel, then down to a multiple of 32."""
    scale = r.highres_fix_scale or 1.0
    w, h = int(r.width * scale + 0.5), int(r.height * scale + 0.5)
    return w - w % FIRST_PASS_MULTIPLE, h - h % FIRST_PASS_MULTIPLE


# ----------------------------------------------------------------------------------------------
# Prompt lines -> requests
# ----------------------------------------------------------------------------------------------

# PromptSpec field -> request field, for the options a line simply overrides.
_SPEC_FIELDS = ("negative_prompt", "width", "height", "steps", "scale", "strength", "original_width",
                "original_height", "original_width_negative", "original_height_negative", "crop_top", "crop_left",
                "network_multipliers", "clip_prompt")


def _line_settings(base: Any, values: dict[str, Any], switch: str, default: int) -> Any:
    """``base`` with a line's Deep Shrink / Gradual Latent values; any of them switches the feature on."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return base
    settings = dataclasses.replace(base, **given)
    if getattr(settings, switch) is None:
        settings = dataclasses.replace(settings, **{switch: default})
    return settings


def request_from_prompt_spec(spec: PromptSpec, defaults: GenerationRequest) -> GenerationRequest:
    """``defaults`` with every option that a prompt line (or sample-prompt entry) gives applied.

    ``--d`` gives the seed (the first one when it is a list), ``--cn`` the guide images (one per model),
    ``--ss`` the sampler, ``--am`` the LoRA multipliers, ``--nl none`` switches the negative scale off.
    Any Deep Shrink (``--dsd1``...) or Gradual Latent (``--glt``...) option switches that feature on
    with the other values from ``defaults`` (depth 3 / timesteps 650 when the defaults have none).
    """
    changes: dict[str, Any] = {"prompt": spec.prompt}
    changes.update({name: getattr(spec, name) for name in _SPEC_FIELDS if getattr(spec, name) is not None})
    if spec.negative_scale is not None:
        changes["negative_scale"] = None if spec.negative_scale == "none" else spec.negative_scale
    if spec.seeds:
        changes["seed"] = spec.seeds[0]
    if spec.sampler is not None:
        changes["sampler"] = normalize_sampler_name(spec.sampler)
    if spec.guide_images:
        changes["guide_images"] = list(spec.guide_images)
    from library.generation.prompt_lines import line_fields

    for feature in ("deep_shrink", "gradual_latent"):
        base = getattr(defaults, feature)
        values = {setting: getattr(spec, name) for name, setting in line_fields(feature).items()}
        changes[feature] = _line_settings(base, values, base.SWITCH, base.LINE_DEFAULT)
    return dataclasses.replace(defaults, **changes)
