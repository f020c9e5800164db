"""Safe writes: a crash or a full disk never leaves a half-written file, and a refused run no empty folder.

Every file the scripts and tools write goes through ``atomic_path`` (or ``publish_folder`` for a
folder such as a training state): the data goes to a temporary name beside the target and is renamed
into place when complete. A write that fails for a reason of the disk (full, read-only, quota,
permission) becomes a ``WriteError`` that names what was written, where, and the OS's reason, and
the temporary file or folder is removed. Finished files get the mode a plain ``open()`` would give
them under the user's umask (``mkstemp`` alone would leave them 0600, unreadable to other users).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from library.errors import UserError

# The failures of a write that come from the storage, not from the program.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG, errno.ENOENT,
                  errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, getattr(errno, "EDQUOT", errno.ENOSPC)}
# torch's zip writer reports a short write without the OS's reason (errno is lost in its C++ stream).
_SHORT_WRITE = re.compile(r"unexpected pos|file write failed|iostream error")
_NEARLY_FULL = 1 << 20  # bytes: less than this free after a short write means the disk filled up


class WriteError(UserError):
    """A file or folder could not be written; nothing half-written was left behind."""

    def __init__(self, what: str, path: str | os.PathLike, reason: str):
        super().__init__(what, str(path), reason)  # the arguments, so the error survives pickling between processes
        self.what, self.path, self.reason = what, str(path), reason

    def __str__(self) -> str:
        return f"could not write {self.what} {self.path}: {self.reason}; nothing half-written was kept"


def _umask_from_proc() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


# The umask can only be read through os.umask by setting it, which would give files that another thread
# creates meanwhile a wrong mode. Linux shows it in /proc/self/status, read at each write; elsewhere it is
# read the racy way once, here at import, before the scripts start any threads.
_IMPORT_UMASK = _umask_from_proc()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = os.umask(0o022)
    os.umask(_IMPORT_UMASK)


def current_umask() -> int:
    umask = _umask_from_proc()
    return _IMPORT_UMASK if umask is None else umask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder under the current umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def set_plain_modes(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything in it the modes of plain new files and folders."""
    fmode, dmode = file_mode(), folder_mode()
    os.chmod(folder, dmode)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            os.chmod(os.path.join(root, f), fmode)


# ---------------------------------------------------------------------------------------------- failures


def _errno_of(exc: BaseException) -> int | None:
    """The OS error behind ``exc``: an OSError in its chain, or Rust's "(os error N)" (safetensors)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def _free_bytes(folder: Path) -> int | None:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    return min(st.f_bavail, st.f_bfree) * st.f_frsize


def write_failure_reason(exc: BaseException, folder: str | os.PathLike) -> str | None:
    """Why a write into ``folder`` failed, when the storage is the reason (None for any other error).

    Call it before the partial file is removed: a short write from torch only says "unexpected pos",
    and a disk that is still full then tells that it was the space.
    """
    code = _errno_of(exc)
    if code is not None:
        return os.strerror(code) if code in STORAGE_ERRNOS else None
    chain = f"{exc} {exc.__context__ or ''}"
    if isinstance(exc, RuntimeError) and _SHORT_WRITE.search(chain):
        free = _free_bytes(Path(folder))
        if free is not None and free < _NEARLY_FULL:
            return os.strerror(errno.ENOSPC)
        return f"the write was cut short ({str(exc).splitlines()[0]})"
    return None


def as_write_error(exc: BaseException, what: str, path: str | os.PathLike) -> WriteError | None:
    """``exc`` as a ``WriteError`` when it is a failure of the storage, else None."""
    if isinstance(exc, WriteError):
        return exc
    target = Path(path)
    reason = write_failure_reason(exc, target.parent if target.suffix else target)
    return None if reason is None else WriteError(what, target, reason)


# ---------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary file lives in the same directory so that ``os.replace`` is atomic. On any exception
    the temporary file is removed and ``path`` is untouched; a failure of the storage is raised as a
    ``WriteError`` that says ``what`` was being written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise (as_write_error(e, what, path) or e) from None
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # Asked before the temporary file is removed: a disk that is still full says why torch's write stopped.
        error = as_write_error(e, what, path) if isinstance(e, Exception) else None
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if error is None:
            raise
        raise error from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "file") -> None:
    with atomic_path(path, what) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_save_image(image, path: str | os.PathLike, what: str = "the image") -> None:
    """Save a PIL image atomically, in the format its extension names."""
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    with atomic_path(path, what) as tmp:
        image.save(tmp, format=fmt)


def publish_folder(tmp: str | os.PathLike, final: str | os.PathLike, what: str = "folder") -> None:
    """Rename the complete folder ``tmp`` to ``final``, replacing an older ``final``.

    The old folder is moved aside, not deleted, until the new one is in place: a crash in between
    leaves one complete folder under one of the two names. Files get the modes of plain new files.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    try:
        set_plain_modes(tmp)
        if final.exists():
            remove_tree(old)
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as e:
        remove_tree(tmp)
        if old.exists() and not final.exists():
            os.replace(old, final)  # the older complete folder back under its name
        raise (as_write_error(e, what, final) or e) from None
    remove_tree(old)


def remove_tree(folder: str | os.PathLike) -> None:
    """Remove a (temporary) folder and what is in it; a folder that is not there is fine."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.exists() or folder.is_symlink():
        with contextlib.suppress(OSError):
            folder.unlink()


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
