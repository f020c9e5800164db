"""One error type for every mistake a user can fix, and the way entry scripts report it."""

from __future__ import annotations

import errno
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do.

    Entry scripts print it as one clear message instead of a traceback.
    """


# A full, read-only or failing disk: said in one line even where a write does not go through library/atomic_io.
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point, turning ``UserError`` (and a disk's failure) into a message and exit code 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"error: could not read or write{where}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
