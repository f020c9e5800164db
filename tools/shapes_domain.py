"""A procedural image domain: one flat-coloured shape on a plain background, with a caption.

The bundled tiny SDXL (``tools/build_tiny_sdxl.py``) is trained on it, and the LLLite demo takes its
held-out guides and captions from it. Captions have one form::

    "a {colour} {shape} on a {background} background"     e.g. "a red circle on a white background"

Shapes are upright (not rotated); their position and size vary a lot, and nothing in the caption says
where the shape is, so a control image (e.g. canny edges) is what decides the placement.

:func:`analyse_image` is the procedural check used to score generated images: it finds the
background from the image border, takes the largest region that differs from it, names its colour
by the nearest palette colour and its shape by template matching inside the region's bounding box.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 55, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
# (colour, shape, background) combinations that the tiny model never sees in training: the evaluation
# reports them separately, as a check that the text encoders learnt words rather than whole captions.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "ring", "black"),
    ("green", "square", "white"),
    ("blue", "triangle", "gray"),
    ("yellow", "circle", "black"),
    ("purple", "triangle", "white"),
)

IMAGE_SIZE = 64
MIN_HALF_SIZE = 0.22  # half-extent of a shape's box, as a fraction of the image side
MAX_HALF_SIZE = 0.42
MARGIN = 1  # pixels kept free between a shape and the image border
RING_INNER = 0.55  # hole / outer radius of the ring
_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on an? (\w+) background$")


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that decides one image: what is drawn, where, and how big (pixels)."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    half_size: float
    colour_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]

    def caption(self) -> str:
        return make_caption(self.colour, self.shape, self.background)

    def to_dict(self) -> dict:
        return asdict(self)


def make_caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """(colour, shape, background) of a caption of this domain, or None when it is not one."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if not m or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in BACKGROUNDS:
        return None
    return m.group(1), m.group(2), m.group(3)


def all_combinations() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def training_combinations() -> list[tuple[str, str, str]]:
    held = set(HELD_OUT)
    return [t for t in all_combinations() if t not in held]


def vocabulary() -> dict[str, list[str]]:
    return {"colours": list(COLOURS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS)}


# ----------------------------------------------------------------------------------------------
# Sampling and drawing
# ----------------------------------------------------------------------------------------------


def _jitter(rgb: Sequence[int], amount: int, rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)  # type: ignore[return-value]


def sample_spec(
    rng: np.random.Generator,
    image_size: int = IMAGE_SIZE,
    combinations: Sequence[tuple[str, str, str]] | None = None,
    combination: tuple[str, str, str] | None = None,
) -> ShapeSpec:
    """A random spec: the combination from ``combination`` or uniformly from ``combinations``
    (default: the training combinations), a size and a position that keeps the shape inside the image."""
    if combination is None:
        combos = combinations if combinations is not None else training_combinations()
        combination = combos[int(rng.integers(len(combos)))]
    colour, shape, background = combination
    half = float(rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE)) * image_size
    lo, hi = half + MARGIN, image_size - half - MARGIN
    cx, cy = (float(rng.uniform(lo, hi)) for _ in range(2))
    return ShapeSpec(
        colour, shape, background, cx, cy, half,
        _jitter(COLOURS[colour], 12, rng), _jitter(BACKGROUNDS[background], 6, rng),
    )


