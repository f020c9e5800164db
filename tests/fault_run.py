"""Run a script with the injected small disk of tests/faults.py: ``python tests/fault_run.py SCRIPT ARGS...``.

Used by the tests where no tmpfs can be mounted; torchrun runs it like any script.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults import install_from_env  # noqa: E402

if __name__ == "__main__":
    install_from_env()  # before the script imports accelerate, which keeps its own reference to save_file
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
