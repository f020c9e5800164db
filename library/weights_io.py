"""Reading and writing weight files (.safetensors, .ckpt/.pt), with clear errors and atomic writes.

Also tells what kind of model a set of keys belongs to, so that every tool can say
"this is an LLLite file, not a checkpoint" instead of crashing on a missing key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.atomic_io import atomic_path
from library.errors import UserError

logger = logging.getLogger(__name__)

SAFETENSORS_EXTS = {".safetensors", ".sft"}
TORCH_EXTS = {".ckpt", ".pt", ".pth", ".bin"}

# What kind of weights a key set holds; see ``weights_kind``.
KIND_LLLITE = "ControlNet-LLLite"
KIND_SDXL = "SDXL checkpoint"
KIND_SD1 = "SD1.x checkpoint"
KIND_SD2 = "SD2.x checkpoint"
KIND_LORA = "LoRA"
KIND_DIFFUSERS_UNET = "diffusers U-Net weights"
KIND_UNKNOWN = "unknown"


def weights_kind(keys: Iterable[str]) -> str:
    """Classify a state dict by its keys."""
    keys = list(keys)
    if any(k.startswith("lllite_") for k in keys):
        return KIND_LLLITE
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return KIND_LORA
    if any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith("conditioner.embedders.1.model.") for k in keys) or any(
            k.startswith("model.diffusion_model.label_emb.") for k in keys
        ):
            return KIND_SDXL
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            return KIND_SD2
        return KIND_SD1
    if any(k.startswith("down_blocks.") for k in keys) and any(k.startswith("conv_in.") for k in keys):
        return KIND_DIFFUSERS_UNET
    return KIND_UNKNOWN


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} not found: {path}. Check the path.")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, but a weight file (.safetensors, .ckpt, .pt) was expected.")


def read_keys(path: str | os.PathLike, what: str = "weight file") -> list[str]:
    """The tensor names in a file, reading only the header where the format allows it."""
    path = Path(path)
    _check_exists(path, what)
    if path.suffix.lower() in SAFETENSORS_EXTS:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises several types for damaged files
            raise _damaged(path, what, e) from None
    return list(read_weights(path, what)[0].keys())


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_EXTS:
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise _damaged(path, "weight file", e) from None


def _damaged(path: Path, what: str, err: Exception) -> UserError:
    size = path.stat().st_size if path.exists() else 0
    return UserError(
        f"could not read {what} {path} ({size:,} bytes): {type(err).__name__}: {err}. "
        "The file is damaged or truncated (an interrupted download?) or is not a weight file; download it again."
    )


def read_weights(path: str | os.PathLike, what: str = "weight file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors (on the CPU) and the metadata of a weight file.

    ``.ckpt``/``.pt`` files are loaded with ``weights_only=True``: no pickled code runs.
    """
    path = Path(path)
    _check_exists(path, what)
    ext = path.suffix.lower()
    if ext in SAFETENSORS_EXTS:
        try:
            tensors, metadata = {}, {}
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
            return tensors, metadata
        except Exception as e:
            raise _damaged(path, what, e) from None
    if ext in TORCH_EXTS:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise _damaged(path, what, e) from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a dictionary of tensors.")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        return tensors, {}
    raise UserError(
        f"{what} {path}: unknown extension {path.suffix!r}. Use a .safetensors file (or .ckpt/.pt)."
    )


def write_weights(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors atomically; the format follows the extension (.safetensors, else torch.save)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if path.suffix.lower() in SAFETENSORS_EXTS:
            save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save(tensors, tmp)
    logger.info("wrote %s", path)


def metadata_json(value: object) -> str:
    """Metadata values must be strings in safetensors; structured values go in as JSON."""
    return value if isinstance(value, str) else json.dumps(value)
