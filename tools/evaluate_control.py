"""Measure how well an LLLite controls the image: edge F1 and SSIM at multiplier 0 (baseline) and 1.

    python tools/evaluate_control.py --ckpt model.safetensors --lllite canny.safetensors \
        --guides eval_guides/ --W 1024 --H 1024 --steps 20 --json results.json

``eval_guides/`` holds canny guide images, each with a ``<name>.txt`` prompt beside it
(or give one ``--prompt`` for all). Works the same on a GPU with real SDXL.

With ``--sources photos/`` (the images the guides were made from) it also prints a reference row:
img2img from each source at ``--reference_strength`` without the LLLite. That image has the guide's
layout, so its F1 shows what a generation with the right layout scores at this size and these
settings (pixel-exact F1 stays far below 1); read the LLLite's F1 against it as well as against the
baseline.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.console_logging import take_over_console, tool_console  # noqa: E402

take_over_console()  # before any third-party import: some libraries log while being imported

from library.errors import UserError, run_cli  # noqa: E402
from library.generation.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="SDXL checkpoint (file, diffusers folder or hub id)")
    p.add_argument("--lllite", required=True, help="the LLLite file to evaluate")
    p.add_argument("--guides", required=True, help="folder of guide images with <name>.txt prompts")
    p.add_argument("--prompt", default=None, help="prompt for guides without a .txt file")
    p.add_argument("--sources", default=None,
                   help="folder of the images the guides were made from (same names): adds a reference row, "
                        "img2img from each source without the LLLite, i.e. what an image with the guide's "
                        "layout scores under this metric")
    p.add_argument("--reference_strength", type=float, default=0.5,
                   help="img2img strength of the reference row (lower keeps more of the source)")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--multipliers", type=float, nargs="+", default=[0.0, 1.0], help="the first is the baseline")
    p.add_argument("--W", type=int, default=1024)
    p.add_argument("--H", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scale", type=float, default=7.0)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, type=str.lower, choices=SAMPLER_NAMES)
    p.add_argument("--seed", type=int, default=0, help="guide i uses seed + i at every multiplier")
    p.add_argument("--low_threshold", type=int, default=100, help="Canny thresholds for the generated images")
    p.add_argument("--high_threshold", type=int, default=200)
    p.add_argument("--bf16", action="store_true", help="run the models in bf16 (GPU)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--save_images", default=None, help="folder for the generated images")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    tool_console()
    import torch

    from library.evaluation.control_eval import (
        EvalSettings,
        evaluate_control,
        format_table,
        load_eval_set,
        write_json,
    )
    from library.sdxl.loading import load_sdxl
    from networks.control_net_lllite import ControlNetLLLite

    if not 0.0 < args.reference_strength <= 1.0:
        raise UserError(f"--reference_strength must be in (0, 1], got {args.reference_strength}")
    items = load_eval_set(args.guides, args.prompt, sources=args.sources)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    models = load_sdxl(args.ckpt, dtype=dtype)
    for m in (models.unet, models.vae, models.text_encoder1, models.text_encoder2):
        m.to(device)
    network = ControlNetLLLite.from_file(models.unet, args.lllite).to(device)
    settings = EvalSettings(width=args.W, height=args.H, steps=args.steps, scale=args.scale, sampler=args.sampler,
                            seed=args.seed, negative_prompt=args.negative_prompt,
                            low_threshold=args.low_threshold, high_threshold=args.high_threshold)
    results = evaluate_control(models, network, items, settings, args.multipliers, args.save_images,
                               args.reference_strength)
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
        logging.info("wrote %s", args.json)


if __name__ == "__main__":
    run_cli(main)
