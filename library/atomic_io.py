"""Safe writes: a crash never leaves a half-written checkpoint or cache file, and a refused run no empty folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from library.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary file lives in the same directory so that ``os.replace`` is atomic.
    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def make_output_folders(folders: list[tuple[str, Path]]) -> list[Path]:
    """Create each ``(option, folder)`` and prove it writable, so a bad path fails before any work.

    Returns the folders this created, outermost first, for ``remove_empty`` when the run fails
    later; when one folder fails, the ones created before it are removed again.
    """
    created: list[Path] = []
    try:
        for option, folder in folders:
            missing = []
            p = Path(folder)
            while not p.exists() and p != p.parent:
                missing.append(p)
                p = p.parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write_test_{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise UserError(f"{option} {folder}: cannot create or write this folder ({e.strerror or e}); "
                                "choose a folder you can write to") from None
            finally:
                created.extend(reversed([m for m in missing if m.exists()]))
    except BaseException:
        remove_empty(created)
        raise
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders (innermost first) that are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()
