"""Does a trained LLLite control the image? Generate on guide images and measure.

For edge guides (canny), the measure is the binary F1 between the guide's edges and Canny of the
generated image (the metric ControlNet++ reports), plus SSIM between the two edge maps. Each
guide is drawn with the same seed at every multiplier, so multiplier 0 is the base model's own
answer to the prompt: the baseline.

Pixel-exact edge F1 stays far below 1 even for an image with exactly the guide's layout: every
redrawn contour lands a pixel or two off. So where the images the guides were made from are at hand,
a reference row scores img2img from each source image (LLLite off) at a middle strength: the
layout is given and only the details are redrawn. That is the scale against which the LLLite's
figure can be read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from library.atomic_io import atomic_path, atomic_write_text
from library.data.conditioning_preprocessors import is_image_file
from library.errors import UserError
from library.evaluation.metrics import evaluate_pair, guide_edge_map
from library.generation.pipeline import GenerationRequest, generate, open_image
from library.generation.samplers import DEFAULT_SAMPLER
from library.sdxl.loading import SDXLModels

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalItem:
    guide: Path
    prompt: str
    source: Path | None = None  # the image the guide was made from, for the reference row


@dataclass
class EvalSettings:
    width: int = 1024
    height: int = 1024
    steps: int = 20
    scale: float = 7.0
    sampler: str = DEFAULT_SAMPLER
    seed: int = 0
    negative_prompt: str = ""
    low_threshold: int = 100
    high_threshold: int = 200
    clip_skip: int | None = None  # as the LLLite was trained (training passes its text encoding)
    max_embeddings_multiples: int = 1


def load_eval_set(folder: str | Path, prompt: str | None = None, caption_extension: str = ".txt",
                  sources: str | Path | None = None, prompt_option: str | None = "--prompt") -> list[EvalItem]:
    """Guide images in ``folder``; each prompt is ``<stem><caption_extension>`` beside it, else ``prompt``.

    ``sources``: a folder holding, for every guide, the image it was made from under the same stem
    (any image extension). ``prompt_option``: the option that gives ``prompt``, named in the message
    when a prompt is missing (None: the caller has no such option).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"guide folder not found: {folder}")
    items = []
    missing = []
    for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
        caption = path.with_suffix(caption_extension)
        if caption.is_file():
            items.append(EvalItem(path, caption.read_text(encoding="utf-8").strip()))
        elif prompt is not None:
            items.append(EvalItem(path, prompt))
        else:
            missing.append(caption.name)
    if missing:
        fallback = f" or give {prompt_option} for all" if prompt_option else ""
        raise UserError(
            f"{folder}: {len(missing)} guide image(s) have no prompt file (e.g. {', '.join(missing[:3])}); "
            f"write one beside each guide{fallback}"
        )
    if not items:
        raise UserError(f"{folder} holds no guide images (.png, .jpg, .webp, ...)")
    if sources is not None:
        items = _attach_sources(items, Path(sources))
    return items


def _attach_sources(items: list[EvalItem], sources: Path) -> list[EvalItem]:
    if not sources.is_dir():
        raise UserError(f"source image folder not found: {sources}")
    by_stem = {p.stem: p for p in sorted(sources.iterdir()) if is_image_file(p)}
    missing = [item.guide.stem for item in items if item.guide.stem not in by_stem]
    if missing:
        raise UserError(
            f"{sources}: no source image for {len(missing)} guide(s) (e.g. {', '.join(missing[:3])}); "
            "each guide needs the image it was made from under the same name, or leave out the sources"
        )
    return [EvalItem(item.guide, item.prompt, by_stem[item.guide.stem]) for item in items]


def _rgb(image: Image.Image | str | Path, size: tuple[int, int]) -> np.ndarray:
    img = image if isinstance(image, Image.Image) else open_image(image, "guide image")
    img = img.convert("RGB")
    if img.size != size:
        img = img.resize(size, Image.NEAREST)  # edges stay binary
    return np.asarray(img)


def items_with_edges(items: Sequence[EvalItem], size: tuple[int, int]) -> tuple[list[EvalItem], list[EvalItem]]:
    """(guides with at least one edge pixel at ``size``, guides without): evaluate_control skips the latter."""
    kept, blank = [], []
    for item in items:
        (kept if guide_edge_map(_rgb(item.guide, size)).any() else blank).append(item)
    return kept, blank


