"""A small disk for the tests: a real tmpfs where the test may mount one, else ENOSPC injected at the write calls.

``small_disk(folder, size)`` makes ``folder`` a disk of ``size`` bytes. As root (and where mounting is
allowed) it is a tmpfs of that size, so the scripts meet the real errors of a full disk. Elsewhere
(CI without root) the writes of safetensors, torch.save and PIL into that folder are checked against
the size and, when they do not fit, write what fits and fail as those libraries fail on a full disk.
In-process, ``Disk.install(monkeypatch)`` puts the checks in; a subprocess gets them through
``tests/fault_run.py``, which ``Disk.command`` puts before the script. LLLITE_TEST_NO_MOUNT=1 forces
the injected disk, to run the tests the way CI does.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "LLLITE_TEST_DISK"  # "<folder>\n<size>" for tests/fault_run.py


@dataclass
class Disk:
    folder: Path
    size: int
    mounted: bool

    def command(self, script: Path) -> list[str]:
        """What runs ``script`` on this disk: the script itself on a tmpfs, else through fault_run.py."""
        return [str(script)] if self.mounted else [str(ROOT / "tests" / "fault_run.py"), str(script)]

    def env(self) -> dict[str, str]:
        return {} if self.mounted else {ENV_VAR: f"{self.folder}\n{self.size}"}

    def install(self, monkeypatch) -> None:
        """In this process: writes into the folder fail when the disk is full (nothing to do on a tmpfs)."""
        if self.mounted:
            return
        for owner, name, wrapped in _wrappers(self.folder, self.size):
            original = getattr(owner, name)
            monkeypatch.setattr(owner, name, wrapped)
            for module in list(sys.modules.values()):  # modules that imported it by name (from x import save_file)
                for attr, value in list(vars(module).items()) if module is not None else ():
                    if value is original:
                        monkeypatch.setattr(module, attr, wrapped)


def _try_mount(folder: Path, size: int) -> bool:
    if os.environ.get("LLLITE_TEST_NO_MOUNT") or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return res.returncode == 0


@contextlib.contextmanager
def small_disk(folder: Path, size: int) -> Iterator[Disk]:
    folder.mkdir(parents=True, exist_ok=True)
    mounted = _try_mount(folder, size)
    try:
        yield Disk(folder, size, mounted)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of failed writes (their names start with a dot)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


# ---------------------------------------------------------------------------------------------- injection


def _used(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _target(fp: Any) -> Path | None:
    name = fp if isinstance(fp, (str, os.PathLike)) else getattr(fp, "name", None)
    return Path(name).resolve() if isinstance(name, (str, os.PathLike)) else None


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _wrappers(folder: Path, size: int) -> list[tuple[Any, str, Callable]]:
    """Replacements of safetensors', torch's and PIL's writers that fail as they do on a full disk."""
    import PIL.Image
    import safetensors.torch
    import torch

    folder = folder.resolve()
    save_file, torch_save, pil_save = safetensors.torch.save_file, torch.save, PIL.Image.Image.save

    def on_disk(fp: Any) -> bool:
        target = _target(fp)
        return target is not None and folder in target.parents

    def write(fp: Any, data: bytes) -> bool:
        """Write what fits; False when the disk filled up."""
        room = max(0, size - _used(folder))
        chunk = data[:room]
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "wb") as f:
                f.write(chunk)
        else:
            fp.write(chunk)
        return len(chunk) == len(data)

    def fake_save_file(tensors, filename, metadata=None):
        if not on_disk(filename):
            return save_file(tensors, filename, metadata=metadata)
        if not write(filename, safetensors.torch.save(tensors, metadata=metadata)):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def fake_torch_save(obj, f, *args, **kwargs):
        if not on_disk(f):
            return torch_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        torch_save(obj, buf, *args, **kwargs)
        if not write(f, buf.getvalue()):
            try:  # torch's zip writer: a RuntimeError whose context is the OSError of the failed write
                raise _no_space()
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos (injected)")

    def fake_pil_save(self, fp, format=None, **params):
        if not on_disk(fp):
            return pil_save(self, fp, format, **params)
        buf = io.BytesIO()
        pil_save(self, buf, format or PIL.Image.registered_extensions().get(Path(str(fp)).suffix.lower()), **params)
        if not write(fp, buf.getvalue()):
            raise _no_space()

    return [(safetensors.torch, "save_file", fake_save_file), (torch, "save", fake_torch_save),
            (PIL.Image.Image, "save", fake_pil_save)]


def install_from_env() -> None:
    """For tests/fault_run.py: put the injected disk of LLLITE_TEST_DISK in place for this whole process."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    folder, size = spec.split("\n")
    for owner, name, wrapped in _wrappers(Path(folder), int(size)):
        setattr(owner, name, wrapped)


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""
