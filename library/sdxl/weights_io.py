"""Reading and writing weight files (.safetensors, .ckpt/.pt), with clear errors and atomic writes.

Also tells what kind of model a set of keys belongs to, so that every tool can say
"this is an LLLite file, not a checkpoint" instead of crashing on a missing key.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
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
KIND_CONTROLNET = "ControlNet"
KIND_SD3 = "SD3 checkpoint"
KIND_FLUX = "FLUX checkpoint"
KIND_UNKNOWN = "unknown"


def weights_kind(keys: Iterable[str]) -> str:
    """Classify a state dict by its keys."""
    keys = list(keys)
    if any(k.startswith("lllite_") for k in keys):
        return KIND_LLLITE
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return KIND_LORA
    if any(k.startswith(("control_model.", "controlnet_cond_embedding.", "input_hint_block.")) for k in keys):
        return KIND_CONTROLNET
    if any(k.startswith(("model.diffusion_model.joint_blocks.", "joint_blocks.")) for k in keys):
        return KIND_SD3
    if any(k.startswith(("model.diffusion_model.double_blocks.", "double_blocks.")) for k in keys):
        return KIND_FLUX
    if any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith(("conditioner.embedders.1.model.", "conditioner.embedders.0.model.")) for k in keys) or any(
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
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}.") from None
    if size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes): an interrupted download or copy? Download it again.")


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
    _check_exists(path, "weight file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise _damaged(path, "weight file", e) from None


def _damaged(path: Path, what: str, err: BaseException) -> UserError:
    if isinstance(err, PermissionError):
        return UserError(f"cannot read {what} {path}: permission denied. Check the file's permissions.")
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.errno is not None:
        return UserError(f"cannot read {what} {path}: {err.strerror or err}. Check the disk or network drive it is on.")
    size = path.stat().st_size if path.exists() else 0
    text = str(err)
    if m := re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", text, re.S):
        text = m.group(1)  # the cause, without torch's advice to load the file with weights_only=False
    text = " ".join(text.split())[:300]
    return UserError(
        f"could not read {what} {path} ({size:,} bytes): {type(err).__name__}: {text}. "
        "The file is damaged or truncated (an interrupted download?) or is not a weight file; download it again."
    )


def _not_weights_only(path: Path, what: str, err: Exception) -> UserError | None:
    """The clear error for a pickle that holds more than tensors, or None when ``err`` is something else."""
    text = str(err)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if not isinstance(err, pickle.UnpicklingError) or not m:
        return None
    return UserError(
        f"{what} {path} is a pickle that holds Python objects besides tensors (it needs {m.group(1)}). .ckpt/.pt files are "
        "loaded weights-only here, so that no code stored in a file can run. Use the model's .safetensors "
        "release, or convert this file to .safetensors with a tool you trust."
    )


def _safetensors_pread(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors read with plain reads instead of a memory map (``disable_mmap``)."""
    try:
        f = safe_open(str(path), framework="pt", device=device, backend="pread")
    except TypeError:
        # safetensors before the ``backend`` option: read the whole file into memory, as sd-scripts does
        # (this briefly holds the file's bytes and the tensors together).
        from safetensors.torch import load

        with open(path, "rb") as fh:
            tensors = load(fh.read())
        with safe_open(str(path), framework="pt") as header:
            metadata = dict(header.metadata() or {})
        return ({k: v.to(device) for k, v in tensors.items()} if device != "cpu" else tensors), metadata
    with f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def read_weights(
    path: str | os.PathLike,
    what: str = "weight file",
    *,
    device: str | torch.device | None = None,
    mmap: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a weight file.

    Args:
        path: a ``.safetensors`` (``.sft``) or ``.ckpt``/``.pt``/``.pth``/``.bin`` file.
        what: how error messages name the file ("checkpoint", "VAE file", ...).
        device: where the tensors are created (default: the CPU). Tensors are read straight onto it,
            without a copy in host memory first.
        mmap: with True (default), CPU tensors of safetensors files are backed by the file's pages
            (copy-on-write; they cost no anonymous memory until written), and zip-format ``.ckpt`` files
            are memory-mapped. With False, the file is read with plain reads instead, which is faster on
            WSL and network drives (sd-scripts' disable_mmap_load_safetensors option).

    ``.ckpt``/``.pt`` files are loaded with ``weights_only=True``: no pickled code runs. A top-level
    ``state_dict`` entry (Lightning-style checkpoints) is unwrapped.
    """
    path = Path(path)
    _check_exists(path, what)
    dev = str(torch.device(device)) if device is not None else "cpu"
    ext = path.suffix.lower()
    if ext in SAFETENSORS_EXTS:
        try:
            if not mmap:
                return _safetensors_pread(path, dev)
            tensors, metadata = {}, {}
            with safe_open(str(path), framework="pt", device=dev) as f:
                metadata = dict(f.metadata() or {})
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
            return tensors, metadata
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if dev != "cpu" and "device" in str(e).lower():
                raise UserError(
                    f"cannot read {what} {path} straight onto {dev}: {e}. Load it without lowram, or onto another device."
                ) from None
            raise _damaged(path, what, e) from None
    if ext in TORCH_EXTS:
        # mmap works for zip-format files only (torch.save's default since 1.6), not legacy pickles.
        use_mmap = mmap and zipfile.is_zipfile(path)
        try:
            obj = torch.load(str(path), map_location=dev, weights_only=True, mmap=use_mmap)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            raise (_not_weights_only(path, what, e) or _damaged(path, what, e)) from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a dictionary of tensors.")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise UserError(f"{what} {path} holds no tensors (keys: {list(obj)[:5]}). It is not a weight file.")
        return tensors, {}
    hint = " GGUF files hold quantized weights this tool cannot use;" if ext == ".gguf" else ""
    raise UserError(
        f"{what} {path}: unknown extension {path.suffix!r}.{hint} Use a .safetensors file (or .ckpt/.pt)."
    )


def write_weights(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
    what: str = "the weights file",
) -> None:
    """Write tensors atomically; the format follows the extension (.safetensors, else torch.save)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, what) as tmp:
        if path.suffix.lower() in SAFETENSORS_EXTS:
            save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        else:
            with open(tmp, "wb") as f:  # through Python, so a full disk surfaces as an OSError, not "unexpected pos"
                torch.save(tensors, f)
    logger.info("wrote %s", path)

