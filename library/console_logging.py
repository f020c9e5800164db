"""The console: which log records a user sees, and ``--console_log_level``/``_file``/``_simple``.

One rule decides, for every logger in the process (``ConsoleRule``):
- the project's own loggers (``PROJECT_LOGGERS``) are shown at the chosen level;
- third-party libraries show their warnings and errors, never their info or debug records;
- a few third-party sources (``DEBUG_ONLY``) only report things a user of this tool cannot act on:
  they are shown at ``--console_log_level DEBUG`` only.
The rule is decided by where a record comes from, never by its text, so a library's new message
follows the rule of its namespace. ``take_over_console()`` puts it in force; entry scripts and tools
call it before any third-party import, because some libraries log while being imported, and some
give their loggers a console handler of their own (``_UnderTheRule`` keeps those from printing).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from library.cli import OptionParser, Options, flag, option
from library.errors import UserError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_FULL = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SIMPLE = "%(levelname)s: %(message)s"

# Logger names of this project: the library, the networks, the entry scripts, tools and benchmarks
# (a script run directly logs as ``__main__``).
PROJECT_LOGGERS = ("__main__", "library", "networks", "tools", "benchmarks",
                   "sdxl_train_control_net_lllite", "sdxl_gen_img")

# (logger namespace, function that logs or None for all of it, what it reports): shown at DEBUG only.
DEBUG_ONLY = (
    ("kernels", None, "optional kernel downloads from the hub, and the hub trust checks they make"),
    ("bitsandbytes.backends", None, "that an optional CPU kernel could not be loaded (nothing here uses 4-bit weights)"),
    ("diffusers.models.modeling_utils", "to",
     "the note, on every dtype cast, about modules kept in float32 (SDXL's U-Net and VAE have none)"),
)


def _within(name: str, namespace: str) -> bool:
    return name == namespace or name.startswith(namespace + ".")


class ConsoleRule(logging.Filter):
    """Whether a record is shown at the chosen ``level``: see the module docstring."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_project(record.name):
            return record.levelno >= self.level
        if record.levelno < max(logging.WARNING, self.level):
            return False
        debug_only = any(_within(record.name, ns) and func in (None, record.funcName) for ns, func, _ in DEBUG_ONLY)
        return not debug_only or self.level <= logging.DEBUG


class _Console(logging.StreamHandler):
    """The console: whatever ``sys.stderr`` is when a record comes (tests and callers swap it).

    Until ``judge_held()``, records that the default level drops but DEBUG would show are held (a
    bounded number): libraries log while being imported, before ``--console_log_level`` is read.
    """

    _HOLD_AT_MOST = 1000

    def __init__(self) -> None:
        super().__init__()
        self.rule = ConsoleRule()
        self.addFilter(self.rule)
        self.held: list[logging.LogRecord] | None = []

    def handle(self, record: logging.LogRecord) -> bool:
        shown = bool(super().handle(record))
        if (not shown and self.held is not None and len(self.held) < self._HOLD_AT_MOST
                and ConsoleRule(logging.DEBUG).filter(record)):
            self.held.append(record)
        return shown

    def judge_held(self) -> None:  # not "release": that is logging.Handler's lock
        """Judge the held records again, at the level now chosen; from now on nothing is held."""
        held, self.held = self.held or [], None
        for record in held:
            self.handle(record)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; stderr is read per record instead
        pass


