"""Sample images during training, drawn by the same code as ``sdxl_gen_img.py``.

Prompts come from ``--sample_prompts`` in the prompt-line format, with ``--cn guide.png`` giving
each prompt's conditioning image. Images go to ``<output_dir>/sample/`` with their settings in the
PNG text, so every sample says which step, seed and guide made it, and to the trackers beside their
guides. The cadence options also time the control-fidelity measurement (``--fidelity_guides``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from library.cli import Limit, Options, flag, option, switched_off
from library.errors import UserError
from library.generation.pipeline import (
    GenerationRequest,
    check_image_readable,
    generate,
    open_image,
    request_from_prompt_spec,
    request_metadata,
    validate_request,
)
from library.generation.png_metadata import save_png
from library.generation.prompt_lines import PromptSpec, load_prompt_file
from library.generation.requests import without_unsupported_gradual_latent
from library.generation.samplers import SAMPLER_NAMES, normalize_sampler_name
from library.sdxl.loading import SDXLModels
from library.sdxl.text_encoding import TextEncodingOptions
from library.training.together import together
from library.training.tracking import log_images
from networks.control_net_lllite import ControlNetLLLite

logger = logging.getLogger(__name__)

# sd-scripts' defaults for samples during training: --sample_sampler, and a prompt line's steps and scale
# (train_util.sample_image_inference), so a prompt file draws here as it would there.
SAMPLE_SAMPLER = "ddim"
SAMPLE_STEPS = 30
SAMPLE_SCALE = 7.5


@dataclass(frozen=True)
class SampleOptions(Options):
    group = "sample images during training"

    prompt_file: str | None = option(name="sample_prompts", help="prompt file (.txt/.toml/.json); lines take --cn guide.png")
    every_n_steps: int | None = option(
        name="sample_every_n_steps", type=int, limit=Limit(1),
        help="draw the sample prompts (and measure --fidelity_guides) every N steps, and at the end")
    every_n_epochs: int | None = option(
        name="sample_every_n_epochs", type=int, limit=Limit(1),
        help="draw the sample prompts (and measure --fidelity_guides) every N epochs, and at the end")
    at_first: bool = flag(name="sample_at_first",
                          help="draw the sample prompts (and measure --fidelity_guides) before the first step")
    sampler: str = option(
        SAMPLE_SAMPLER, name="sample_sampler",
        help=f"sampler for samples (names as in sdxl_gen_img.py); a prompt line without --s/--l draws "
             f"{SAMPLE_STEPS} steps at scale {SAMPLE_SCALE:g}, as in sd-scripts")
    prompts: tuple[PromptSpec, ...] = ()

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        try:
            sampler = normalize_sampler_name(v["sampler"])
        except (KeyError, ValueError, UserError):
            raise UserError(f"--sample_sampler {v['sampler']!r} is not a sampler name; "
                            f"use one of {', '.join(SAMPLER_NAMES)}") from None
        cadence = v["every_n_steps"] or v["every_n_epochs"] or v["at_first"]
        if not v["prompt_file"] and not args.fidelity_guides:
            if cadence:
                switched_off("--sample_every_n_steps/--sample_every_n_epochs/--sample_at_first",
                             "--sample_prompts or --fidelity_guides", "there is nothing to draw or measure")
            return {**v, "prompt_file": None, "every_n_steps": None, "every_n_epochs": None, "at_first": False,
                    "sampler": sampler}  # no cadence: nothing is drawn
        if not cadence:
            given = " and ".join(o for o, x in (("--sample_prompts", v["prompt_file"]),
                                                ("--fidelity_guides", args.fidelity_guides)) if x)
            switched_off(given, "--sample_every_n_steps, --sample_every_n_epochs or --sample_at_first",
                         "they say when to draw")
        prompts = tuple(_read_prompts(v["prompt_file"])) if v["prompt_file"] else ()
        return {**v, "sampler": sampler, "prompts": prompts}

    # The cadence serves the sample prompts and the fidelity guides alike; the hooks exist only when asked for.
    def due_after_step(self, step: int) -> bool:
        return bool(self.every_n_steps and step % self.every_n_steps == 0)

    def due_after_epoch(self, epoch: int) -> bool:
        return bool(self.every_n_epochs and epoch % self.every_n_epochs == 0)

    @property
    def at_end(self) -> bool:
        """A cadence was asked for, so the final network is drawn (and measured) too."""
        return bool(self.every_n_steps or self.every_n_epochs)


OPTIONS = (SampleOptions,)


def _read_prompts(path: str) -> list[PromptSpec]:
    """Prompts and guide images are checked now, so a typo fails before training, not hours later."""
    specs = load_prompt_file(path)
    kept = []
    for i, spec in enumerate(specs):
        if not spec.guide_images:
            # sd-scripts' LLLite trainer draws no samples at all, so its users' prompt files have no guides:
            # the run goes on, as there, without this sample.
            logger.warning("%s: prompt %d (%r) has no --cn guide image: it is skipped (an LLLite sample needs one, "
                           "e.g. `a cat --cn guides/cat_canny.png`)", path, i + 1, spec.prompt[:40])
            continue
        for g in spec.guide_images:
            check_image_readable(g, f"guide image of sample prompt {i + 1}")
        kept.append(spec)
    return kept


SampleFn = Callable[[ControlNetLLLite, int, int], None]


def combine_hooks(*hooks: SampleFn | None) -> SampleFn | None:
    """One hook for the trainer's sample cadence that runs each given hook in turn (None when none is given)."""
    given = [h for h in hooks if h is not None]
    if not given:
        return None

    def run_all(network: ControlNetLLLite, step: int, epoch: int) -> None:
        for hook in given:
            hook(network, step, epoch)

    return run_all


