"""Where a base model comes from: a local file or folder, or a Hugging Face hub id (no torch: option checks use it)."""

from __future__ import annotations

import re
from pathlib import Path

from library.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"}


def is_hub_id(path_or_id: str) -> bool:
    """``owner/name`` that is not a local path or a weight file name: a model to fetch from the hub."""
    path = Path(path_or_id).expanduser()
    return not path.exists() and bool(_HUB_ID.match(path_or_id)) and path.suffix.lower() not in _WEIGHT_SUFFIXES


def check_model_source(path_or_id: str, option: str = "the model") -> None:
    """Refuse a model that is neither an existing file or folder nor a hub id, before anything loads."""
    if Path(path_or_id).expanduser().exists() or is_hub_id(path_or_id):
        return
    raise UserError(
        f"{option} {path_or_id}: not found. Give an SDXL .safetensors/.ckpt file, a diffusers folder, "
        "or a Hugging Face hub id such as stabilityai/stable-diffusion-xl-base-1.0."
    )
