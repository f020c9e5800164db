"""What a user sees on the console: the project's own messages, third-party warnings, and nothing else."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from library.console_logging import (
    PROJECT_LOGGERS,
    ConsoleLogOptions,
    ConsoleRule,
    adopt_library_loggers,
    console_logging,
    take_over_console,
)
from tests.conftest import make_shape_dataset

ROOT = Path(__file__).resolve().parents[1]

# Lines a plain run may print that are neither the project's own nor a progress bar, with the reason
# each is shown. Empty today: a new line from a library fails the test until it is judged.
ALLOWED: dict[str, str] = {}


def record(name: str, level: int, func: str = "f") -> logging.LogRecord:
    return logging.LogRecord(name, level, "x.py", 1, "message", None, None, func=func)


@pytest.mark.parametrize(("name", "level", "func", "at_info", "at_debug", "at_error"), [
    ("library.training.loop", logging.INFO, "f", True, True, False),
    ("library.training.loop", logging.DEBUG, "f", False, True, False),
    ("sdxl_gen_img", logging.WARNING, "f", True, True, False),
    ("__main__", logging.INFO, "f", True, True, False),
    ("diffusers.pipelines", logging.INFO, "f", False, False, False),  # third-party info: never
    ("diffusers.models.modeling_utils", logging.WARNING, "from_pretrained", True, True, False),
    ("diffusers.models.modeling_utils", logging.WARNING, "to", False, True, False),  # the float32 note
    ("kernels._internals.hf_hub", logging.WARNING, "f", False, True, False),  # hub trust check
    ("bitsandbytes.backends.cpu.ops", logging.WARNING, "f", False, True, False),  # optional kernel
    ("bitsandbytes.cextension", logging.WARNING, "f", True, True, False),
    ("py.warnings", logging.WARNING, "f", True, True, False),
    ("transformers.modeling_utils", logging.ERROR, "f", True, True, True),
    ("librarything", logging.INFO, "f", False, False, False),  # a namespace, not a prefix
])
def test_the_rule(name, level, func, at_info, at_debug, at_error):
    r = record(name, level, func)
    assert (ConsoleRule(logging.INFO).filter(r), ConsoleRule(logging.DEBUG).filter(r),
            ConsoleRule(logging.ERROR).filter(r)) == (at_info, at_debug, at_error)


def test_a_library_logger_cannot_print_past_the_rule():
    take_over_console()
    lib = logging.getLogger("a_library_made_after_the_take_over")
    lib.addHandler(logging.StreamHandler(sys.stderr))  # what diffusers and transformers do when imported
    lib.propagate = False
    assert lib.handlers == [] and lib.propagate  # its records go to the root logger, under the rule
    to_file = logging.FileHandler(os.devnull)
    lib.addHandler(to_file)
    assert lib.handlers == [to_file]
    lib.removeHandler(to_file)
    to_file.close()
    quiet = logging.getLogger("a_library_that_keeps_quiet")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    assert not quiet.propagate


def test_loggers_made_before_the_take_over_are_adopted():
    logging.setLoggerClass(logging.Logger)
    try:
        lib = logging.getLogger("a_library_made_before_the_take_over")
    finally:
        take_over_console()
    lib.addHandler(logging.StreamHandler(sys.stderr))
    lib.propagate = False
    elsewhere = logging.FileHandler(os.devnull)
    lib.addHandler(elsewhere)
    adopt_library_loggers()
    assert lib.handlers == [elsewhere] and lib.propagate
    lib.removeHandler(elsewhere)
    elsewhere.close()


def test_records_before_the_level_is_chosen_are_judged_at_it(capsys):
    take_over_console()
    console = next(h for h in logging.getLogger().handlers if type(h).__name__ == "_Console")
    console.held = []  # as in a fresh process, before the options are read
    logging.getLogger("kernels.test").warning("held notice")
    logging.getLogger("some_lib").info("never shown")
    assert "held" not in capsys.readouterr().err
    with console_logging(ConsoleLogOptions(level="DEBUG", simple=True)):
        pass
    err = capsys.readouterr().err
    assert "WARNING: held notice" in err and "never shown" not in err
    assert console.held is None  # nothing is held once the level is known
    take_over_console()
    assert sum(type(h).__name__ == "_Console" for h in logging.getLogger().handlers) == 1


def unexplained_lines(stderr: str) -> list[str]:
    """Lines that are not the project's, not a progress bar and not in ``ALLOWED``."""
    own = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): ")
    bar = re.compile(r"^[\w ]*:\s*\d+%\|")
    out, after_own = [], False
    for line in stderr.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        if not parts:
            continue
        m = own.match(parts[-1])
        if m and any(m[2] == ns or m[2].startswith(ns + ".") for ns in PROJECT_LOGGERS):
            after_own = True
        elif after_own and line.startswith("  "):
            pass  # a further line of the project's message before it
        elif all(bar.match(p) for p in parts):
            after_own = False
        elif not any(line.startswith(a) for a in ALLOWED):
            out.append(line)
            after_own = False
    return out


def test_plain_runs_print_no_third_party_notice(tmp_path, tiny_checkpoint):
    """Both scripts, with the variables offline users and library tinkerers set: every line is accounted for."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "info",
           "TRANSFORMERS_VERBOSITY": "info", "HF_HUB_VERBOSITY": "info"}
    train = subprocess.run(
        [sys.executable, str(ROOT / "sdxl_train_control_net_lllite.py"), "--pretrained_model_name_or_path",
         str(tiny_checkpoint), "--dataset_config", str(make_shape_dataset(tmp_path / "data")), "--output_dir",
         str(tmp_path / "out"), "--output_name", "plain", "--network_dim", "4", "--cond_emb_dim", "4",
         "--max_train_steps", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    guide = next((tmp_path / "data" / "conditioning").iterdir())
    gen = subprocess.run(
        [sys.executable, str(ROOT / "sdxl_gen_img.py"), "--ckpt", str(tiny_checkpoint), "--control_net_lllite_models",
         str(tmp_path / "out" / "plain.safetensors"), "--guide_image_path", str(guide), "--prompt", "a red circle",
         "--W", "64", "--H", "64", "--steps", "2", "--outdir", str(tmp_path / "images")],
        capture_output=True, text=True, env=env, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "saved" in gen.stderr and "done:" in train.stderr  # the project's own lines are there
    assert unexplained_lines(train.stderr) == []
    assert unexplained_lines(gen.stderr) == []


def _older_python() -> str | None:
    found = sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python")) + sorted(Path("/usr/bin").glob("python3.10"))
    return str(found[0]) if found else None


@pytest.mark.skipif(_older_python() is None, reason="no Python 3.10 on this machine")
@pytest.mark.parametrize("script", ["sdxl_train_control_net_lllite.py", "sdxl_gen_img.py", "tools/demo.py"])
def test_an_older_python_gets_one_line_not_an_import_error(script):
    res = subprocess.run([_older_python(), str(ROOT / script), "--help"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={"PATH": os.environ["PATH"]})
    assert res.returncode == 2
    assert re.fullmatch(r"error: Python 3\.11 is needed \(this is 3\.10\.\d+\); the tests run on 3\.11, see README\.md\n",
                        res.stderr), res.stderr


def test_threads_log_through_the_console_without_waiting_on_each_other():
    """The console handler's lock is logging's own: records from several threads all come through."""
    import threading

    take_over_console()
    with console_logging(ConsoleLogOptions()):
        threads = [threading.Thread(target=lambda i=i: logging.getLogger("library.test").info("thread %d", i))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert not any(t.is_alive() for t in threads)
