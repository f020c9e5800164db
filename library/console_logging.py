"""Console logging for both entry scripts: ``--console_log_level``, ``--console_log_file``, ``--console_log_simple``."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_FULL = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SIMPLE = "%(levelname)s: %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("console log")
    g.add_argument("--console_log_level", default=None, choices=LEVELS, help="least severe messages shown (default INFO)")
    g.add_argument("--console_log_file", default=None,
                   help="write the log to this file (overwritten); the console keeps warnings and errors")
    g.add_argument("--console_log_simple", action="store_true", help="level and message only, without time and source")


@dataclass(frozen=True)
class ConsoleLogOptions:
    level: str = "INFO"
    file: Path | None = None
    simple: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ConsoleLogOptions":
        file = Path(args.console_log_file) if args.console_log_file else None
        if file is not None and file.is_dir():
            raise UserError(f"--console_log_file {file} is a folder; give a file path")
        return cls(level=args.console_log_level or "INFO", file=file, simple=args.console_log_simple)


def setup_console_logging(opts: ConsoleLogOptions, quiet: bool = False) -> None:
    """Configure the root logger. ``quiet`` (processes other than the first) shows warnings and up only."""
    level = max(getattr(logging, opts.level), logging.WARNING if quiet else logging.NOTSET)
    fmt = logging.Formatter(_SIMPLE if opts.simple else _FULL, datefmt="%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    if opts.file is not None:
        # The file gets everything at the chosen level; the console still shows what went wrong.
        try:
            opts.file.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(opts.file, mode="w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"--console_log_file {opts.file}: cannot write there ({e})") from None
        file_handler.setFormatter(fmt)
        file_handler.setLevel(level)
        root.addHandler(file_handler)
        console.setLevel(max(level, logging.WARNING))
    else:
        console.setLevel(level)
    root.addHandler(console)
    root.setLevel(level)
