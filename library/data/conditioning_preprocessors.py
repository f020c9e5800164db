"""Turn training images into conditioning (guide) images for ControlNet-LLLite.

Every preprocessor is a short pure function with one signature::

    fn(image_rgb: np.ndarray[H, W, 3] uint8, **options) -> np.ndarray[H, W, 3] uint8

and is listed by name in ``PREPROCESSORS``. ``convert_folder`` runs one of them over a folder
of images and writes a ``conditioning_data_dir`` (same basenames, ``.png``), which is what the
trainer pairs with the training images by basename.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from library.atomic_io import atomic_path
from library.errors import UserError
from library.image_files import IMAGE_EXTENSIONS, is_image_name

logger = logging.getLogger(__name__)

Preprocessor = Callable[..., np.ndarray]

# The extensions the trainer loads as images (compared lower-cased).


def _check_rgb(image_rgb: np.ndarray) -> None:
    # A wrong array here is a programming error (loaders always give HxWx3 uint8), not a user one.
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8:
        raise ValueError("expected a uint8 numpy array")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image_rgb.shape}")


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def canny(image_rgb: np.ndarray, *, low_threshold: float = 100, high_threshold: float = 200) -> np.ndarray:
    """OpenCV Canny edges: white (255) edges on black, as a 3-channel RGB image.

    Canny runs on the colour image itself (OpenCV takes the strongest gradient over the
    channels), so edges between colours of equal brightness are kept, as in the usual
    ControlNet canny annotator.
    """
    _check_rgb(image_rgb)
    if low_threshold < 0 or high_threshold < 0:
        raise UserError(f"canny thresholds must be >= 0, got low={low_threshold} high={high_threshold}")
    if low_threshold > high_threshold:
        raise UserError(
            f"canny low_threshold ({low_threshold}) is above high_threshold ({high_threshold}); swap them"
        )
    edges = cv2.Canny(np.ascontiguousarray(image_rgb), float(low_threshold), float(high_threshold))
    return _gray_to_rgb(edges)


def blur(image_rgb: np.ndarray, *, sigma: float = 5.0, downscale: float = 1.0) -> np.ndarray:
    """Blurred copy for "tile"/"blur" models.

    ``downscale`` > 1 first shrinks the image by that factor (area averaging) and scales it back
    (bicubic), which removes detail the way a low-resolution tile does; ``sigma`` > 0 then applies a
    Gaussian blur with that standard deviation in pixels. ``sigma=0, downscale=1`` returns a copy.
    """
    _check_rgb(image_rgb)
    if sigma < 0:
        raise UserError(f"blur sigma must be >= 0, got {sigma}")
    if downscale < 1:
        raise UserError(f"blur downscale must be >= 1 (1 = no downscaling), got {downscale}")
    h, w = image_rgb.shape[:2]
    out = image_rgb
    if downscale > 1:
        small = (max(1, round(w / downscale)), max(1, round(h / downscale)))
        out = cv2.resize(out, small, interpolation=cv2.INTER_AREA)
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC)
    if sigma > 0:
        # ksize (0, 0): OpenCV picks a kernel wide enough for sigma (about 6 sigma).
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma),
                               borderType=cv2.BORDER_REFLECT_101)
    return out.copy() if out is image_rgb else out


def lineart(image_rgb: np.ndarray, *, block_size: int = 9, c: float = 8.0, smooth: float = 1.0,
            invert: bool = False) -> np.ndarray:
    """Line-art-like map: black lines on white (``invert=True``: white lines on black).

    Recipe: grayscale, a light Gaussian blur (``smooth`` sigma, to drop sensor noise and JPEG
    ringing), then a mean adaptive threshold: a pixel becomes a line when it is darker than the
    mean of its ``block_size`` x ``block_size`` neighbourhood by more than ``c``. Flat areas of
    any brightness stay white and only local dark detail (outlines, the dark side of edges)
    turns black, so the result does not depend on global exposure. Larger ``c`` = fewer,
    cleaner lines.
    """
    _check_rgb(image_rgb)
    block_size = int(block_size)
    if block_size < 3 or block_size % 2 == 0:
        raise UserError(f"lineart block_size must be an odd number >= 3, got {block_size}")
    if smooth < 0:
        raise UserError(f"lineart smooth must be >= 0, got {smooth}")
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    if smooth > 0:
        gray = cv2.GaussianBlur(gray, (0, 0), sigmaX=float(smooth))
    lines = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY,
                                  block_size, float(c))
    if invert:
        lines = 255 - lines
    return _gray_to_rgb(lines)


def gray(image_rgb: np.ndarray) -> np.ndarray:
    """Grayscale copy (BT.601 luma) in 3 channels, for recolor models."""
    _check_rgb(image_rgb)
    return _gray_to_rgb(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY))


PREPROCESSORS: dict[str, Preprocessor] = {
    "canny": canny,
    "blur": blur,
    "lineart": lineart,
    "gray": gray,
}


# Short names accepted for options (the dataset example writes canny's thresholds as low/high).
OPTION_ALIASES: dict[str, dict[str, str]] = {
    "canny": {"low": "low_threshold", "high": "high_threshold"},
}


def preprocessor_options(name: str) -> dict[str, Any]:
    """The options ``name`` takes, with their defaults."""
    fn = get_preprocessor(name)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def get_preprocessor(name: str) -> Preprocessor:
    try:
        return PREPROCESSORS[name]
    except KeyError:
        raise UserError(
            f"unknown conditioning type {name!r}; choose one of: {', '.join(PREPROCESSORS)}"
        ) from None


def apply_preprocessor(name: str, image_rgb: np.ndarray, **options: Any) -> np.ndarray:
    """Run preprocessor ``name``; an option it does not take is a ``UserError`` naming it."""
    fn = get_preprocessor(name)
    known = preprocessor_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = ", ".join(known) or "no options"
        raise UserError(f"conditioning type {name!r} does not take {', '.join(unknown)} (it takes: {takes})")
    return fn(image_rgb, **options)


def canonical_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with aliases replaced by the full names, checked by running ``name`` on a tiny image.

    Raises ``UserError`` for an unknown preprocessor, an option it does not take, an option given
    twice (by name and alias), a value of the wrong type or out of range.
    """
    known = preprocessor_options(name)
    aliases = OPTION_ALIASES.get(name, {})
    out: dict[str, Any] = {}
    for key, value in options.items():
        full = aliases.get(key, key)
        if full in out:
            raise UserError(f"conditioning type {name!r}: {full} is given twice ({key} is another name for it)")
        default = known.get(full)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UserError(f"conditioning type {name!r}: {key} must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"conditioning type {name!r}: {key} must be a number, got {value!r}")
        out[full] = value
    apply_preprocessor(name, np.zeros((16, 16, 3), np.uint8), **out)
    return out


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and is_image_name(path)


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Load an image as HxWx3 uint8 RGB (alpha dropped, like the trainer does)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; fix or remove the file") from e


def save_image_rgb(path: str | os.PathLike, image_rgb: np.ndarray) -> None:
    """Write a PNG atomically (a crash never leaves a half-written conditioning image)."""
    with atomic_path(path, "the conditioning image") as tmp:
        Image.fromarray(image_rgb, mode="RGB").save(tmp, format="PNG")


def convert_folder(in_dir: str | os.PathLike, out_dir: str | os.PathLike, type_name: str,
                   options: dict[str, Any] | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``out_dir/<basename>.png`` for every image in ``in_dir`` (not recursive).

    Non-image files are skipped. Refuses (``UserError``) when ``in_dir`` is missing or has no
    images, when two inputs share a basename, when ``out_dir`` is ``in_dir``, and when outputs
    already exist unless ``overwrite``. Returns the written paths in name order.
    """
    options = dict(options or {})
    # Check the type and its options on a tiny blank image before touching any file.
    apply_preprocessor(type_name, np.zeros((16, 16, 3), np.uint8), **options)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise UserError(f"input directory {in_dir} does not exist (or is not a directory)")
    if out_dir.exists() and out_dir.resolve() == in_dir.resolve():
        raise UserError(f"output directory {out_dir} is the input directory; choose another one")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory")

    entries = sorted(in_dir.iterdir())
    images = [p for p in entries if is_image_file(p)]
    skipped = len(entries) - len(images)
    if not images:
        raise UserError(
            f"no images in {in_dir} (looked for {', '.join(IMAGE_EXTENSIONS)}); check the path"
        )
    if skipped:
        logger.info("skipping %d non-image entries in %s", skipped, in_dir)

    # The trainer pairs images by basename, so a.jpg and a.png cannot both have a guide.
    by_stem: dict[str, Path] = {}
    for p in images:
        if p.stem in by_stem:
            raise UserError(
                f"{by_stem[p.stem].name} and {p.name} in {in_dir} share the basename {p.stem!r}; "
                "both would write the same conditioning image - rename or remove one"
            )
        by_stem[p.stem] = p
    targets = [(p, out_dir / f"{p.stem}.png") for p in images]

    existing = [t for _, t in targets if t.exists()]
    if existing and not overwrite:
        shown = ", ".join(t.name for t in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise UserError(
            f"{len(existing)} output file(s) already exist in {out_dir} ({shown}); "
            "pass --overwrite to replace them or choose another output directory"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("writing %d %s conditioning images to %s", len(targets), type_name, out_dir)
    written: list[Path] = []
    for src, dst in tqdm(targets, desc=f"{type_name} conditioning", unit="img"):
        try:
            image = load_image_rgb(src)
        except UserError as e:
            if written:
                raise UserError(
                    f"{e} ({len(written)} image(s) were already written to {out_dir}; "
                    "rerun with --overwrite after fixing)"
                ) from e
            raise
        save_image_rgb(dst, apply_preprocessor(type_name, image, **options))
        written.append(dst)
    return written
