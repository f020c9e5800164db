"""From ``sdxl_gen_img.py``'s options to images on disk: inputs, planned jobs, batches and PNG files.

* inputs: prompt lines (``--prompt``, ``--from_file``, ``--interactive``), guide/init/mask images
  (files or folders), every option a user can get wrong checked before the models load;
* planning: prompts x ``images_per_prompt`` x ``n_iter`` become :class:`Job` s with seeds, guide image
  groups, init images and masks (each cycling by image number);
* batching: consecutive jobs that can share a U-Net call;
* writing: file names (time stamp, sequential, original name) and PNG parameters metadata.

Heavy libraries are imported inside the functions so that ``--help`` and option errors stay fast.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from library.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from library.generation import GenerationRequest
    from library.prompt_lines import PromptSpec

logger = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# ----------------------------------------------------------------------------------------------
# Options -> inputs
# ----------------------------------------------------------------------------------------------


def check_sizes(args: argparse.Namespace) -> None:
    """Rounds ``--W``/``--H`` down to multiples of 8 and checks the counts are at least 1."""
    from library.generation import round_size

    args.W, args.H = round_size(args.W, args.H)
    for name in ("images_per_prompt", "n_iter", "batch_size", "steps", "highres_fix_steps", "max_embeddings_multiples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")


def read_prompt_specs(args: argparse.Namespace) -> list[PromptSpec]:
    """The prompt lines of ``--prompt`` and ``--from_file`` (interactive lines are read later)."""
    from library.prompt_lines import load_prompt_file, parse_prompt_line

    if not (args.prompt or args.from_file or args.interactive):
        raise UserError("nothing to draw: give --prompt, --from_file or --interactive")
    specs = []
    if args.prompt:
        specs.append(parse_prompt_line(args.prompt, "--prompt"))
    if args.from_file:
        specs += load_prompt_file(args.from_file)
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
    from library.generation import check_image_readable

    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise UserError(f"{what} folder {path} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
            out += found
        else:
            out.append(str(path))
    for f in out:
        check_image_readable(f, what)
    return out


def guide_groups(guides: list[str], n_models: int) -> list[list[str]]:
    """Guide images in groups of one per model: [[g0, g1], [g2, g3], ...] for two models."""
    if not n_models:
        if guides:
            logger.warning("--guide_image_path given without --control_net_lllite_models: the guide images are ignored")
        return []
    if len(guides) < n_models:
        raise UserError(
            f"{n_models} LLLite models but only {len(guides)} guide image(s): give at least one guide image per "
            "model with --guide_image_path (in model order), or --cn in every prompt line"
        )
    if len(guides) % n_models:
        logger.warning("%d guide images for %d models: the last %d image(s) do not fill a group and are ignored",
                       len(guides), n_models, len(guides) % n_models)
    return [guides[i : i + n_models] for i in range(0, len(guides) - n_models + 1, n_models)]


@dataclass
class ImageInputs:
    """The images that cycle over the planned images: guide groups (one image per model), init images, masks."""

    n_models: int
    groups: list[list[str]] = field(default_factory=list)
    inits: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)


def collect_images(args: argparse.Namespace, specs: list[PromptSpec]) -> ImageInputs:
    """Expands and checks ``--guide_image_path``, ``--image_path`` and ``--mask_path``."""
    n_models = len(args.control_net_lllite_models)
    guides = expand_images(args.guide_image_path, "guide image")
    groups: list[list[str]] = []
    if guides or (n_models and specs and not all(s.guide_images for s in specs)):
        groups = guide_groups(guides, n_models)  # raises when there are fewer guide images than models
    inits = expand_images([args.image_path], "init image (--image_path)") if args.image_path else []
    masks = expand_images([args.mask_path], "mask image (--mask_path)") if args.mask_path else []
    if masks and not inits:
        raise UserError("--mask_path needs --image_path (the image to inpaint)")
    return ImageInputs(n_models, groups, inits, masks)


def check_control_options(args: argparse.Namespace) -> None:
    """``--control_net_multipliers/ratios/starts``: one value, or one per LLLite model; windows within 0..1."""
    n_models = len(args.control_net_lllite_models)
    for name in ("control_net_multipliers", "control_net_ratios", "control_net_starts"):
        values = getattr(args, name)
        if values is not None and len(values) not in (1, n_models):
            raise UserError(f"--{name} has {len(values)} values for {n_models} LLLite model(s): give one per model")
        if values is not None and name != "control_net_multipliers" and any(not 0.0 <= v <= 1.0 for v in values):
            raise UserError(f"--{name} are fractions of the steps: use values from 0 to 1, got {values}")


def fill_control_options(args: argparse.Namespace) -> None:
    """One explicit value per LLLite model for each control option, so that the PNG metadata records them."""
    n_models = len(args.control_net_lllite_models)
    if not n_models:
        return
    args.control_net_multipliers = args.control_net_multipliers or [1.0]
    args.control_net_starts = args.control_net_starts or [0.0]
    args.control_net_ratios = args.control_net_ratios or [1.0]
    for name in ("control_net_multipliers", "control_net_starts", "control_net_ratios"):
        values = getattr(args, name)
        setattr(args, name, values * n_models if len(values) == 1 else values)


def default_request(args: argparse.Namespace) -> GenerationRequest:
    """The request every prompt line starts from: the script's sampling, control and highres options."""
    from library.generation import GenerationRequest

    return GenerationRequest(
        negative_prompt=args.negative_prompt, width=args.W, height=args.H, steps=args.steps, scale=args.scale,
        negative_scale=args.negative_scale, sampler=args.sampler,
        control_multipliers=args.control_net_multipliers, control_starts=args.control_net_starts,
        control_ratios=args.control_net_ratios, strength=args.strength,
        original_width=args.original_width, original_height=args.original_height,
        crop_top=args.crop_top, crop_left=args.crop_left, clip_skip=args.clip_skip,
        max_embeddings_multiples=args.max_embeddings_multiples, highres_fix_scale=args.highres_fix_scale,
        highres_fix_steps=args.highres_fix_steps, highres_fix_strength=args.highres_fix_strength,
        highres_fix_disable_control_net=args.highres_fix_disable_control_net,
        highres_fix_latents_upscaling=args.highres_fix_latents_upscaling,
    )


