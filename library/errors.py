"""One error type for every mistake a user can fix, and the way entry scripts report it."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do.

    Entry scripts print it as one clear message instead of a traceback.
    """


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point, turning ``UserError`` into a message and exit code 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
