"""Rules the code keeps as it grows: short functions, and parsed options never written after parsing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "library").rglob("*.py")), *sorted((ROOT / "networks").rglob("*.py")),
           ROOT / "sdxl_train_control_net_lllite.py", ROOT / "sdxl_gen_img.py"]
MAX_FUNCTION_LINES = 80


def _trees():
    for path in SOURCES:
        yield path.relative_to(ROOT), ast.parse(path.read_text(encoding="utf-8"))


def test_no_function_over_80_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _trees() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_parsed_options_are_never_assigned():
    """``args.x = ...`` outside the option machinery would make the order of calls matter silently."""
    writes = []
    for path, tree in _trees():
        if path == Path("library/cli.py"):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "args":
                        writes.append(f"{path}:{node.lineno} args.{sub.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args \
                    and isinstance(node.args[0], ast.Name) and node.args[0].id == "args":
                writes.append(f"{path}:{node.lineno} setattr(args, ...)")
    assert writes == []
