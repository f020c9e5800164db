"""``--debug_dataset``: write what the trainer would see, so pairing and alignment can be checked by eye.

For each sample of the first ``num_batches`` batches, ``debug_dataset`` writes
``<out_dir>/b<batch>_s<sample>_<W>x<H>_<basename>.png`` showing three panels side by side:
the training image | the conditioning image | the conditioning image blended over the
training image (edges or poses must sit on the right places), and, when the batch has
``alpha_masks``, a fourth panel with the loss mask (white = full weight, shown at pixel size).
A guide made by a ``conditioning_preprocessor`` is the conditioning panel. A ``.txt`` file
beside it holds the caption, the paths, the bucket, the SDXL size conditioning and where the
guide comes from. One summary line per sample goes to the log.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.atomic_io import atomic_save_image, atomic_write_text
from library.data.dataset import ImageItem, LLLiteDataset

logger = logging.getLogger(__name__)


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    """Tensor[3,H,W] in [-1,1] -> uint8 HWC."""
    return ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


def _guide_source(item: ImageItem) -> str:
    sub = item.subset
    if not sub.conditioning_preprocessor:
        return f"conditioning image {item.conditioning_path}"
    options = ", ".join(f"{k}={v}" for k, v in sub.conditioning_preprocessor_args)
    source = item.conditioning_path or "the training image"
    return f"{sub.conditioning_preprocessor}({options}) of {source}, after resize and crop"


def debug_dataset(dataset: LLLiteDataset, out_dir: str | os.PathLike, num_batches: int = 4, epoch: int | None = None) -> list[Path]:
    """Save a panel PNG and a sidecar .txt per sample of the first ``num_batches`` batches; return the PNG paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    guides = {str(item.image_path): _guide_source(item) for item in dataset.items}
    for b in range(min(num_batches, len(dataset))):
        batch = dataset.get_batch(b, epoch=epoch, load_images=True)
        for s, path in enumerate(batch["image_paths"]):
            image = _to_uint8(batch["images"][s])
            cond = _to_uint8(batch["conditioning_images"][s])
            overlay = (image.astype(np.float32) * 0.5 + cond.astype(np.float32) * 0.5).round().astype(np.uint8)
            panels = [image, cond, overlay]
            if "alpha_masks" in batch:
                mask = batch["alpha_masks"][s, 0].float().clamp(0, 1).numpy()
                mask = np.kron(mask, np.ones((image.shape[0] // mask.shape[0], image.shape[1] // mask.shape[1])))
                panels.append(np.repeat((mask * 255).round().astype(np.uint8)[..., None], 3, axis=2))
            panel = np.concatenate(panels, axis=1)
            th, tw = batch["target_sizes_hw"][s].tolist()
            name = f"b{b:03d}_s{s:02d}_{tw}x{th}_{_safe_name(Path(path).stem)}"
            png = out / f"{name}.png"
            atomic_save_image(Image.fromarray(panel), png, "the debug panel")
            oh, ow = batch["original_sizes_hw"][s].tolist()
            top, left = batch["crop_top_lefts"][s].tolist()
            flipped = bool(batch["flipped"][s])
            caption = batch["captions"][s]
            extra = f"alpha mask mean: {float(batch['alpha_masks'][s].mean()):.3f}\n" if "alpha_masks" in batch else ""
            atomic_write_text(
                out / f"{name}.txt",
                f"caption: {caption}\nimage: {path}\nguide: {guides.get(path, 'conditioning image')}\n"
                f"bucket (w x h): {tw}x{th}\noriginal (w x h): {ow}x{oh}\n"
                f"crop top,left: {top},{left}\nflipped: {flipped}\n"
                f"network_multiplier: {float(batch['network_multipliers'][s])}\n" + extra,
                "the debug panel's description",
            )
            logger.info(
                "batch %d sample %d: %s bucket %dx%d original %dx%d crop (%d,%d)%s caption: %s",
                b, s, Path(path).name, tw, th, ow, oh, top, left, " flipped" if flipped else "", caption,
            )
            written.append(png)
    logger.info("debug_dataset: wrote %d sample panels to %s (image | conditioning | overlay)", len(written), out)
    return written