def _outline(shape: str, cx: float, cy: float, h: float) -> np.ndarray | None:
    """Polygon points of a polygonal shape (None for round ones)."""
    if shape == "square":
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    if shape == "triangle":
        return np.array([[cx, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    return None


_SHIFT = 4  # OpenCV sub-pixel bits: shapes land at fractional positions, with antialiased edges


def _fixed(v: float) -> int:
    return int(round(v * (1 << _SHIFT)))


def _draw(img: np.ndarray, shape: str, cx: float, cy: float, h: float, rgb, bg_rgb) -> None:
    # Pixel centres are at integer coordinates in OpenCV; shift so the shape box is [cx-h, cx+h] in pixel edges.
    cx, cy = cx - 0.5, cy - 0.5
    if shape in ("circle", "ring"):
        cv2.circle(img, (_fixed(cx), _fixed(cy)), _fixed(h), rgb, -1, cv2.LINE_AA, _SHIFT)
        if shape == "ring":
            cv2.circle(img, (_fixed(cx), _fixed(cy)), _fixed(h * RING_INNER), bg_rgb, -1, cv2.LINE_AA, _SHIFT)
        return
    pts = _outline(shape, cx, cy, h)
    cv2.fillPoly(img, [np.round(pts * (1 << _SHIFT)).astype(np.int32)], rgb, cv2.LINE_AA, _SHIFT)


def render(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The spec drawn as an (H, W, 3) uint8 RGB image."""
    img = np.empty((image_size, image_size, 3), np.uint8)
    img[:] = spec.background_rgb
    _draw(img, spec.shape, spec.cx, spec.cy, spec.half_size, spec.colour_rgb, spec.background_rgb)
    return img


def generate(
    n: int,
    seed: int,
    image_size: int = IMAGE_SIZE,
    combinations: Sequence[tuple[str, str, str]] | None = None,
) -> tuple[np.ndarray, list[str], list[ShapeSpec]]:
    """``n`` images (N, H, W, 3 uint8), their captions and specs; the same seed gives the same images."""
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, image_size, combinations) for _ in range(n)]
    images = np.stack([render(s, image_size) for s in specs]) if specs else np.zeros((0, image_size, image_size, 3), np.uint8)
    return images, [s.caption() for s in specs], specs


def evaluation_captions(n: int, include_seen: bool = True) -> list[str]:
    """``n`` captions cycling through the held-out combinations, interleaved with seen ones."""
    held = [make_caption(*t) for t in HELD_OUT]
    seen = [make_caption(*t) for t in training_combinations()]
    out: list[str] = []
    i = j = 0
    while len(out) < n:
        if not include_seen or len(out) % 2 == 0:
            out.append(held[i % len(held)])
            i += 1
        else:
            # A stride coprime with the number of seen combinations visits all of them.
            out.append(seen[(j * 7) % len(seen)])
            j += 1
    return out


# ----------------------------------------------------------------------------------------------
# Scoring generated images
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _template(shape: str) -> np.ndarray:
    """A high-resolution mask of ``shape``, cropped to its bounding box (float32 in [0, 1])."""
    size, h = 256, 120.0
    img = np.zeros((size, size, 3), np.uint8)
    _draw(img, shape, size / 2, size / 2, h, (255, 255, 255), (0, 0, 0))
    m = img[..., 0].astype(np.float32) / 255
    ys, xs = np.nonzero(m > 0.5)
    return m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _template_at(shape: str, w: int, h: int) -> np.ndarray:
    return cv2.resize(_template(shape), (w, h), interpolation=cv2.INTER_AREA) > 0.5


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = [float(np.sum((rgb.astype(np.float32) - np.array(palette[k], np.float32)) ** 2)) for k in names]
    return names[int(np.argmin(d))]


def analyse_image(image: np.ndarray, threshold: int = 60) -> dict:
    """Name the background, the colour and the shape of the main object of an RGB uint8 image.

    Returns a dict with ``background``, ``colour``, ``shape`` (``"none"`` when nothing stands out from
    the background), ``area`` (pixels of the object), ``bbox`` (x0, y0, x1, y1) and ``shape_scores``
    (IoU with each shape template fitted to the bounding box).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError("analyse_image expects a uint8 RGB image")
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    diff = np.abs(img.astype(np.int16) - bg.astype(np.int16)).max(axis=2)
    mask = (diff > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    result = {"background": _nearest(bg, BACKGROUNDS), "colour": "none", "shape": "none", "area": 0, "bbox": None,
              "shape_scores": {}}
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return result
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    area = int(stats[best, cv2.CC_STAT_AREA])
    x, y, w, h = (int(stats[best, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    result.update(area=area, bbox=(x, y, x + w, y + h))
    if area < 30:
        return result
    region = (labels == best).astype(np.uint8)
    # The colour of the object's inside, away from antialiased or blurred edges.
    inner = cv2.erode(region, np.ones((3, 3), np.uint8))
    pixels = img[inner.astype(bool)] if inner.sum() >= 10 else img[region.astype(bool)]
    result["colour"] = _nearest(np.median(pixels, axis=0), COLOURS)
    crop = region[y : y + h, x : x + w].astype(bool)
    scores = {}
    for shape in SHAPES:
        t = _template_at(shape, w, h)
        scores[shape] = float((t & crop).sum() / max(1, (t | crop).sum()))
    result["shape_scores"] = scores
    result["shape"] = max(scores, key=scores.get)
    return result


def score_images(images: Iterable[np.ndarray], captions: Sequence[str]) -> dict:
    """Accuracy of colour, shape, both and background of ``images`` against their ``captions``.

    Also split into captions whose combination was held out of training (``held_out_*``) and the rest.
    """
    held = set(HELD_OUT)
    rows = []
    for img, cap in zip(images, captions):
        want = parse_caption(cap)
        if want is None:
            raise ValueError(f"not a caption of the shapes domain: {cap!r}")
        got = analyse_image(img)
        rows.append({
            "caption": cap,
            "held_out": want in held,
            "colour_ok": got["colour"] == want[0],
            "shape_ok": got["shape"] == want[1],
            "background_ok": got["background"] == want[2],
            "found": got,
        })
    def acc(sel, key):
        sel = list(sel)
        return float(np.mean([r[key] for r in sel])) if sel else float("nan")
    out: dict = {"n": len(rows), "rows": rows}
    for prefix, sel in (("", rows), ("held_out_", [r for r in rows if r["held_out"]]), ("seen_", [r for r in rows if not r["held_out"]])):
        out[prefix + "colour"] = acc(sel, "colour_ok")
        out[prefix + "shape"] = acc(sel, "shape_ok")
        out[prefix + "background"] = acc(sel, "background_ok")
        out[prefix + "both"] = float(np.mean([r["colour_ok"] and r["shape_ok"] for r in sel])) if sel else float("nan")
    return out