# ----------------------------------------------------------------------------------------------
# Planning: prompts x images -> requests with seeds and images
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One image to draw."""

    request: GenerationRequest
    index: int  # running image number in this run


class Planner:
    """Turns prompt specs into requests: seeds, guide image groups, init images and masks cycle by image."""

    def __init__(self, args: argparse.Namespace, defaults: GenerationRequest, images: ImageInputs):
        self.args = args
        self.defaults = defaults
        self.groups = images.groups
        self.inits = images.inits
        self.masks = images.masks
        self.n_models = images.n_models
        self.rng = random.Random(args.seed)
        self.index = 0
        self.same_seeds: dict[tuple[int, int], int] = {}

    def _seed(self, spec: PromptSpec, prompt_no: int, k: int, position: int) -> int:
        if spec.seeds:  # a line's --d: one seed per image; past the list's end, count up from its last seed
            return spec.seeds[k] if k < len(spec.seeds) else spec.seeds[-1] + k - len(spec.seeds) + 1
        if self.args.seed is not None:
            return self.args.seed + (position if self.args.iter_same_seed else self.index)
        if self.args.iter_same_seed:
            return self.same_seeds.setdefault((prompt_no, k), self.rng.randint(0, 2**32 - 1))
        return self.rng.randint(0, 2**32 - 1)

    def jobs(self, specs: list[PromptSpec]) -> list[Job]:
        """One iteration over ``specs``: ``images_per_prompt`` requests per prompt."""
        from library.generation import check_image_readable, request_from_prompt_spec

        out = []
        position = 0  # image number within this iteration (for --iter_same_seed)
        for prompt_no, spec in enumerate(specs):
            base = request_from_prompt_spec(spec, self.defaults)
            for g in spec.guide_images or []:
                check_image_readable(g, "guide image (--cn)")
            for k in range(self.args.images_per_prompt):
                changes = {"seed": self._seed(spec, prompt_no, k, position)}
                if self.n_models and not spec.guide_images:
                    changes["guide_images"] = list(self.groups[self.index % len(self.groups)]) if self.groups else []
                if self.inits:
                    changes["init_image"] = self.inits[self.index % len(self.inits)]
                if self.masks:
                    changes["mask"] = self.masks[self.index % len(self.masks)]
                req = replace(base, **changes)
                if self.n_models and len(req.guide_images) < self.n_models:
                    raise UserError(
                        f"prompt {spec.prompt[:40]!r}: {self.n_models} LLLite models but {len(req.guide_images)} guide "
                        "image(s): give one per model (--guide_image_path, or --cn in the prompt line)"
                    )
                out.append(Job(req, self.index))
                self.index += 1
                position += 1
        return out

    def plan(self, specs: list[PromptSpec]) -> list[Job]:
        """Every image of ``--n_iter`` iterations over ``specs``, planned before any is drawn."""
        jobs = []
        for _ in range(self.args.n_iter):
            jobs += self.jobs(specs)
        return jobs


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    """Consecutive jobs that can share a U-Net call, at most ``size`` at a time."""
    from library.generation import batch_key

    for _, group in itertools.groupby(jobs, key=lambda j: batch_key(j.request)):
        group = list(group)
        for i in range(0, len(group), size):
            yield group[i : i + size]


# ----------------------------------------------------------------------------------------------
# Writing: file names and PNG metadata
# ----------------------------------------------------------------------------------------------


def run_metadata(args: argparse.Namespace) -> dict[str, Any]:
    """What every PNG of this run records besides its request: model, VAE, LLLite and LoRA file names."""
    return {
        "model": Path(args.ckpt).name, "vae": Path(args.vae).name if args.vae else None,
        "lllite_models": [Path(p).name for p in args.control_net_lllite_models] or None,
        "networks": [Path(p).name for p in args.network_weights] or None,
    }


class Writer:
    """Saves drawn images into ``--outdir`` under their file names, with their parameters in the PNG."""

    def __init__(self, args: argparse.Namespace, metadata: dict[str, Any]):
        self.outdir = Path(args.outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.sequential = args.sequential_file_name
        self.original = args.use_original_file_name
        self.stamp = time.strftime("%Y%m%d%H%M%S")
        self.metadata = metadata
        self.next_number = 1 + max(
            (int(f.stem[3:]) for f in self.outdir.glob("im_*.png") if f.stem[3:].isdigit()), default=0
        )

    def name(self, job: Job, seed: int) -> Path:
        """The file for ``job``: ``[original_]im_<stamp>_<index>_<seed>.png`` or ``[original_]im_<number>.png``."""
        r = job.request
        prefix = ""
        if self.original:
            source = r.init_image if r.init_image is not None else (r.guide_images[0] if r.guide_images else None)
            if isinstance(source, (str, Path)):
                prefix = Path(source).stem + "_"
        if self.sequential:
            name = f"{prefix}im_{self.next_number:06d}.png"
            self.next_number += 1
        else:
            name = f"{prefix}im_{self.stamp}_{job.index:04d}_{seed}.png"
        return self.outdir / name

    def save(self, job: Job, image: Image.Image) -> Path:
        """Writes ``image`` with its request's parameters; returns the file's path."""
        from library.generation import request_metadata
        from library.png_metadata import save_png

        seed = image.info.get("seed", job.request.seed)
        path = self.name(job, seed)
        save_png(image, path, request_metadata(job.request, seed, **self.metadata))
        logger.info("saved %s", path)
        return path
