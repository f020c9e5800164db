"""The lock (requirements.lock): complete, consistent with the requirements, and what CI checks against."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tools.lock import differences, read_lock

ROOT = Path(__file__).resolve().parents[1]


def requirements(name: str) -> list[Requirement]:
    out = []
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            out.append(Requirement(line))
    return out


@pytest.mark.parametrize("file", ["requirements.txt", "requirements-dev.txt"])
def test_every_requirement_is_locked_at_a_version_it_allows(file):
    locked = {name.lower().replace("_", "-"): version for name, _, version in
              (line.partition("==") for line in read_lock(ROOT / "requirements.lock"))}
    for req in requirements(file):
        version = locked.get(req.name.lower().replace("_", "-"))
        assert version is not None, f"{req.name} ({file}) is not in requirements.lock: run python tools/lock.py refresh"
        assert req.specifier.contains(version, prereleases=True), f"{req} does not allow the locked {version}"


def test_the_lock_pins_exact_versions_only():
    for line in read_lock(ROOT / "requirements.lock"):
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", line), line


def test_differences_name_each_package_and_what_differs():
    locked = ["accelerate==1.0", "numpy==2.0", "torch==2.13.0+cpu"]
    installed = ["numpy==2.1", "torch==2.13.0+cpu", "wandb==0.19"]
    assert differences(installed, locked) == [
        "accelerate 1.0: in the lock, not installed",
        "numpy: 2.0 in the lock, 2.1 installed",
        "wandb 0.19: installed, not in the lock",
    ]
    assert differences(locked, locked) == []


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"The tests \(.*?\n\n(?:<!-- doc-test:.*?-->\n)?```bash\n(.+?)\n```", readme, re.S)[1]
    assert "-c requirements.lock" in command and "tools/lock.py check" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
