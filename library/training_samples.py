"""Sample images during training, drawn by the same code as ``sdxl_gen_img.py``.

Prompts come from ``--sample_prompts`` in the prompt-line format, with ``--cn guide.png`` giving
each prompt's conditioning image. Images go to ``<output_dir>/sample/`` with their settings in the
PNG text, so every sample says which step, seed and guide made it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from library.errors import UserError
from library.generation import GenerationRequest, check_image_readable, generate, request_from_prompt_spec, request_metadata
from library.model_loading import SDXLModels
from library.png_metadata import save_png
from library.prompt_lines import load_prompt_file
from library.samplers import normalize_sampler_name
from networks.control_net_lllite import ControlNetLLLite

logger = logging.getLogger(__name__)

SampleFn = Callable[[ControlNetLLLite, int, int], None]


def _default_size(args: argparse.Namespace) -> tuple[int, int]:
    res = str(args.resolution or "1024").replace(" ", "")
    w, _, h = res.partition(",")
    return int(w), int(h or w)


def make_sampler(args: argparse.Namespace, models: SDXLModels, accelerator: Accelerator) -> SampleFn | None:
    """A callback ``sample(network, step, epoch)``, or None without ``--sample_prompts``.

    Prompts and guide images are checked now, so a typo fails before training, not hours later.
    """
    if not args.sample_prompts:
        return None
    specs = load_prompt_file(args.sample_prompts)
    for i, spec in enumerate(specs):
        if not spec.guide_images:
            raise UserError(
                f"{args.sample_prompts}: prompt {i + 1} ({spec.prompt[:40]!r}) has no --cn guide image; "
                "an LLLite sample needs one, e.g. `a cat --cn guides/cat_canny.png`"
            )
        for g in spec.guide_images:
            check_image_readable(g, f"guide image of sample prompt {i + 1}")
    width, height = _default_size(args)
    defaults = GenerationRequest(width=width, height=height, steps=20, scale=7.0,
                                 sampler=normalize_sampler_name(args.sample_sampler), seed=args.seed)
    out_dir = Path(args.output_dir) / "sample"

    def sample(network: ControlNetLLLite, step: int, epoch: int) -> None:
        if accelerator.is_main_process:
            _draw(models, network, specs, defaults, out_dir, args, accelerator, step, epoch)
        accelerator.wait_for_everyone()

    return sample


def _draw(models, network, specs, defaults, out_dir: Path, args, accelerator, step: int, epoch: int) -> None:
    device = accelerator.device
    idle = [m for m in (models.vae, models.text_encoder1, models.text_encoder2) if m.device != device]
    for m in idle:
        m.to(device)
    was_training = network.training
    network.eval()
    rng_state = torch.get_rng_state()  # sampling must not change the training run's random stream
    try:
        with torch.no_grad(), accelerator.autocast():
            for i, spec in enumerate(specs):
                request = request_from_prompt_spec(spec, defaults)
                image = generate(models, [network], request, device=device, progress=False)[0]
                seed = image.info.get("seed", request.seed)
                meta = request_metadata(request, seed=seed, step=step, epoch=epoch,
                                        base_model=models.name, lllite=args.output_name)
                path = out_dir / f"{args.output_name}_{step:06d}_{i:02d}_{seed}.png"
                save_png(image, path, meta)
        logger.info("wrote %d sample image(s) for step %d to %s", len(specs), step, out_dir)
    finally:
        torch.set_rng_state(rng_state)
        network.train(was_training)
        for m in idle:
            m.to("cpu")
