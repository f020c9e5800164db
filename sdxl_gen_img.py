#!/usr/bin/env python
"""Generate SDXL images with ControlNet-LLLite models (one or several stacked), LoRA and prompt files.

    python sdxl_gen_img.py --ckpt sdxl.safetensors --control_net_lllite_models canny.safetensors \
        --guide_image_path edges.png --prompt "a castle on a hill --n blurry --d 42" --outdir out

See docs/generation.md for every option and worked examples. The sampling itself is in
library/generation.py; this script reads options and follows the recipe in main(): models and
networks come from library/generation_setup.py, the planned images (prompts x images_per_prompt x
n_iter, seeds, guide images) and the saved PNGs from library/generation_jobs.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from library.errors import UserError, run_cli
from library.generation_jobs import (
    Job,
    Planner,
    Writer,
    batches,
    check_control_options,
    check_sizes,
    collect_images,
    default_request,
    fill_control_options,
    read_interactive,
    read_prompt_specs,
    run_metadata,
)
from library.generation_setup import LoraMultipliers, load_models, load_networks, pick_device, pick_dtype, quiet_model_libraries

logger = logging.getLogger("sdxl_gen_img")


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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    quiet_model_libraries()
    from library.generation import generate
    from library.prompt_lines import parse_prompt_line

    # Everything a user can get wrong is checked before the models load and long before any denoising.
    check_sizes(args)
    dtype = pick_dtype(args)
    device = pick_device(args.device)
    specs = read_prompt_specs(args)
    images = collect_images(args, specs)
    check_control_options(args)

    models = load_models(args, dtype, device)
    lllites, loras = load_networks(args, models, dtype, device)
    lora_multipliers = LoraMultipliers(loras, args.network_mul)

    fill_control_options(args)
    planner = Planner(args, default_request(args), images)
    writer = Writer(args, run_metadata(args))

    def draw(jobs: list[Job]) -> None:
        for batch in batches(jobs, args.batch_size):
            lora_multipliers.apply(batch[0].request)
            pictures = generate(models, lllites, [j.request for j in batch], device=device,
                                progress=not args.no_progress, vae_batch_size=args.vae_batch_size)
            for job, picture in zip(batch, pictures):
                writer.save(job, picture)

    if specs:
        draw(planner.plan(specs))  # every image is planned first: a bad guide image fails before the first step
    if args.interactive:
        for n, line in enumerate(read_interactive(), start=1):
            try:
                draw(planner.plan([parse_prompt_line(line, f"interactive line {n}")]))
            except UserError as e:
                logger.error("%s", e)


if __name__ == "__main__":
    run_cli(main)
