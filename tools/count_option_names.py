"""Count where option names are written: the measure of "one declaration per option" (issue 23).

    python tools/count_option_names.py              # the summary and the tracked names
    python tools/count_option_names.py --list       # every reference option written in more than one file

An option's ``--name`` should appear in one file under ``library/`` and the entry scripts: its
declaration (messages take the name from the spec). The tracked names are also counted as bare
identifiers (``noise_offset``), which includes the places that read the value.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TRACKED = ("ds_depth_1", "noise_offset", "num_repeats")
# Modules whose whole job is options; elsewhere only the declarations count (see option_code_lines).
OPTION_MODULES = ("library/cli.py", "library/training/options.py", "library/data/dataset_config.py",
                  "library/generation/options.py", "library/generation/requests.py", "library/generation/prompt_lines.py")


def sources(root: Path = ROOT) -> list[Path]:
    """The product code: ``library/`` and the two entry scripts."""
    return [*sorted((root / "library").rglob("*.py")), root / "sdxl_train_control_net_lllite.py", root / "sdxl_gen_img.py"]


def reference_names(root: Path = ROOT) -> list[str]:
    """The 239 option names of sd-scripts' trainer and generator (tests/data)."""
    names: set[str] = set()
    for f in ("sd_scripts_train_options.txt", "sd_scripts_sdxl_gen_img_options.txt"):
        names |= {ln.strip().removeprefix("--") for ln in (root / "tests" / "data" / f).read_text().splitlines() if ln.strip()}
    return sorted(names)


def files_naming(name: str, texts: dict[Path, str], dashed: bool = True) -> dict[Path, int]:
    """{file: occurrences} of ``--name`` (or the bare identifier ``name``) as a whole word."""
    pattern = re.compile((r"--" if dashed else r"(?<![\w-])") + re.escape(name) + r"(?!\w)")
    out = {}
    for path, text in texts.items():
        n = len(pattern.findall(text))
        if n:
            out[path] = n
    return out


def _code_lines(lines: list[str]) -> int:
    return sum(1 for ln in lines if ln.strip() and not ln.strip().startswith("#"))


def option_code_lines(root: Path = ROOT) -> int:
    """Lines of option-handling code: the option modules whole, and elsewhere the options classes and the
    functions that add arguments to a parser (blank and comment lines not counted)."""
    total = 0
    for path in sources(root):
        rel = path.relative_to(root).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        if rel in OPTION_MODULES:
            total += _code_lines(lines)
            continue
        for node in ast.parse("\n".join(lines)).body:
            named = getattr(node, "name", "")
            if (isinstance(node, ast.ClassDef) and named.endswith("Options")) or (
                    isinstance(node, ast.FunctionDef) and re.fullmatch(r"_?add_\w*arguments|_\w+_args", named)):
                start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
                total += _code_lines(lines[start - 1:node.end_lineno])
    return total


def measure(root: Path = ROOT) -> dict:
    texts = {p.relative_to(root): p.read_text(encoding="utf-8") for p in sources(root)}
    names = reference_names(root)
    spread = {n: files_naming(n, texts) for n in names}
    single = [n for n in names if len(spread[n]) <= 1]
    tracked = {n: (sum(files_naming(n, texts).values()), sum(files_naming(n, texts, dashed=False).values()))
               for n in TRACKED}
    return {"names": names, "spread": spread, "single": single, "tracked": tracked, "code_lines": option_code_lines(root)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the reference options written in more than one file")
    ap.add_argument("--root", type=Path, default=ROOT, help="another checkout to measure (e.g. an export of main)")
    args = ap.parse_args()
    m = measure(args.root)
    print(f"lines of option-handling code: {m['code_lines']}")
    print(f"--name in at most one file: {len(m['single'])}/{len(m['names'])} "
          f"({100 * len(m['single']) / len(m['names']):.0f}%)")
    for name, (dashed, bare) in m["tracked"].items():
        print(f"{name}: --{name} written {dashed} times, {name} {bare} times")
    if args.list:
        for name in m["names"]:
            if len(m["spread"][name]) > 1:
                print(f"  --{name}: " + ", ".join(f"{p} ({n})" for p, n in m["spread"][name].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