def evaluate_control(
    models: SDXLModels,
    network,
    items: Sequence[EvalItem],
    settings: EvalSettings,
    multipliers: Sequence[float] = (0.0, 1.0),
    image_dir: str | Path | None = None,
    reference_strength: float = 0.5,
    progress: bool = True,
) -> dict:
    """Generate every guide at every multiplier and score the edges; returns per-item and mean figures.

    Items with a ``source`` are also drawn by img2img from it at ``reference_strength`` without the
    LLLite; their mean is ``results["reference"]`` (None when no item has a source).

    A guide without a single edge pixel is skipped with a warning: its F1 would be 1 for an output
    without edges and 0 otherwise, which says nothing about control and swamps the mean.
    """
    per_item = []
    size = (settings.width, settings.height)
    guides = {item.guide: _rgb(item.guide, size) for item in items}
    blank = {item.guide for item in items if not guide_edge_map(guides[item.guide]).any()}
    if blank:
        logger.warning("skipping %d guide(s) without edges: %s", len(blank), ", ".join(sorted(p.name for p in blank)[:5]))
    if len(blank) == len(items):
        raise UserError("none of the guide images has any edges (white pixels on black); give canny edge maps")
    scored = [(i, item) for i, item in enumerate(items) if item.guide not in blank]
    n_refs = sum(item.source is not None for _, item in scored)
    bar = tqdm(total=len(scored) * len(multipliers) + n_refs, desc="evaluating", unit="image", disable=not progress)

    def draw_and_score(item: EvalItem, request: GenerationRequest, lllites: list, row: dict, name: str) -> None:
        image = generate(models, lllites, request, progress=False)[0]
        scores = evaluate_pair(guides[item.guide], _rgb(image, size), settings.low_threshold, settings.high_threshold)
        per_item.append({"guide": str(item.guide), "prompt": item.prompt, **row,
                         "f1": float(scores["f1"]), "ssim": float(scores["ssim"])})
        if image_dir is not None:
            out = Path(image_dir) / f"{item.guide.stem}_{name}.png"
            with atomic_path(out, "the evaluation image") as tmp:
                image.save(tmp, format="PNG")
        bar.update(1)

    for i, item in scored:
        base = GenerationRequest(
            prompt=item.prompt, negative_prompt=settings.negative_prompt, width=settings.width,
            height=settings.height, steps=settings.steps, scale=settings.scale, sampler=settings.sampler,
            seed=settings.seed + i, clip_skip=settings.clip_skip,
            max_embeddings_multiples=settings.max_embeddings_multiples,
        )
        for mult in multipliers:
            request = replace(base, guide_images=[str(item.guide)], control_multipliers=[float(mult)])
            draw_and_score(item, request, [network], {"multiplier": float(mult)}, f"m{mult:g}")
        if item.source is not None:
            request = replace(base, init_image=str(item.source), strength=reference_strength)
            draw_and_score(item, request, [], {"reference_strength": reference_strength}, "ref")
    bar.close()

    def mean_of(rows: list[dict]) -> dict:
        return {"f1": float(np.mean([r["f1"] for r in rows])), "ssim": float(np.mean([r["ssim"] for r in rows]))}

    means = {f"{m:g}": mean_of([r for r in per_item if r.get("multiplier") == float(m)]) for m in multipliers}
    refs = [r for r in per_item if "reference_strength" in r]
    reference = {"strength": reference_strength, **mean_of(refs)} if refs else None
    skipped = [str(item.guide) for item in items if item.guide in blank]
    return {"settings": asdict(settings), "mean": means, "reference": reference, "per_item": per_item,
            "skipped_without_edges": skipped}


def format_table(results: dict) -> str:
    lines = ["| multiplier | edge F1 | edge SSIM |", "|---:|---:|---:|"]
    for mult, m in results["mean"].items():
        lines.append(f"| {mult} | {m['f1']:.3f} | {m['ssim']:.3f} |")
    ref = results.get("reference")
    if ref:
        lines.append(f"| reference: img2img from the source, strength {ref['strength']:g}, no LLLite "
                     f"| {ref['f1']:.3f} | {ref['ssim']:.3f} |")
    means = list(results["mean"].values())
    if len(means) >= 2 and means[0]["f1"] > 0:
        lines.append(f"\nF1 with the LLLite / baseline: {means[-1]['f1'] / means[0]['f1']:.2f}x")
    if len(means) >= 2 and ref and ref["f1"] > means[0]["f1"]:
        share = (means[-1]["f1"] - means[0]["f1"]) / (ref["f1"] - means[0]["f1"])
        lines.append(f"the LLLite goes {share:.0%} of the way from the baseline's F1 to the reference's")
    return "\n".join(lines)


def write_json(results: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(results, indent=2), "the results file")