def _console_handler() -> _Console:
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Console)), None)
    if handler is None:
        handler = _Console()
        handler.setFormatter(logging.Formatter(_FULL, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    return handler


def _is_project(name: str) -> bool:
    return any(_within(name, ns) for ns in PROJECT_LOGGERS)


def _prints_to_console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


class _UnderTheRule(logging.Logger):
    """Loggers made once the rule is in force: a library's logger cannot print past the rule.

    diffusers, transformers, huggingface_hub and torch give their loggers a console handler of their
    own when imported (some also stop propagation); such a handler is not added here, and the logger
    passes its records up to the root logger instead, where the rule decides. Other handlers (files,
    a caller's own) are added as usual, and a library that stops propagation to keep quiet stays quiet.
    """

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802  (logging's own name)
        if _prints_to_console(hdlr) and not _is_project(self.name):
            self._printed_itself = True
            return
        super().addHandler(hdlr)

    @property
    def propagate(self) -> bool:  # type: ignore[override]
        return self._propagate or getattr(self, "_printed_itself", False)

    @propagate.setter
    def propagate(self, value: bool) -> None:
        self._propagate = value


def adopt_library_loggers() -> None:
    """The same for loggers made before the rule was in force: their console handlers go, their records go up."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or _is_project(name):
            continue
        console = [h for h in logger.handlers if _prints_to_console(h)]
        for h in console:
            logger.removeHandler(h)
        if console:
            logger.propagate = True


def take_over_console() -> None:
    """Put the console rule in force for this process (again: no second handler). Call before third-party imports."""
    logging.setLoggerClass(_UnderTheRule)
    adopt_library_loggers()
    handler = _console_handler()
    root = logging.getLogger()
    if root.level > handler.rule.level:
        root.setLevel(handler.rule.level)  # the root's default, WARNING, would drop the project's info records
    logging.captureWarnings(True)  # Python warnings become "py.warnings" records: third-party, under the rule


def _show(level: int, fmt: logging.Formatter) -> None:
    """The console at ``level`` in ``fmt``; the records held since the take-over are judged at it."""
    take_over_console()
    console = _console_handler()
    console.setFormatter(fmt)
    console.rule.level = level
    logging.getLogger().setLevel(level)
    console.judge_held()


def tool_console() -> None:
    """For the tools, which own their process: the console at INFO, level and message only, for good."""
    _show(logging.INFO, logging.Formatter(_SIMPLE))


@dataclass(frozen=True)
class ConsoleLogOptions(Options):
    group = "console log"

    level: str = option(
        name="console_log_level", choices=LEVELS, held="INFO",
        help="least severe messages shown (default INFO); third-party libraries show warnings and errors, "
             "and their notices that need no action only at DEBUG")
    file: Path | None = option(
        name="console_log_file", convert=Path,
        help="write the log to this file (overwritten); the console keeps warnings and errors")
    simple: bool = flag(name="console_log_simple", help="level and message only, without time and source")

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        file = Path(v["file"]) if v["file"] else None
        if file is not None and file.is_dir():
            raise UserError(f"--console_log_file {file} is a folder; give a file path")
        return {**v, "level": v["level"] or "INFO", "file": file}


OPTIONS = (ConsoleLogOptions,)


def add_arguments(parser: OptionParser) -> None:
    parser.add_options(*OPTIONS)


@contextlib.contextmanager
def console_logging(opts: ConsoleLogOptions, quiet: bool = False) -> Iterator[Callable[[], None]]:
    """The console at ``opts`` for the block; ``quiet`` (processes other than the first) shows warnings and up only.

    Yields ``to_file()``, to be called once the folders are known to be writable: from then on
    ``--console_log_file`` gets every message the rule lets through at the chosen level, and the
    console keeps warnings and errors, so that what went wrong is still seen. The console handler
    of ``take_over_console`` is configured in place and restored on exit (no second handler), so
    ``main`` can run in a process that logs elsewhere too (tests, callers), and twice.
    """
    level = max(getattr(logging, opts.level), logging.WARNING if quiet else logging.NOTSET)
    fmt = logging.Formatter(_SIMPLE if opts.simple else _FULL, datefmt="%H:%M:%S")
    root = logging.getLogger()
    console = _console_handler()
    saved = (root.level, console.rule.level, console.formatter)
    _show(level, fmt)
    added: list[logging.Handler] = []

    def to_file() -> None:
        if opts.file is None:
            return
        try:
            handler = logging.FileHandler(opts.file, mode="w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"--console_log_file {opts.file}: cannot write there ({e.strerror or e})") from None
        handler.setFormatter(fmt)
        handler.addFilter(ConsoleRule(level))
        root.addHandler(handler)
        added.append(handler)
        console.rule.level = max(level, logging.WARNING)

    try:
        yield to_file
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved[0])
        console.rule.level = saved[1]
        console.setFormatter(saved[2])
