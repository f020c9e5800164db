"""Work that one or all training processes do, ending in an agreement: a failure on any process stops all.

Samples, fidelity, saving and pruning run on the main process while the others wait. Had the others
waited at a plain barrier, a failure on the main process would leave them there until the DDP timeout
(30 minutes by default), or, on other machines, until their launcher notices. Here every process
reports how its part went in one small collective, and when one failed, all raise its error at once.
"""

from __future__ import annotations

import logging
import pickle
from typing import Callable, TypeVar

from library.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _portable(error: Exception | None, process: int, what: str) -> Exception | None:
    """The error as the other processes will raise it: a ``UserError`` as it is, anything else said in one line."""
    if error is None:
        return None
    if isinstance(error, UserError):
        try:
            pickle.loads(pickle.dumps(error))
            return error
        except Exception:  # an error that cannot travel is described instead
            pass
    first = str(error).splitlines()[0] if str(error) else ""
    return UserError(f"process {process} failed while {what}: {type(error).__name__}: {first}")


def together(accelerator, work: Callable[[], T], what: str, main_only: bool = False) -> T | None:
    """Run ``work`` on every process (or on the main one only) and return its result there.

    ``what`` says what the work does ("saving the LLLite file x"), for a failure the others report.
    When ``work`` fails on any process, every process raises: the failing one its own error, the
    others that error too (a ``UserError``) or a one-line description of it.
    """
    result = error = None
    if accelerator.is_main_process or not main_only:
        try:
            result = work()
        except Exception as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        failures = [f for f in gather_object([_portable(error, accelerator.process_index, what)]) if f is not None]
        if error is None and failures:
            logger.debug("stopping: another process failed while %s", what)
            raise failures[0]
    if error is not None:
        raise error
    return result
