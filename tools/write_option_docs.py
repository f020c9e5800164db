"""Rewrite the "All options" section of docs/training.md from the training script's parser.

    python tools/write_option_docs.py          # rewrite the section
    python tools/write_option_docs.py --check  # exit 1 if the section is out of date (the tests run this)

The help text of each option is its documentation: what it does, the values allowed, and how it
differs from sd-scripts where it does. One source, so the docs cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from library.console_logging import take_over_console  # noqa: E402

take_over_console()  # before any third-party import: some libraries log while being imported

from library.cli import Option, OptionParser  # noqa: E402

DOC = ROOT / "docs" / "training.md"
HEADING = "## All options"


def option_tables(parser: OptionParser) -> str:
    """The tables, one per --help group, from the options' declarations (``parser.options``)."""
    out = [HEADING, "",
           "Generated from the parser by `python tools/write_option_docs.py`; the same text is in `--help`.",
           "Options marked *refused* exist in sd-scripts but cannot apply to SDXL LLLite training: giving one",
           "stops the run with the reason (sd-scripts' default value, where the row names one, is accepted).", ""]
    groups: dict[str, list[Option]] = {}
    for opt in parser.options.values():
        groups.setdefault(opt.group or "", []).append(opt)
    for title, options in groups.items():
        out += [f"### {title[0].upper()}{title[1:]}", "", "| option | default | meaning |", "|---|---|---|"]
        for opt in options:
            name = f"`{opt.label}`"
            if opt.choices:
                name += f" ({', '.join(str(c) for c in opt.choices)})"
            default = "" if opt.default in (None, False, []) else f"`{opt.default}`"
            text = opt.meaning.replace("|", "\\|").replace("\n", " ")
            if opt.refused is not None:
                text = "*refused*: " + text
            out.append(f"| {name} | {default} | {text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def updated_doc(text: str, tables: str) -> str:
    start = text.index(HEADING)
    rest = text[start + len(HEADING):]
    nxt = rest.find("\n## ")
    tail = rest[nxt + 1:] if nxt >= 0 else ""
    return text[:start] + tables + ("\n" + tail if tail else "")


def main() -> int:
    from library.training.options import build_parser

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the section is up to date")
    args = ap.parse_args()
    text = DOC.read_text(encoding="utf-8")
    new = updated_doc(text, option_tables(build_parser()))
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python tools/write_option_docs.py", file=sys.stderr)
            return 1
        return 0
    from library.atomic_io import atomic_write_text

    atomic_write_text(DOC, new, "the option tables")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
