"""Which files are images: the one list of extensions the dataset, the guide preprocessors and generation read."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_image_name(path: Path) -> bool:
    """``path`` ends with an image extension (any case); the file itself is not opened."""
    return path.suffix.lower() in IMAGE_EXTENSIONS
