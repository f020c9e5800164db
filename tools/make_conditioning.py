"""Make a conditioning_data_dir: one guide image per training image, same basename, .png.

    python tools/make_conditioning.py IN_DIR OUT_DIR --type canny --low_threshold 100 --high_threshold 200
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Run as `python tools/make_conditioning.py`: make `library` importable from the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.console_logging import take_over_console, tool_console  # noqa: E402

take_over_console()  # before any third-party import: some libraries log while being imported

from library.data.conditioning_preprocessors import (  # noqa: E402
    PREPROCESSORS,
    convert_folder,
    preprocessor_options,
)
from library.errors import UserError, run_cli  # noqa: E402

# Command-line options passed through under the same name; each applies only to the types that take it.
TYPE_OPTIONS = ("low_threshold", "high_threshold", "sigma", "downscale", "block_size", "c", "smooth")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_dir", help="folder of training images")
    p.add_argument("out_dir", help="conditioning_data_dir to write (<basename>.png per image)")
    p.add_argument("--type", required=True, choices=sorted(PREPROCESSORS), help="conditioning type")
    p.add_argument("--low_threshold", type=float, help="canny: lower hysteresis threshold (default 100)")
    p.add_argument("--high_threshold", type=float, help="canny: upper hysteresis threshold (default 200)")
    p.add_argument("--sigma", type=float, help="blur: Gaussian sigma in pixels (default 5)")
    p.add_argument("--downscale", type=float, help="blur: shrink by this factor and scale back first (default 1)")
    p.add_argument("--block_size", type=int, help="lineart: odd neighbourhood size (default 9)")
    p.add_argument("--c", type=float, help="lineart: darkness below the local mean that makes a line (default 8)")
    p.add_argument("--smooth", type=float, help="lineart: pre-blur sigma (default 1)")
    p.add_argument("--invert", action="store_true", help="lineart: white lines on black")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def collect_options(args: argparse.Namespace) -> dict:
    """The options given on the command line, checked against what --type takes."""
    takes = preprocessor_options(args.type)
    options = {name: getattr(args, name) for name in TYPE_OPTIONS if getattr(args, name) is not None}
    if args.invert:
        options["invert"] = True
    wrong = [f"--{n}" for n in options if n not in takes]
    if wrong:
        takes_text = ", ".join(f"--{n}" for n in takes) or "no options"
        raise UserError(f"{', '.join(wrong)} does not apply to --type {args.type} (it takes: {takes_text})")
    return options


def main(argv: list[str] | None = None) -> int:
    tool_console()
    args = build_parser().parse_args(argv)
    written = convert_folder(args.in_dir, args.out_dir, args.type, collect_options(args), args.overwrite)
    logging.getLogger("tools.make_conditioning").info("done: %d images in %s", len(written), args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
