"""Bucket geometry: which bucket an image goes to, how it is resized and where it is cropped.

All sizes here are ``(width, height)`` tuples of pixels; crop positions are ``(top, left)``.

* With bucketing, ``BucketPlan.select`` picks the bucket whose aspect ratio is closest to
  the image's among buckets of about ``resolution`` area whose sides lie in
  ``[min_bucket_reso, max_bucket_reso]`` and are multiples of ``bucket_reso_steps``. With
  ``bucket_no_upscale`` the bucket is made from the image itself (scaled down to the area if
  larger, then rounded down to the steps) so that an image is never enlarged.
* Without bucketing, every image goes to the single bucket ``resolution``.

An image is then resized, keeping its aspect ratio, to the smallest size that covers the
bucket (``resized_size``) and cropped to the bucket (``crop_position``: centered, or
random with ``random_crop``). With ``face_crop_aug_range`` an image with a known face box is
instead scaled by a random factor and cropped around the face (``face_crop``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Size = tuple[int, int]  # (width, height)


def make_buckets(resolution: Size, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """Every bucket with sides in [min_reso, max_reso], multiples of ``steps``, of at most the area
    of ``resolution`` and, for each width, the largest height that fits that area."""
    max_area = resolution[0] * resolution[1]
    buckets: set[Size] = set()
    side = math.ceil(min_reso / steps) * steps
    while side <= max_reso:
        other = min(max_reso, (max_area // side) // steps * steps)
        if other >= min_reso:
            buckets.add((side, other))
            buckets.add((other, side))
        side += steps
    return sorted(buckets)


@dataclass
class BucketPlan:
    """Bucketing rules of one dataset."""

    resolution: Size
    enable_bucket: bool = False
    min_reso: int = 256
    max_reso: int = 1024  # sd-scripts' default (SDXL users often set 2048)
    steps: int = 64
    no_upscale: bool = False
    buckets: list[Size] = field(init=False)

    def __post_init__(self) -> None:
        # With bucket_no_upscale each image gets its own bucket, so there is no fixed list.
        use_list = self.enable_bucket and not self.no_upscale
        self.buckets = make_buckets(self.resolution, self.min_reso, self.max_reso, self.steps) if use_list else []

    def select(self, image_size: Size) -> Size:
        """The bucket ``(width, height)`` for an image of ``image_size``."""
        if not self.enable_bucket:
            return self.resolution
        if self.no_upscale:
            return self._fit_without_upscale(image_size)
        w, h = image_size
        target = math.log(w / h)
        # Closest aspect ratio; on a tie the larger bucket keeps more detail.
        return min(self.buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))

    def _fit_without_upscale(self, image_size: Size) -> Size:
        w, h = image_size
        max_area = self.resolution[0] * self.resolution[1]
        scale = min(1.0, math.sqrt(max_area / (w * h)), self.max_reso / w, self.max_reso / h)
        # Round down so the image still covers the bucket; a side below one step is the only enlargement.
        bw = max(self.steps, int(w * scale + 1e-6) // self.steps * self.steps)
        bh = max(self.steps, int(h * scale + 1e-6) // self.steps * self.steps)
        return (bw, bh)


def resized_size(image_size: Size, bucket: Size) -> Size:
    """The size the image is resized to (aspect kept) so that it just covers ``bucket``."""
    w, h = image_size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    return (max(bw, round(w * scale)), max(bh, round(h * scale)))


def crop_position(resized: Size, bucket: Size, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """``(top, left)`` of the bucket-sized crop in the resized image: centered, or random given ``rng``."""
    extra_w, extra_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if rng is None:
        return (extra_h // 2, extra_w // 2)
    return (int(rng.integers(0, extra_h + 1)), int(rng.integers(0, extra_w + 1)))


def flipped_crop_left(resized_width: int, crop_left: int, bucket_width: int) -> int:
    """The crop's left edge measured in the mirrored image (what SDXL's size conditioning wants)."""
    return resized_width - crop_left - bucket_width


def face_crop(image_size: Size, target: Size, face: tuple[int, int, int, int], scale_range: tuple[float, float],
              rng: np.random.Generator, random_crop: bool = False) -> tuple[Size, tuple[int, int]]:
    """``(resized, (top, left))`` of a crop of ``target`` around a face, the meaning of sd-scripts' face crop.

    ``face`` is ``(center_x, center_y, width, height)`` in the image. The scale is drawn so that the
    target's short side is ``scale_range[0]..scale_range[1]`` times the face size, never enlarging the
    image beyond 1 unless it must to cover the target. The crop is centred on the face; with
    ``random_crop`` it moves by a triangular random offset up to the longer distance from the face to an
    edge, otherwise (for a scale range and a face of at least 40 px and a tenth of the short side) by up
    to 5% of the face size. It is kept inside the image.
    """
    w, h = image_size
    tw, th = target
    cx, cy, fw, fh = face
    face_size = max(fw, fh)
    short = min(tw, th)
    cover = max(tw / w, th / h)
    low = max(cover, min(1.0, short / (face_size * scale_range[1])))
    high = max(low, min(1.0, short / (face_size * scale_range[0])))
    scale = low if low >= high else float(rng.uniform(low, high))
    resized = (max(tw, int(w * scale + 0.5)), max(th, int(h * scale + 0.5)))
    position = []
    for size, length, center in ((th, resized[1], cy * scale), (tw, resized[0], cx * scale)):
        start = int(center + 0.5) - size // 2
        if random_crop:
            spread = int(max(length - center, center))
            start += int(rng.integers(0, spread + 1)) + int(rng.integers(0, spread + 1)) - spread
        elif scale_range[0] != scale_range[1] and face_size > short // 10 and face_size >= 40:
            start += int(rng.integers(-(face_size // 20), face_size // 20 + 1))
        position.append(max(0, min(start, length - size)))
    return resized, (position[0], position[1])
