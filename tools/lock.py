"""The lock: the exact version of every package of the environment the test suite last passed in.

    python tools/lock.py refresh   # newest releases that requirements-dev.txt allows, in a fresh venv;
                                   # the suite runs there, and only if it passes is requirements.lock rewritten
    python tools/lock.py check     # this environment against requirements.lock (.ci/run runs it)

``requirements.txt`` and ``requirements-dev.txt`` name the direct dependencies and the ranges the
code supports; ``requirements.lock`` is a pip constraints file that pins every installed package,
transitive ones included, to what was tested. A plain ``pip freeze`` of a venv built from the
requirements is the lock: pip is all it needs, it installs torch from the same place as the
README's commands (pip-compile and uv resolve without installing, so they cannot run the suite on
what they pin, and uv does not look where this machine's torch wheel lies).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from library.atomic_io import atomic_write_text  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402

LOCK = ROOT / "requirements.lock"
HEADER = """\
# Every package of the environment the test suite last passed in, at its exact version: a pip
# constraints file (pip install torch==2.13.0 -r requirements-dev.txt -c requirements.lock).
# Written by `python tools/lock.py refresh`; do not edit by hand. requirements*.txt say what the
# code needs; this says what was tested. torch is the CPU build; on a GPU see README.md.
"""


def freeze(python: str | Path = sys.executable) -> list[str]:
    """``pip freeze`` of the environment of ``python``: one ``name==version`` per package."""
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return sorted((ln for ln in out.splitlines() if ln and not ln.startswith(("#", "-e "))), key=str.lower)


def read_lock(path: Path = LOCK) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path} not found: run `python tools/lock.py refresh` to write it")
    lines = (ln.split("#")[0].strip() for ln in path.read_text(encoding="utf-8").splitlines())
    return sorted((ln for ln in lines if ln), key=str.lower)


def differences(installed: list[str], locked: list[str]) -> list[str]:
    """What a change from ``locked`` to ``installed`` does, one line per package; empty when they are equal."""
    def versions(lines: list[str]) -> dict[str, str]:
        return {name.lower(): version for name, _, version in (ln.partition("==") for ln in lines)}

    old, new = versions(locked), versions(installed)
    out = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            out.append(f"{name} {old[name]}: in the lock, not installed")
        elif name not in old:
            out.append(f"{name} {new[name]}: installed, not in the lock")
        elif old[name] != new[name]:
            out.append(f"{name}: {old[name]} in the lock, {new[name]} installed")
    return out


def check() -> int:
    diff = differences(freeze(), read_lock())
    if diff:
        print(f"this environment differs from {LOCK.name}:", *diff, sep="\n  ", file=sys.stderr)
        print("install with `-c requirements.lock`, or run `python tools/lock.py refresh` to test and lock "
              "new versions", file=sys.stderr)
        return 1
    print(f"this environment matches {LOCK.name} ({len(read_lock())} packages)")
    return 0


def refresh(keep: Path | None) -> int:
    """Build a fresh venv with the newest allowed releases, run the suite in it, and lock it if it passes."""
    venv = keep or Path(tempfile.mkdtemp(prefix="lllite-lock-venv-"))
    python = venv / "bin" / "python"
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "torch==2.13.0",
         "-r", str(ROOT / "requirements-dev.txt")],
        [str(python), "-m", "pytest"],  # the README's test command, in that venv
    ]
    # As an activated venv: the suite starts tools of the venv by name (torchrun, accelerate).
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    for cmd in steps:
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
            print(f"failed: {' '.join(cmd)}; {LOCK.name} is unchanged", file=sys.stderr)
            return 1
    new = freeze(python)
    if keep is None:
        shutil.rmtree(venv, ignore_errors=True)
    old = read_lock() if LOCK.is_file() else []
    atomic_write_text(LOCK, HEADER + "\n".join(new) + "\n")
    diff = differences(new, old)
    print(f"wrote {LOCK.name}: {len(new)} packages; " + (f"{len(diff)} changed:" if diff else "no change"),
          *diff, sep="\n  ")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The options, for main and for tests that parse a documented command without running it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="compare this environment with requirements.lock (exit 1 on any difference)")
    r = sub.add_parser("refresh", help="newest allowed releases in a fresh venv; lock them if the suite passes")
    r.add_argument("--venv", type=Path, default=None, help="build the venv here (default: a new temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return check() if args.command == "check" else refresh(args.venv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
