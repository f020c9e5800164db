"""Training state folders: the record that says a state is complete, and the check before one is trusted.

A state folder holds accelerate's files (LLLite weights, optimizer, scheduler, sampler and RNG
states), one noise stream per process, and ``train_state.json``, written last: the run's position
and a manifest of every other file with its size and SHA-256 (hashing runs at about 1.7 GB/s, a
fraction of the time the save itself takes). ``--resume`` checks a folder against its manifest
before any model loads, so a state cut short by a full disk or an interrupted copy is refused with
the name of the bad file, and the message offers the newest complete state of the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from library.atomic_io import atomic_write_text
from library.errors import UserError

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
POSITION_KEYS = ("global_step", "epoch", "batches_in_epoch")
# <output_name>-state, <output_name>-step00000012-state, <output_name>-000003-state (see Saver.state_path)
_STATE_NAME = re.compile(r"^(?P<run>.+?)(?:-(?:step\d{8}|\d{6}))?-state$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        with contextlib.suppress(OSError):  # the data on the disk before the folder is renamed into place
            os.fsync(f.fileno())
    return h.hexdigest()


def write_state_record(folder: Path, position: dict[str, int]) -> None:
    """Write ``train_state.json`` into the finished ``folder``: the position and every file's size and digest."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != STATE_FILE:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    record = {**{k: position[k] for k in POSITION_KEYS}, "files": files}
    atomic_write_text(folder / STATE_FILE, json.dumps(record, indent=1), "the training state record")


def _read_record(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = folder / STATE_FILE
    if not path.is_file():
        return None, (f"{STATE_FILE} is missing, so this is not a complete state (a save that was cut short leaves "
                      "none; only folders written by this script's state saving can be resumed)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not all(isinstance(record[k], int) for k in POSITION_KEYS):
            raise ValueError("the step, epoch or batch is not a number")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        return None, f"{STATE_FILE} is damaged ({e})"
    return record, None


def read_state_record(folder: Path) -> dict[str, Any]:
    """``train_state.json`` of ``folder``; a missing or damaged one is a ``UserError`` naming the folder."""
    record, problem = _read_record(folder)
    if record is None:
        raise UserError(f"--resume {folder}: {problem}{newest_hint(folder)}")
    return record


def state_problem(folder: Path, digests: bool = True) -> str | None:
    """What is wrong with the state ``folder`` (None when it is complete), naming the bad file."""
    record, problem = _read_record(folder)
    if record is None:
        return problem
    files = record.get("files")
    if not isinstance(files, dict):  # saved before states had a manifest: only each file's own structure is checked
        return _structure_problem(folder)
    for name, meta in files.items():
        path = folder / name
        if not isinstance(meta, dict):
            return f"{STATE_FILE} is damaged (its entry for {name})"
        if not path.is_file():
            return f"{name} is missing (the state was saved with it)"
        size = path.stat().st_size
        if size != meta.get("size"):
            return (f"{name} is {size} bytes but was saved with {meta.get('size')} (cut short by an interrupted copy "
                    "or a full disk?)")
    if digests:
        for name, meta in files.items():
            if _sha256(folder / name) != meta.get("sha256"):
                return f"{name} is damaged: its SHA-256 differs from the one saved with it"
    return None


def _structure_problem(folder: Path) -> str | None:
    """Zip archives (torch.save) and safetensors files that end early, in a state without a manifest."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            head = f.read(8)
        size = path.stat().st_size
        if head[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            return f"{path.relative_to(folder).as_posix()} is cut short (its zip archive has no end)"
        if path.suffix == ".safetensors" and len(head) == 8:
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                return f"{path.relative_to(folder).as_posix()} is cut short (it ends inside its header)"
            try:
                with open(path, "rb") as f:
                    f.seek(8)
                    header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, OSError):
                return f"{path.relative_to(folder).as_posix()} is damaged (its safetensors header cannot be read)"
            if size < 8 + n + end:
                return f"{path.relative_to(folder).as_posix()} is cut short ({size} of {8 + n + end} bytes)"
    return None


def check_state_folder(folder: Path) -> None:
    """Refuse a state folder that is missing, incomplete or damaged, before any model loads."""
    if not folder.is_dir():
        from library.cli import option_label
        from library.training.hub_upload import HubOptions
        from library.training.saving import SavingOptions

        raise UserError(f"--resume {folder}: no such state folder (it is written by {option_label(SavingOptions, 'save_state')} "
                        f"or {option_label(SavingOptions, 'save_state_on_train_end')}; a state on the Hugging Face Hub needs "
                        f"{option_label(HubOptions, 'resume_from_huggingface')}){newest_hint(folder)}")
    problem = state_problem(folder)
    if problem is not None:
        raise UserError(f"--resume {folder}: {problem}; this state cannot be resumed{newest_hint(folder)}")


def _states_of_run(folder: Path) -> list[tuple[int, float, Path]]:
    """(step, time, path) of the complete-looking states beside ``folder`` that belong to the same run."""
    m = _STATE_NAME.match(folder.name)
    parent = folder.parent
    if m is None or not parent.is_dir():
        return []
    out = []
    for p in parent.iterdir():
        n = _STATE_NAME.match(p.name)
        if n is None or n["run"] != m["run"] or p.name.startswith(".") or not (p / STATE_FILE).is_file():
            continue
        try:
            step = int(json.loads((p / STATE_FILE).read_text(encoding="utf-8"))["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append((step, (p / STATE_FILE).stat().st_mtime, p))
    return sorted(out, key=lambda t: t[:2])


def newest_state(folder: Path, skip: Path | None = None) -> tuple[Path, int] | None:
    """The newest state of ``folder``'s run beside it whose files have their saved sizes, with its step."""
    for step, _, path in reversed(_states_of_run(folder)):
        if path != skip and state_problem(path, digests=False) is None:
            return path, step
    return None


def newest_hint(folder: Path) -> str:
    """'; the newest complete state ... is X: --resume X' for an error about ``folder`` (empty when none)."""
    newest = newest_state(folder, skip=folder)
    if newest is None:
        return ""
    return f"; the newest complete state of this run is {newest[0]} (step {newest[1]}): continue with --resume {newest[0]}"


def load_position(folder: Path) -> dict[str, int]:
    """The position saved in ``folder``; says so when a newer state of the same run lies beside it."""
    record = read_state_record(folder)
    position = {k: record[k] for k in POSITION_KEYS}
    newest = newest_state(folder)
    if newest is not None and newest[1] > position["global_step"]:
        logger.warning("--resume %s continues from step %d, but %s beside it is newer (step %d); resuming from the "
                       "older one as asked (use --resume %s to continue from the newest)", folder,
                       position["global_step"], newest[0], newest[1], newest[0])
    return position
