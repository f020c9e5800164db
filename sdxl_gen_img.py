#!/usr/bin/env python
"""Generate SDXL images with ControlNet-LLLite models (one or several stacked), LoRA and prompt files.

    python sdxl_gen_img.py --ckpt sdxl.safetensors --control_net_lllite_models canny.safetensors \
        --guide_image_path edges.png --prompt "a castle on a hill --n blurry --d 42" --outdir out

See docs/generation.md for every option and worked examples. The sampling itself is in
library/generation.py; this script reads options, loads models and files, plans the images
(prompts x images_per_prompt x n_iter, seeds, guide images) and saves PNGs with their parameters.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from library.errors import UserError, run_cli

logger = logging.getLogger("sdxl_gen_img")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def build_parser() -> argparse.ArgumentParser:
    from library.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", required=True, help="SDXL checkpoint: .safetensors/.ckpt file, diffusers folder or hub id")
    g.add_argument("--vae", help="a VAE to use instead of the checkpoint's (e.g. an fp16-fixed SDXL VAE)")
    g.add_argument("--textual_inversion_embeddings", nargs="*", default=[], help="SDXL embeddings (clip_l/clip_g); the token is the file name")
    g.add_argument("--network_module", nargs="*", default=[], help="networks.lora for each --network_weights file")
    g.add_argument("--network_weights", nargs="*", default=[], help="kohya-format SDXL LoRA files, merged into the weights")
    g.add_argument("--network_mul", nargs="*", type=float, default=[], help="LoRA multipliers (one, or one per file)")

    g = p.add_argument_group("ControlNet-LLLite")
    g.add_argument("--control_net_lllite_models", nargs="*", default=[], help="LLLite files; several are stacked")
    g.add_argument("--guide_image_path", nargs="*", default=[],
                   help="guide images (or folders of them), taken in groups of one per model; groups cycle over the images")
    g.add_argument("--control_net_multipliers", nargs="*", type=float, default=None, help="strength per model (default 1.0)")
    g.add_argument("--control_net_ratios", nargs="*", type=float, default=None,
                   help="fraction of the steps, from the start, during which each model stays on (default 1.0)")
    g.add_argument("--control_net_starts", nargs="*", type=float, default=None,
                   help="fraction of the steps before each model switches on (default 0.0)")

    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", help="a prompt line (may carry options: --n negative --d seed --w --h --s --l ...)")
    g.add_argument("--negative_prompt", default="", help="default negative prompt (a line's --n replaces it)")
    g.add_argument("--from_file", help="prompt file: one prompt line per line, or .toml/.json")
    g.add_argument("--interactive", action="store_true", help="read prompt lines from stdin until EOF or an empty line")
    g.add_argument("--clip_skip", type=int, default=None, help="text encoder hidden state counted from the end (2 = SDXL default)")
    g.add_argument("--max_embeddings_multiples", type=int, default=3, help="prompt length in units of 75 tokens")

    g = p.add_argument_group("sampling")
    g.add_argument("--outdir", default="outputs", help="folder for the PNG files")
    g.add_argument("--images_per_prompt", type=int, default=1)
    g.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list this many times")
    g.add_argument("--batch_size", type=int, default=1, help="images per U-Net call")
    g.add_argument("--vae_batch_size", type=int, default=None, help="images per VAE decode call (default: batch size)")
    g.add_argument("--W", type=int, default=1024, help="width (rounded down to a multiple of 8)")
    g.add_argument("--H", type=int, default=1024, help="height (rounded down to a multiple of 8)")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--sampler", default=DEFAULT_SAMPLER, type=str.lower, choices=SAMPLER_NAMES)
    g.add_argument("--scale", type=float, default=7.0, help="CFG scale")
    g.add_argument("--negative_scale", type=float, default=None,
                   help="separate scale for the push away from the negative prompt (see docs/generation.md)")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image; the next images count up from it")
    g.add_argument("--iter_same_seed", action="store_true", help="every --n_iter iteration uses the same seeds")
    g.add_argument("--original_width", type=int, default=None, help="SDXL size conditioning (default: --W)")
    g.add_argument("--original_height", type=int, default=None, help="SDXL size conditioning (default: --H)")
    g.add_argument("--crop_top", type=int, default=0)
    g.add_argument("--crop_left", type=int, default=0)

    g = p.add_argument_group("img2img, inpainting, highres fix")
    g.add_argument("--image_path", help="init image (or folder of images) for img2img")
    g.add_argument("--strength", type=float, default=None, help="img2img strength, 0..1 (default 0.8)")
    g.add_argument("--mask_path", help="inpainting mask (or folder): white is regenerated; needs --image_path")
    g.add_argument("--highres_fix_scale", type=float, default=None, help="first pass at this fraction of the final size")
    g.add_argument("--highres_fix_steps", type=int, default=28, help="steps of the first pass")
    g.add_argument("--highres_fix_strength", type=float, default=0.7, help="img2img strength of the second pass")
    g.add_argument("--highres_fix_latents_upscaling", action="store_true", help="upscale latents instead of pixels")
    g.add_argument("--highres_fix_disable_control_net", action="store_true", help="no LLLite in the second pass")

    g = p.add_argument_group("precision and output")
    g.add_argument("--fp16", action="store_true", help="U-Net and text encoders in float16")
    g.add_argument("--bf16", action="store_true", help="U-Net and text encoders in bfloat16")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--xformers", action="store_true", help="xformers attention (CUDA only; falls back to SDPA)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    g.add_argument("--sequential_file_name", action="store_true", help="name files im_000001.png, im_000002.png, ...")
    g.add_argument("--use_original_file_name", action="store_true", help="start file names with the init/guide image's name")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


# ----------------------------------------------------------------------------------------------
# Options -> inputs
# ----------------------------------------------------------------------------------------------


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


def check_sizes(args) -> None:
    from library.generation import round_size

    args.W, args.H = round_size(args.W, args.H)
    for name in ("images_per_prompt", "n_iter", "batch_size", "steps", "highres_fix_steps", "max_embeddings_multiples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")


def pick_dtype(args):
    import torch

    if args.fp16 and args.bf16:
        raise UserError("give --fp16 or --bf16, not both")
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def pick_device(name: str | None):
    import torch

    if name:
        try:
            return torch.device(name)
        except RuntimeError as e:
            raise UserError(f"--device {name}: {e}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_attention(unet, vae, args, device) -> None:
    if not args.xformers:
        return  # diffusers uses torch's scaled_dot_product_attention by default
    if device.type != "cuda":
        logger.warning("--xformers needs a CUDA GPU: using PyTorch SDPA attention instead")
        return
    try:
        import xformers  # noqa: F401

        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
        logger.info("using xformers attention")
    except Exception as e:  # not installed, or a build that does not match this torch
        logger.warning("xformers is not usable (%s): using PyTorch SDPA attention instead", e)


def load_networks(args, models, dtype, device):
    """LLLite networks (attached) and merged LoRAs."""
    from library.lora import merge_lora
    from networks.control_net_lllite import ControlNetLLLite

    lllites = []
    for path in args.control_net_lllite_models:
        net = ControlNetLLLite.from_file(models.unet, path, dtype=dtype)
        lllites.append(net.to(device).attach())
        logger.info("LLLite %s: cond_emb_dim=%d network_dim=%d", path, net.cond_emb_dim, net.network_dim)

    loras = []
    if args.network_weights:
        modules = args.network_module or ["networks.lora"]
        if len(modules) == 1:
            modules = modules * len(args.network_weights)
        if len(modules) != len(args.network_weights):
            raise UserError(f"{len(args.network_module)} --network_module values for {len(args.network_weights)} --network_weights files")
        muls = args.network_mul or [1.0]
        if len(muls) == 1:
            muls = muls * len(args.network_weights)
        if len(muls) != len(args.network_weights):
            raise UserError(f"{len(args.network_mul)} --network_mul values for {len(args.network_weights)} --network_weights files")
        for module, path, mul in zip(modules, args.network_weights, muls):
            if module == "networks.control_net_lllite":
                raise UserError(f"{path}: give LLLite files with --control_net_lllite_models, not --network_weights")
            if module not in ("networks.lora", "lora"):
                raise UserError(f"--network_module {module} is not supported here: only networks.lora (kohya-format LoRA)")
            loras.append(merge_lora(path, models.unet, models.text_encoder1, models.text_encoder2, mul))
        args.network_mul = muls
    elif args.network_module:
        logger.warning("--network_module given without --network_weights: ignored")
    return lllites, loras


# ----------------------------------------------------------------------------------------------
# Planning: prompts x images -> requests with seeds and images
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    request: object  # GenerationRequest
    index: int  # running image number in this run


class Planner:
    """Turns prompt specs into requests: seeds, guide image groups, init images and masks cycle by image."""

    def __init__(self, args, defaults, groups: list[list[str]], inits: list[str], masks: list[str], n_models: int):
        self.args = args
        self.defaults = defaults
        self.groups = groups
        self.inits = inits
        self.masks = masks
        self.n_models = n_models
        self.rng = random.Random(args.seed)
        self.index = 0
        self.same_seeds: dict[tuple[int, int], int] = {}

    def _seed(self, spec, prompt_no: int, k: int, position: int) -> int:
        if spec.seeds:  # a line's --d: one seed per image; past the list's end, count up from its last seed
            return spec.seeds[k] if k < len(spec.seeds) else spec.seeds[-1] + k - len(spec.seeds) + 1
        if self.args.seed is not None:
            return self.args.seed + (position if self.args.iter_same_seed else self.index)
        if self.args.iter_same_seed:
            return self.same_seeds.setdefault((prompt_no, k), self.rng.randint(0, 2**32 - 1))
        return self.rng.randint(0, 2**32 - 1)

    def jobs(self, specs: list) -> list[Job]:
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


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    """Consecutive jobs that can share a U-Net call, at most ``size`` at a time."""
    from library.generation import batch_key

    for _, group in itertools.groupby(jobs, key=lambda j: batch_key(j.request)):
        group = list(group)
        for i in range(0, len(group), size):
            yield group[i : i + size]


class Writer:
    def __init__(self, args, metadata: dict):
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

    def save(self, job: Job, image) -> Path:
        from library.generation import request_metadata
        from library.png_metadata import save_png

        seed = image.info.get("seed", job.request.seed)
        path = self.name(job, seed)
        save_png(image, path, request_metadata(job.request, seed, **self.metadata))
        logger.info("saved %s", path)
        return path


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def read_interactive() -> Iterator[str]:
    while True:
        if sys.stdin.isatty():
            print("prompt (empty line or Ctrl-D to quit)> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    from library.generation import GenerationRequest, generate
    from library.prompt_lines import load_prompt_file, parse_prompt_line

    # Everything a user can get wrong is checked before the models load and long before any denoising.
    check_sizes(args)
    dtype = pick_dtype(args)
    device = pick_device(args.device)
    if not (args.prompt or args.from_file or args.interactive):
        raise UserError("nothing to draw: give --prompt, --from_file or --interactive")
    specs = []
    if args.prompt:
        specs.append(parse_prompt_line(args.prompt, "--prompt"))
    if args.from_file:
        specs += load_prompt_file(args.from_file)
    n_models = len(args.control_net_lllite_models)
    guides = expand_images(args.guide_image_path, "guide image")
    groups: list[list[str]] = []
    if guides or (n_models and specs and not all(s.guide_images for s in specs)):
        groups = guide_groups(guides, n_models)  # raises when there are fewer guide images than models
    inits = expand_images([args.image_path], "init image (--image_path)") if args.image_path else []
    masks = expand_images([args.mask_path], "mask image (--mask_path)") if args.mask_path else []
    if masks and not inits:
        raise UserError("--mask_path needs --image_path (the image to inpaint)")
    for name in ("control_net_multipliers", "control_net_ratios", "control_net_starts"):
        values = getattr(args, name)
        if values is not None and len(values) not in (1, n_models):
            raise UserError(f"--{name} has {len(values)} values for {n_models} LLLite model(s): give one per model")
        if values is not None and name != "control_net_multipliers" and any(not 0.0 <= v <= 1.0 for v in values):
            raise UserError(f"--{name} are fractions of the steps: use values from 0 to 1, got {values}")

    import torch

    from library.model_loading import load_sdxl
    from library.text_encoding import load_textual_inversion

    # The SDXL VAE overflows in fp16: it is kept in fp16 but decodes in fp32 (its config's force_upcast),
    # unless a --vae is given, which is taken as an fp16-fixed VAE (a NaN result is redone in fp32 anyway).
    vae_dtype = torch.float32 if args.no_half_vae else dtype
    models = load_sdxl(args.ckpt, vae=args.vae, dtype=dtype, vae_dtype=vae_dtype)
    if args.vae and vae_dtype == torch.float16:
        models.vae.register_to_config(force_upcast=False)
    for path in args.textual_inversion_embeddings:
        load_textual_inversion(path, models.tokenizer1, models.tokenizer2, models.text_encoder1, models.text_encoder2)
    for m in (models.unet, models.vae, models.text_encoder1, models.text_encoder2):
        m.to(device)
    setup_attention(models.unet, models.vae, args, device)
    lllites, loras = load_networks(args, models, dtype, device)

    if n_models:  # explicit values, so that the PNG metadata records them
        args.control_net_multipliers = args.control_net_multipliers or [1.0]
        args.control_net_starts = args.control_net_starts or [0.0]
        args.control_net_ratios = args.control_net_ratios or [1.0]
        for name in ("control_net_multipliers", "control_net_starts", "control_net_ratios"):
            values = getattr(args, name)
            setattr(args, name, values * n_models if len(values) == 1 else values)
    defaults = GenerationRequest(
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
    planner = Planner(args, defaults, groups, inits, masks, n_models)
    writer = Writer(args, {
        "model": Path(args.ckpt).name, "vae": Path(args.vae).name if args.vae else None,
        "lllite_models": [Path(p).name for p in args.control_net_lllite_models] or None,
        "networks": [Path(p).name for p in args.network_weights] or None,
    })
    warned_am = False

    def run(jobs: list[Job]) -> None:
        nonlocal warned_am
        for batch in batches(jobs, args.batch_size):
            r = batch[0].request
            if r.network_multipliers is not None:
                if not loras and not warned_am:
                    logger.warning("--am given but no LoRA is loaded (--network_weights): ignored")
                    warned_am = True
                for i, lora in enumerate(loras):
                    lora.set_multiplier(r.network_multipliers[i] if i < len(r.network_multipliers) else args.network_mul[i])
            else:
                for lora, mul in zip(loras, args.network_mul):
                    lora.set_multiplier(mul)
            images = generate(models, lllites, [j.request for j in batch], device=device,
                              progress=not args.no_progress, vae_batch_size=args.vae_batch_size)
            for job, image in zip(batch, images):
                writer.save(job, image)

    if specs:
        # Plan every image first: a bad guide image or prompt option fails before the first step.
        jobs = []
        for _ in range(args.n_iter):
            jobs += planner.jobs(specs)
        run(jobs)
    if args.interactive:
        for n, line in enumerate(read_interactive(), start=1):
            try:
                jobs = []
                spec = parse_prompt_line(line, f"interactive line {n}")
                for _ in range(args.n_iter):
                    jobs += planner.jobs([spec])
                run(jobs)
            except UserError as e:
                logger.error("%s", e)


if __name__ == "__main__":
    run_cli(main)
