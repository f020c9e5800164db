"""From ``sdxl_gen_img.py``'s checked options to images on disk: inputs, planned jobs, batches and PNG files.

* inputs: prompt lines (the prompt, from_file and interactive options), guide/init/mask images
  (files or folders), each file checked readable when it is read;
* planning: prompts x ``images_per_prompt`` x ``n_iter`` become :class:`Job` s with seeds, guide image
  groups, init images and masks (each cycling by image number); every job's request is checked
  with the same rules :func:`library.generation.pipeline.generate` applies, before any model loads;
* batching: consecutive jobs that can share a U-Net call;
* writing: file names (time stamp, sequential, original name), PNG parameters, the highres fix's
  first pass, and the interactive preview.

Everything here reads the frozen options of ``library/generation/options.py``; nothing changes them.
Heavy libraries are imported inside the functions so that option errors stay fast.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from library.cli import option_label, switched_off
from library.errors import UserError
from library.image_files import IMAGE_EXTENSIONS, is_image_name
from library.generation.options import (
    GenOptions,
    ImageArgs,
    InputOptions,
    LoraSpec,
    OutputArgs,
    OutputOptions,
    PromptArgs,
    SamplingArgs,
    ShrinkArgs,
)
from library.generation.requests import (
    MAX_SEED,
    GenerationRequest,
    checked_size,
    control_settings,
    request_from_prompt_spec,
    smallest_size,
    validate_request,
    without_unsupported_gradual_latent,
)

if TYPE_CHECKING:
    from PIL import Image

    from library.generation.prompt_lines import PromptSpec

logger = logging.getLogger(__name__)

_W, _H = option_label(SamplingArgs, "W"), option_label(SamplingArgs, "H")


# ----------------------------------------------------------------------------------------------
# Options -> inputs
# ----------------------------------------------------------------------------------------------


def read_prompt_specs(inputs: InputOptions) -> list[PromptSpec]:
    """The prompt lines of the prompt and from_file options (interactive lines are read later)."""
    from library.generation.prompt_lines import load_prompt_file, parse_prompt_line

    specs = []
    if inputs.prompt:
        specs.append(parse_prompt_line(inputs.prompt, "--prompt"))
    if inputs.from_file:
        specs += load_prompt_file(inputs.from_file)
    return specs


def read_interactive() -> Iterator[str]:
    """Prompt lines from stdin until EOF or an empty line (with a prompt when stdin is a terminal)."""
    while True:
        if sys.stdin.isatty():
            print("prompt (empty line or Ctrl-D to quit)> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        yield line.rstrip("\n")


def expand_images(paths: Iterable[str], what: str) -> list[str]:
    """Files as given; a folder becomes its images in name order. Every file is checked readable now."""
    from library.generation.pipeline import check_image_readable

    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(str(f) for f in path.iterdir() if is_image_name(f))
            if not found:
                raise UserError(f"{what} folder {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            out += found
        else:
            out.append(str(path))
    for f in out:
        check_image_readable(f, what)
    return out


def guide_groups(guides: list[str], n_models: int) -> list[list[str]]:
    """Guide images in groups of one per model: [[g0, g1], [g2, g3], ...] for two models."""
    if len(guides) < n_models:
        raise UserError(
            f"{n_models} LLLite models but only {len(guides)} guide image(s): give at least one guide image per "
            "model with --guide_image_path (in model order), or --cn in every prompt line"
        )
    if len(guides) % n_models:  # sd-scripts cycles over whole groups and never reaches the rest
        switched_off(f"--guide_image_path {' '.join(guides[len(guides) - len(guides) % n_models:])}",
                     f"a whole group of {n_models} guide images (one per LLLite model)",
                     f"{len(guides)} guide images given")
        guides = guides[:len(guides) - len(guides) % n_models]
    return [guides[i: i + n_models] for i in range(0, len(guides), n_models)]


def _count_up(seed: int, n: int) -> int:
    """The n-th seed after ``seed``; past 2**64 - 1 it wraps to 0, so every seed a user gives draws."""
    return (seed + n) % (MAX_SEED + 1)


@dataclass
class ImageInputs:
    """The images that cycle over the planned images: guide groups (one image per model), init images, masks."""

    n_models: int
    groups: list[list[str]] = field(default_factory=list)
    inits: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)


def collect_images(inputs: InputOptions, specs: list[PromptSpec]) -> ImageInputs:
    """Expands and checks the guide, init and mask images."""
    n_models = len(inputs.lllite_models)
    guides = expand_images(inputs.guide_paths, "guide image")
    groups: list[list[str]] = []
    if guides or (n_models and specs and not all(s.guide_images for s in specs)):
        groups = guide_groups(guides, n_models)  # raises when there are fewer guide images than models
    inits = expand_images([inputs.image_path], f"init image ({option_label(ImageArgs, 'image_path')})") if inputs.image_path else []
    masks = expand_images([inputs.mask_path], f"mask image ({option_label(ImageArgs, 'mask_path')})") if inputs.mask_path else []
    return ImageInputs(n_models, groups, inits, masks)


# ----------------------------------------------------------------------------------------------
# Planning: prompts x images -> requests with seeds and images
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One image to draw."""

    request: GenerationRequest
    index: int  # running image number in this run


