"""Console logging for both entry scripts: ``--console_log_level``, ``--console_log_file``, ``--console_log_simple``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from library.errors import UserError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_FULL = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SIMPLE = "%(levelname)s: %(message)s"


class _DropThirdPartyNoise(logging.Filter):
    """Drops the records of one third-party logger whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Silence, at their source loggers, third-party messages a user of this tool cannot act on.

    Only these exact messages are dropped; everything else those libraries log is kept.
    - diffusers logs "There are modules in UNet2DConditionModel that should be kept in float32: []"
      whenever a U-Net or VAE is cast with ``.to(dtype)``, even when no module needs float32 (the
      list is empty for SDXL's U-Net and VAE).
    - bitsandbytes, imported by diffusers and transformers, logs that it could not fetch an optional
      CPU 4-bit kernel from the hub; nothing here uses 4-bit weights. It logs this while being
      imported, so the filter must be in place before diffusers is.
    """
    for name, prefixes in (
        ("diffusers.models.modeling_utils", (
            "There are modules in UNet2DConditionModel that should be kept in float32",
            "There are modules in AutoencoderKL that should be kept in float32",
        )),
        ("bitsandbytes.backends.cpu.ops", ("Failed to load CPU gemm_4bit_forward from kernels-community",)),
    ):
        source = logging.getLogger(name)
        if not any(isinstance(f, _DropThirdPartyNoise) for f in source.filters):
            source.addFilter(_DropThirdPartyNoise(*prefixes))


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


@contextlib.contextmanager
def console_logging(opts: ConsoleLogOptions, quiet: bool = False) -> Iterator[Callable[[], None]]:
    """Console logging for the block; ``quiet`` (processes other than the first) shows warnings and up only.

    Yields ``to_file()``, to be called once the folders are known to be writable: from then on
    ``--console_log_file`` gets every message at the chosen level and the console keeps warnings
    and errors, so that what went wrong is still seen. The handlers are added beside those already
    there and removed on exit, so ``main`` can run in a process that logs elsewhere too (tests,
    callers), and twice without stacking handlers.
    """
    level = max(getattr(logging, opts.level), logging.WARNING if quiet else logging.NOTSET)
    fmt = logging.Formatter(_SIMPLE if opts.simple else _FULL, datefmt="%H:%M:%S")
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(level)
    saved_level = root.level
    added: list[logging.Handler] = [console]
    root.addHandler(console)
    root.setLevel(level)

    def to_file() -> None:
        if opts.file is None:
            return
        try:
            handler = logging.FileHandler(opts.file, mode="w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"--console_log_file {opts.file}: cannot write there ({e.strerror or e})") from None
        handler.setFormatter(fmt)
        handler.setLevel(level)
        root.addHandler(handler)
        added.append(handler)
        console.setLevel(max(level, logging.WARNING))

    try:
        yield to_file
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved_level)