@contextlib.contextmanager
def drawing_with(models: SDXLModels, network: ControlNetLLLite, accelerator) -> Iterator[None]:
    """Draw with the network in the middle of training: the models it needs on the device, eval mode,
    and the training run's random stream and devices as they were afterwards."""
    device = accelerator.device
    idle = [m for m in (models.vae, models.text_encoder1, models.text_encoder2) if m.device != device]
    for m in idle:
        m.to(device)
    was_training = network.training
    network.eval()
    rng_state = torch.get_rng_state()  # drawing must not change the training run's random stream
    try:
        with torch.no_grad(), accelerator.autocast():
            yield
    finally:
        torch.set_rng_state(rng_state)
        network.train(was_training)
        for m in idle:
            m.to("cpu")


def beside_guide(image: Image.Image, guide: str | Path) -> Image.Image:
    """The guide (left) and the image drawn from it (right), at the image's size, for the trackers."""
    g = open_image(guide, "guide image").convert("RGB").resize(image.size, Image.NEAREST)
    out = Image.new("RGB", (image.width * 2, image.height))
    out.paste(g, (0, 0))
    out.paste(image.convert("RGB"), (image.width, 0))
    return out


class SampleDrawer:
    """Draws the sample prompts with the network as it is now (main process; the others wait)."""

    def __init__(self, opts: SampleOptions, models: SDXLModels, accelerator, out_dir: Path, name: str | None,
                 size: tuple[int, int], seed: int | None, text: TextEncodingOptions = TextEncodingOptions()):
        self.opts = opts
        self.models = models
        self.accelerator = accelerator
        self.out_dir = out_dir
        self.name = name
        # Prompts are encoded as the training captions are (clip_skip, length); lines may still say otherwise.
        self.defaults = GenerationRequest(width=size[0], height=size[1], steps=SAMPLE_STEPS, scale=SAMPLE_SCALE,
                                          sampler=opts.sampler,
                                          seed=seed, clip_skip=text.clip_skip,
                                          max_embeddings_multiples=text.max_embeddings_multiples)
        # Checked now, before training: a line's mistake must not stop the run at its first sample.
        self.requests = [self._request(spec, i) for i, spec in enumerate(opts.prompts)]

    def _request(self, spec: PromptSpec, index: int) -> GenerationRequest:
        request = without_unsupported_gradual_latent(request_from_prompt_spec(spec, self.defaults),
                                                     f"sample prompt {index + 1}: Gradual Latent (--glt)", switched_off)
        validate_request(request, 1, f"{self.opts.prompt_file}: sample prompt {index + 1}: ")
        return request

    def __call__(self, network: ControlNetLLLite, step: int, epoch: int) -> None:
        together(self.accelerator, lambda: self._draw(network, step, epoch), f"drawing the samples of step {step}",
                 main_only=True)

    def _draw(self, network: ControlNetLLLite, step: int, epoch: int) -> None:
        models, device = self.models, self.accelerator.device
        for_trackers: dict[str, tuple[Image.Image, str]] = {}
        with drawing_with(models, network, self.accelerator):
            for i, (spec, request) in enumerate(zip(self.opts.prompts, self.requests)):
                image = generate(models, [network], request, device=device, progress=False)[0]
                seed = image.info.get("seed", request.seed)
                meta = request_metadata(request, seed=seed, step=step, epoch=epoch,
                                        base_model=models.name, **({"lllite": self.name} if self.name else {}))
                prefix = f"{self.name}_" if self.name else ""  # as sd-scripts names samples without an output name
                save_png(image, self.out_dir / f"{prefix}{step:06d}_{i:02d}_{seed}.png", meta, "the sample image")
                if self.accelerator.trackers:
                    for_trackers[f"samples/{i:02d}"] = (beside_guide(image, spec.guide_images[0]),
                                                        f"{spec.prompt} (guide | sample, seed {seed}, step {step})")
        logger.info("wrote %d sample image(s) for step %d to %s", len(self.opts.prompts), step, self.out_dir)
        log_images(self.accelerator, for_trackers, step)