def lora_multipliers(loras: tuple[LoraSpec, ...], line: list[float] | None) -> list[float]:
    """Each LoRA's multiplier for a batch: a line's ``--am`` (its last value repeats, as sd-scripts), else network_mul."""
    if not line:
        return [spec.multiplier for spec in loras]
    return [line[i] if i < len(line) else line[-1] for i in range(len(loras))]


class Planner:
    """Turns prompt specs into checked requests: seeds, guide image groups, init images and masks cycle by image."""

    def __init__(self, opts: GenOptions, images: ImageInputs):
        self.inputs = opts.inputs
        self.loras = opts.loras
        self.defaults = opts.defaults
        self.images = images
        self.n_models = images.n_models
        self.rng = random.Random(opts.inputs.seed)
        self.index = 0
        self.iteration_seeds: dict[int, int] = {}
        self.warned: set[tuple[str, str]] = set()  # each ignored setting is named once, not once per image
        self.init_sizes: dict[str, tuple[int, int]] = {}

    def _switched_off(self, label: str, needs: str, why: str = "") -> None:
        if (label, needs) not in self.warned:
            self.warned.add((label, needs))
            switched_off(label, needs, why)

    def _seed(self, spec: PromptSpec, k: int, iteration: int) -> int:
        if spec.seeds:  # a line's --d: one seed per image; past the list's end, count up from its last seed
            return spec.seeds[k] if k < len(spec.seeds) else _count_up(spec.seeds[-1], k - len(spec.seeds) + 1)
        seed = self.inputs.seed
        if self.inputs.iter_same_seed:  # one seed for every image of an iteration
            if iteration not in self.iteration_seeds:
                self.iteration_seeds[iteration] = (_count_up(seed, iteration) if seed is not None
                                                   else self.rng.randint(0, 2**32 - 1))
            return self.iteration_seeds[iteration]
        return _count_up(seed, self.index) if seed is not None else self.rng.randint(0, 2**32 - 1)

    def _line_request(self, spec: PromptSpec) -> GenerationRequest:
        """The line's request, with its size rounded and one control value per model (for the metadata)."""
        from library.generation.pipeline import check_image_readable

        where = f"{spec.where}: "
        base = request_from_prompt_spec(spec, self.defaults)
        changes: dict[str, Any] = {}
        for label, name in (("--w", "width"), ("--h", "height")):
            if getattr(spec, name) is not None:
                changes[name] = checked_size(label, getattr(spec, name), self.n_models, where)
        for g in spec.guide_images or []:
            check_image_readable(g, f"{where}guide image (--cn)")
        if spec.guide_images and len(spec.guide_images) > self.n_models:  # the pipeline never reads the rest
            self._switched_off(f"{where}--cn {','.join(spec.guide_images[self.n_models:])}",
                               "a --control_net_lllite_models file for each guide image",
                               f"{self.n_models} file{'' if self.n_models == 1 else 's'} given")
            changes["guide_images"] = list(spec.guide_images[:self.n_models])
        if spec.network_multipliers is not None:
            changes["network_multipliers"] = self._checked_am(spec.network_multipliers, where)
        if base.gradual_latent.enabled:
            from library.generation.prompt_lines import line_fields

            from_line = any(getattr(spec, f) is not None for f in line_fields("gradual_latent")) or spec.sampler is not None
            label = f"{where if from_line else ''}Gradual Latent ({option_label(ShrinkArgs, 'gradual_latent_timesteps')} / --glt)"
            base = without_unsupported_gradual_latent(base, label, self._switched_off)
        if self.images.inits and not base.highres_fix_scale:
            for label, name in (("--w", "width"), ("--h", "height")):
                if getattr(spec, name) is not None:
                    self._switched_off(f"{where}{label} {getattr(spec, name)}", option_label(ImageArgs, "highres_fix_scale"),
                                       f"img2img draws at the init image's size; {_W} and {_H} resize the init image")
        if self.n_models:
            multipliers, starts, ratios = control_settings(base, self.n_models)
            changes.update(control_multipliers=multipliers, control_starts=starts, control_ratios=ratios)
        return replace(base, **changes)

    def _checked_am(self, values: list[float], where: str) -> list[float] | None:
        if not self.loras:
            self._switched_off(f"{where}--am {','.join(f'{v:g}' for v in values)}", "--network_weights",
                               "it sets the LoRA multipliers")
            return None
        if len(values) > len(self.loras):  # sd-scripts pairs values with files and never looks at the rest
            self._switched_off(f"{where}--am {','.join(f'{v:g}' for v in values[len(self.loras):])}",
                               "a --network_weights file for each value", f"{len(self.loras)} LoRA file(s) given")
            values = values[:len(self.loras)]
        for spec, value in zip(self.loras, lora_multipliers(self.loras, values)):
            if spec.mode == "merged" and value != spec.multiplier:
                raise UserError(f"{where}--am {value:g} for {spec.path}, which is merged for good with multiplier "
                                f"{spec.multiplier:g} (--network_merge...): use --network_pre_calc to change it per line")
        return values

    def _img2img_size(self, path: str) -> tuple[int, int]:
        """sd-scripts' img2img size without the highres fix: the init image's (resized to the width x height options
        when both are given), rounded down to a multiple of 32. One resize here where sd-scripts resizes twice (to
        width x height, then to the multiple of 32): the same size, and the same image when both are multiples of 32."""
        if path not in self.init_sizes:
            from library.generation.pipeline import open_image

            width, height = self.inputs.init_size or open_image(path, f"init image ({option_label(ImageArgs, 'image_path')})").size
            size = (width // 32 * 32, height // 32 * 32)
            if min(size) < smallest_size(self.n_models):
                raise UserError(f"init image {path} is {width}x{height}: img2img draws at its size rounded down to a "
                                f"multiple of 32, which leaves no image; give a larger image, or {_W} and {_H} to resize it")
            if size != (width, height):
                logger.warning("init image %s is %dx%d, not a multiple of 32: drawing at %dx%d (the aspect ratio changes "
                               "a little, as in sd-scripts)", path, width, height, *size)
            self.init_sizes[path] = size
        return self.init_sizes[path]

    def jobs(self, specs: list[PromptSpec], iteration: int = 0) -> list[Job]:
        """One iteration over ``specs``: ``images_per_prompt`` checked requests per prompt."""
        out = []
        for spec in specs:
            base = self._line_request(spec)
            for k in range(self.inputs.images_per_prompt):
                changes = {"seed": self._seed(spec, k, iteration)}
                img = self.images
                if self.n_models and not spec.guide_images:
                    if not img.groups:
                        raise UserError(f"{spec.where}: {self.n_models} LLLite model(s) but no guide image: give --cn "
                                        "in the line, or --guide_image_path")
                    changes["guide_images"] = list(img.groups[self.index % len(img.groups)])
                if img.inits:
                    changes["init_image"] = img.inits[self.index % len(img.inits)]
                    if not base.highres_fix_scale:
                        changes["width"], changes["height"] = self._img2img_size(changes["init_image"])
                if img.masks:
                    changes["mask"] = img.masks[self.index % len(img.masks)]
                request = replace(base, **changes)
                validate_request(request, self.n_models, f"{spec.where}: ")
                if self.n_models and len(request.guide_images) < self.n_models:
                    raise UserError(f"{spec.where}: {self.n_models} LLLite models but {len(request.guide_images)} "
                                    "guide image(s): give one per model (--guide_image_path, or --cn in the line)")
                out.append(Job(request, self.index))
                self.index += 1
        return out

    def plan(self, specs: list[PromptSpec]) -> list[Job]:
        """Every image of the n_iter iterations over ``specs``, planned before any is drawn."""
        return [job for iteration in range(self.inputs.n_iter) for job in self.jobs(specs, iteration)]


def check_waiting_settings(opts: GenOptions, jobs: list[Job]) -> None:
    """Deep Shrink / Gradual Latent settings that no planned line switched on: ignored with a warning, as sd-scripts."""
    if opts.inputs.interactive:
        return  # lines typed later may switch them on
    for feature, option, switch in opts.waiting_for_lines:
        if not any(getattr(job.request, feature).enabled for job in jobs):
            switched_off(option, switch)


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    """Consecutive jobs that can share a U-Net call, at most ``size`` at a time."""
    from library.generation.pipeline import batch_key

    for _, group in itertools.groupby(jobs, key=lambda j: batch_key(j.request)):
        group = list(group)
        for i in range(0, len(group), size):
            yield group[i: i + size]


# ----------------------------------------------------------------------------------------------
# Writing: file names, PNG metadata, preview
# ----------------------------------------------------------------------------------------------


class Writer:
    """Saves drawn images into the output folder (already created) with their parameters in the PNG."""

    def __init__(self, out: OutputOptions, metadata: dict[str, Any]):
        self.outdir = out.outdir
        self.sequential = out.sequential
        self.original = out.original_name
        self.preview = out.preview
        self.save_first = out.save_first_pass
        self.stamp = time.strftime("%Y%m%d%H%M%S")
        self.metadata = metadata
        self.next_number = 1 + max(
            (int(f.stem[3:]) for f in self.outdir.glob("im_*.png") if f.stem[3:].isdigit()), default=0
        )
        self.stems: dict[int, str] = {}  # job index -> file stem, shared by the first pass's file
        self.viewer_missing = False
        self.saved = 0  # images written by this run, for the message when a write fails
        self.last: Path | None = None

    def stem(self, job: Job, seed: int) -> str:
        """``[original_]im_<stamp>_<index>_<seed>`` or ``[original_]im_<number>``, fixed per job."""
        if job.index in self.stems:
            return self.stems[job.index]
        r = job.request
        prefix = ""
        if self.original:
            source = r.init_image if r.init_image is not None else (r.guide_images[0] if r.guide_images else None)
            if isinstance(source, (str, Path)):
                prefix = Path(source).stem + "_"
        if self.sequential:
            stem = f"{prefix}im_{self.next_number:06d}"
            self.next_number += 1
        else:
            stem = f"{prefix}im_{self.stamp}_{job.index:04d}_{seed}"
        self.stems[job.index] = stem
        return stem

    def save(self, job: Job, image: Image.Image) -> Path:
        """Writes ``image`` with its request's parameters; returns the file's path."""
        from library.generation.pipeline import request_metadata

        seed = image.info.get("seed", job.request.seed)
        path = self.outdir / f"{self.stem(job, seed)}.png"
        self._write(image, path, request_metadata(job.request, seed, **self.metadata))
        logger.info("saved %s", path)
        if self.preview:
            self._show(image, path)
        return path

    def save_first_pass(self, job: Job, image: Image.Image) -> Path:
        """The highres fix's first pass as ``<stem>_1st.png``, with its own size in the metadata."""
        from library.generation.pipeline import first_pass_size, request_metadata

        width, height = first_pass_size(job.request)
        path = self.outdir / f"{self.stem(job, job.request.seed)}_1st.png"
        meta = request_metadata(job.request, job.request.seed, **self.metadata)
        meta.update(size=f"{width}x{height}", width=width, height=height, highres_fix_pass=1,
                    steps=job.request.highres_fix_steps)
        self._write(image, path, meta)
        logger.info("saved %s (highres fix, first pass)", path)
        return path

    def _write(self, image: Image.Image, path: Path, meta: dict[str, Any]) -> None:
        """One PNG; a failed write also says what this run saved before it."""
        from library.atomic_io import WriteError
        from library.generation.png_metadata import save_png

        try:
            save_png(image, path, meta)
        except WriteError as e:
            n = self.saved
            before = (f"{n} image{'s' if n > 1 else ''} of this run {'were' if n > 1 else 'was'} saved before it (the "
                      f"newest: {self.last})") if n else "No image of this run was saved"
            full = "space" in e.reason or "quota" in e.reason
            outdir = option_label(OutputArgs, "outdir")
            fix = f"free some space there or choose another {outdir}" if full else f"fix that or choose another {outdir}"
            raise UserError(f"{e}. {before}; {fix}, then run again.") from None
        self.saved += 1
        self.last = path

    def first_pass_saver(self, batch: list[Job]) -> Callable[[list[Image.Image]], None] | None:
        """With ``--highres_fix_save_1st``, what ``generate(first_pass=...)`` calls with the batch's first pass."""
        if not self.save_first:
            return None

        def save(images: list[Image.Image]) -> None:
            for job, image in zip(batch, images):
                self.save_first_pass(job, image)

        return save

    def _show(self, image: Image.Image, path: Path) -> None:
        from PIL import ImageShow

        if not ImageShow.show(image, title=path.name) and not self.viewer_missing:
            self.viewer_missing = True
            logger.warning("no image viewer found to preview %s (Pillow's ImageShow); %s skips the preview",
                           path.name, option_label(PromptArgs, "no_preview"))
