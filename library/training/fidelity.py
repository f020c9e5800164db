"""Control fidelity measured while training: does the LLLite make the images follow held-out guides yet?

With ``--fidelity_guides DIR`` (canny guides, each with a ``<name>.txt`` prompt, as
``tools/evaluate_control.py`` takes them), the trainer measures edge F1 and SSIM at the sample
cadence with ``library/evaluation/control_eval.py``: every guide drawn with the LLLite (multiplier 1), and
once, at the first measurement, without it (multiplier 0, the base model's own answer; it does not
change while the LLLite trains). Each guide keeps its seed at every measurement, so the curve shows
the LLLite and not the noise. The figures go to the log and to the trackers as ``fidelity/*``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from library.cli import Limit, Needs, Options, option, option_label
from library.errors import UserError
from library.evaluation.control_eval import (
    EvalItem,
    EvalSettings,
    evaluate_control,
    items_with_edges,
    load_eval_set,
)
from library.sdxl.loading import SDXLModels
from library.sdxl.text_encoding import TextEncodingOptions
from library.training.samples import SampleOptions, drawing_with
from library.training.together import together
from library.training.tracking import log_values
from networks.control_net_lllite import ControlNetLLLite

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 20
DEFAULT_SCALE = 7.0
DEFAULT_SEED = 0


_NEEDS_GUIDES = Needs("fidelity_guides", "sets how --fidelity_guides are drawn: add --fidelity_guides DIR, or drop it",
                      error=True)


@dataclass(frozen=True)
class FidelityOptions(Options):
    group = "control fidelity during training (not in sd-scripts)"

    folder: Path | None = option(
        name="fidelity_guides", convert=Path,
        help="folder of held-out canny guide images, each with a <name>.txt prompt beside it (as "
             f"tools/evaluate_control.py takes them). At the sample cadence ({option_label(SampleOptions, 'every_n_steps')}, "
             f"{option_label(SampleOptions, 'every_n_epochs')}, {option_label(SampleOptions, 'at_first')}, and at the end) edge F1 "
             "and SSIM are measured with "
             "the LLLite and, once, without it; they go to the log and to the trackers as fidelity/edge_f1, "
             "fidelity/edge_f1_base, fidelity/edge_ssim, fidelity/edge_ssim_base, fidelity/edge_f1_ratio. "
             "Guides without any edge are skipped. Images are drawn at the training resolution with "
             f"{option_label(SampleOptions, 'sampler')}")
    steps: int = option(name="fidelity_steps", type=int, limit=Limit(1), needs=_NEEDS_GUIDES, held=DEFAULT_STEPS,
                        help=f"sampling steps of each fidelity image, >= 1 (default {DEFAULT_STEPS}; needs --fidelity_guides)")
    scale: float = option(name="fidelity_scale", type=float, limit=Limit(1.0), needs=_NEEDS_GUIDES, held=DEFAULT_SCALE,
                          help=f"CFG scale of the fidelity images, >= 1 (default {DEFAULT_SCALE:g}; needs --fidelity_guides)")
    seed: int = option(name="fidelity_seed", type=int, limit=Limit(0, 2**32 - 1), needs=_NEEDS_GUIDES, held=DEFAULT_SEED,
                       help=f"guide i is drawn with seed + i at every measurement (default {DEFAULT_SEED}; needs "
                            "--fidelity_guides)")
    items: tuple[EvalItem, ...] = ()  # the guides with edges, in name order

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        held = {"steps": DEFAULT_STEPS, "scale": DEFAULT_SCALE, "seed": DEFAULT_SEED}
        v = {**v, **{k: d for k, d in held.items() if v[k] is None}}
        if not v["folder"]:
            return {**v, "folder": None}
        if not (args.sample_every_n_steps or args.sample_every_n_epochs):
            raise UserError(f"--fidelity_guides {v['folder']} is measured at the sample cadence: add "
                            f"{option_label(SampleOptions, 'every_n_steps')} N or {option_label(SampleOptions, 'every_n_epochs')} N")
        folder = Path(v["folder"])
        try:
            items = load_eval_set(folder, prompt_option=None)
        except UserError as e:
            raise UserError(f"--fidelity_guides {folder}: {e}") from None
        # Edges are looked at again at the training size when the meter starts; here only the plain mistake.
        kept, _ = items_with_edges(items, _image_size(items[0].guide))
        if not kept:
            raise UserError(f"--fidelity_guides {folder}: none of the {len(items)} guide images has any edge "
                            "(white pixels on black); give canny edge maps")
        return {**v, "items": tuple(items)}


OPTIONS = (FidelityOptions,)


def _image_size(path: Path) -> tuple[int, int]:
    from library.generation.pipeline import open_image

    return open_image(path, "fidelity guide").size


class FidelityMeter:
    """Measures the network on the fidelity guides (main process; the others wait) and logs the figures."""

    def __init__(self, opts: FidelityOptions, models: SDXLModels, accelerator, size: tuple[int, int], sampler: str,
                 text: TextEncodingOptions = TextEncodingOptions()):
        self.models = models
        self.accelerator = accelerator
        # Prompts are encoded as the training captions are, so the LLLite is measured as it will be used.
        self.settings = EvalSettings(width=size[0], height=size[1], steps=opts.steps, scale=opts.scale,
                                     sampler=sampler, seed=opts.seed, clip_skip=text.clip_skip,
                                     max_embeddings_multiples=text.max_embeddings_multiples)
        items, blank = items_with_edges(opts.items, size)
        if blank:
            logger.warning("--fidelity_guides: skipping %d guide(s) without edges at %dx%d: %s", len(blank), *size,
                           ", ".join(i.guide.name for i in blank[:5]))
        if not items:
            raise UserError(f"--fidelity_guides {opts.folder}: no guide keeps an edge at the training size "
                            f"{size[0]}x{size[1]}; give canny maps with clearer edges")
        # Guide i of those kept gets seed + i, as tools/evaluate_control.py numbers a folder without blank guides.
        self.items = items
        self.baseline: dict[str, float] | None = None  # multiplier 0: computed once
        self.history: list[dict[str, float]] = []

    def __call__(self, network: ControlNetLLLite, step: int, epoch: int) -> None:
        together(self.accelerator, lambda: self.measure(network, step), f"measuring control fidelity at step {step}",
                 main_only=True)

    def measure(self, network: ControlNetLLLite, step: int) -> dict[str, float]:
        with drawing_with(self.models, network, self.accelerator):
            if self.baseline is None:
                self.baseline = self._mean(network, 0.0)
            now = self._mean(network, 1.0)
        base = self.baseline
        figures = {"fidelity/edge_f1": now["f1"], "fidelity/edge_ssim": now["ssim"],
                   "fidelity/edge_f1_base": base["f1"], "fidelity/edge_ssim_base": base["ssim"]}
        ratio = now["f1"] / base["f1"] if base["f1"] > 0 else math.nan
        if base["f1"] > 0:
            figures["fidelity/edge_f1_ratio"] = ratio
        logger.info("control fidelity at step %d on %d guides: edge F1 %.3f with the LLLite, %.3f without (%.2fx); "
                    "edge SSIM %.3f / %.3f", step, len(self.items), now["f1"], base["f1"], ratio, now["ssim"], base["ssim"])
        self.history.append({"step": step, **figures})
        log_values(self.accelerator, figures, step)
        return figures

    def _mean(self, network: ControlNetLLLite, multiplier: float) -> dict[str, float]:
        results = evaluate_control(self.models, network, self.items, self.settings, (multiplier,), progress=False)
        return results["mean"][f"{multiplier:g}"]
