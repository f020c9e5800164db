"""Faults as users meet them: a full disk for each kind of write, a cut-short state, file modes, a failing process.

A full disk is a real tmpfs where the test can mount one (as root) and injected ENOSPC elsewhere
(tests/faults.py). Each fault must end the run with exit code 2, no traceback, a last line that
says what happened, and no temporary file or folder left behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from library.atomic_io import (
    WriteError,
    atomic_write_text,
    publish_folder,
    write_failure_reason,
)
from library.errors import UserError
from library.training.states import STATE_FILE, check_state_folder, load_position, write_state_record
from library.training.together import together
from tests.faults import leftovers, small_disk
from tests.gen_helpers import run_main
from tests.test_train_script import ROOT, SCRIPT, base_options, write_config

KB = 1024


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_on_disk(disk, *args: str, launcher: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    """The training script as a user runs it (umask 022), on ``disk``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **disk.env()}
    cmd = (launcher or [sys.executable]) + disk.command(SCRIPT) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, umask=0o022, **kw)


def assert_clean_failure(res, *expected: str) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = [line for line in res.stderr.splitlines() if line.strip()][-1]
    for text in expected:
        assert text in last, last
    return last


# ---------------------------------------------------------------------------------------------- training


def test_full_disk_while_saving_a_step_file(tmp_path, tiny_checkpoint):
    out = tmp_path / "disk" / "out"
    with small_disk(tmp_path / "disk", 200 * KB) as disk:  # room for one LLLite file (136 KiB), not two
        cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint, output_dir=out,
                                                                    save_every_n_steps=1, max_train_steps=3))
        res = run_on_disk(disk, "--config_file", str(cfg), timeout=300)
        last = assert_clean_failure(res, f"could not write the LLLite file {out / 'tiny-step00000002.safetensors'}",
                                    "No space left on device",
                                    f"The newest complete LLLite file is {out / 'tiny-step00000001.safetensors'}",
                                    "no state to resume from was saved (--save_state keeps one)")
        assert "free some space" in last
        assert sorted(p.name for p in out.iterdir()) == ["tiny-step00000001.safetensors"]
        assert mode(out / "tiny-step00000001.safetensors") == 0o644  # readable by a web UI running as another user


def test_full_disk_while_saving_a_state_and_a_cut_short_copy(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """The half-written state folder goes and the message names the state to resume; a cut-short copy is refused."""
    out = tmp_path / "disk" / "out"
    with small_disk(tmp_path / "disk", 1000 * KB) as disk:  # one file and state (~640 KiB), then one more file
        opts = base_options(tmp_path, tiny_checkpoint, output_dir=out, save_every_n_steps=1, max_train_steps=3,
                            save_state=True, cache_latents=True, cache_text_encoder_outputs=True)
        cfg = write_config(tmp_path / "train.toml", **opts)
        res = run_on_disk(disk, "--config_file", str(cfg), timeout=300)
        state = out / "tiny-step00000001-state"
        assert_clean_failure(res, f"could not write the training state {out / 'tiny-step00000002-state'}: "
                             "No space left on device; nothing half-written was kept",
                             f"The newest complete LLLite file is {out / 'tiny-step00000002.safetensors'}",
                             f"the newest complete state is {state}", f"with --resume {state} to continue")
        assert leftovers(out) == []
        assert sorted(p.name for p in out.iterdir()) == ["tiny-step00000001-state", "tiny-step00000001.safetensors",
                                                         "tiny-step00000002.safetensors"]
        record = json.loads((state / STATE_FILE).read_text())
        assert record["global_step"] == 1 and record["files"]["optimizer.bin"]["size"] > 0
        assert {mode(p) for p in state.iterdir()} == {0o644} and mode(state) == 0o755
        check_state_folder(state)  # what the message offers is complete (test_train_script resumes such states)
        saved = shutil.copytree(state, tmp_path / "moved" / "tiny-step00000002-state")

    # A copy that was cut short (an interrupted copy): refused before any model loads, naming the file and
    # offering the complete state of the same run beside it. The script's main runs here, as run_cli runs it.
    import sdxl_train_control_net_lllite

    from tests.test_bad_inputs import forbid_model_loading, run_refused

    copy = shutil.copytree(saved, tmp_path / "moved" / "tiny-step00000003-state")
    (copy / "optimizer.bin").write_bytes((copy / "optimizer.bin").read_bytes()[:1000])
    forbid_model_loading(monkeypatch)
    code, err = run_refused(sdxl_train_control_net_lllite.main, ["--config_file", str(cfg), "--output_dir",
                                                                  str(tmp_path / "out2"), "--resume", str(copy)], capsys)
    assert_clean_failure(subprocess.CompletedProcess([], code, "", err),
                         f"--resume {copy}: optimizer.bin is 1000 bytes but was saved with",
                         f"the newest complete state of this run is {saved} (step 1): continue with --resume {saved}")
    assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------------------------------------- generation


def test_full_disk_while_generating(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    outdir = tmp_path / "disk" / "gen"
    with small_disk(tmp_path / "disk", 16 * KB) as disk:  # one 64x64 PNG (~10 KiB), not two
        disk.install(monkeypatch)
        code, err = run_main(capsys, "--ckpt", str(tiny_checkpoint), "--prompt", "a red square", "--W", "64", "--H",
                             "64", "--steps", "2", "--sampler", "euler", "--no_progress", "--images_per_prompt", "2",
                             "--seed", "1", "--sequential_file_name", "--outdir", str(outdir))
        assert code == 2 and "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert f"could not write the image {outdir / 'im_000002.png'}: No space left on device" in last, last
        assert f"1 image of this run was saved before it (the newest: {outdir / 'im_000001.png'})" in last, last
        assert sorted(p.name for p in outdir.iterdir()) == ["im_000001.png"]
        assert leftovers(outdir) == []


# ---------------------------------------------------------------------------------------------- the parts


def test_written_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "tmp").mkdir()
        (tmp_path / "tmp" / "f").write_text("y")
        os.chmod(tmp_path / "tmp" / "f", 0o600)  # as safetensors leaves its files
        publish_folder(tmp_path / "tmp", tmp_path / "state")
        os.umask(0o022)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (mode(tmp_path / "a.txt"), mode(tmp_path / "b.txt")) == (0o640, 0o644)
    assert (mode(tmp_path / "state"), mode(tmp_path / "state" / "f")) == (0o750, 0o640)


def test_failure_reasons(tmp_path):
    assert write_failure_reason(OSError(errno.ENOSPC, "x"), tmp_path) == os.strerror(errno.ENOSPC)
    assert write_failure_reason(RuntimeError("I/O error: Read-only file system (os error 30)"), tmp_path) == os.strerror(30)
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError:
            raise RuntimeError("unexpected pos 10 vs 5")
    except RuntimeError as e:
        assert write_failure_reason(e, tmp_path) == os.strerror(errno.EDQUOT)
    # torch's short write without the OS's reason, on a disk with room: said as it is, not as a full disk
    assert write_failure_reason(RuntimeError("[enforce fail] unexpected pos 5 vs 3"), tmp_path).startswith("the write was cut short")
    assert write_failure_reason(ValueError("bad mode"), tmp_path) is None  # a bug stays a traceback
    assert write_failure_reason(OSError(errno.EBADF, "x"), tmp_path) is None


def test_atomic_write_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", 64 * KB) as disk:
        disk.install(monkeypatch)
        from library.sdxl.weights_io import write_weights

        target = tmp_path / "disk" / "w.safetensors"
        with pytest.raises(WriteError, match=f"could not write the weights file {target}: No space left on device"):
            write_weights(target, {"w": torch.zeros(64 * KB)})
        assert list((tmp_path / "disk").iterdir()) == []


def _fake_state(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    torch.save({"x": torch.arange(1000)}, folder / "optimizer.bin")
    (folder / "scheduler.bin").write_bytes(b"s" * 100)
    write_state_record(folder, {"global_step": step, "epoch": 1, "batches_in_epoch": step})
    return folder


def test_state_check_names_the_bad_file_and_the_newest_state(tmp_path, caplog):
    old = _fake_state(tmp_path / "run-step00000002-state", 2)
    new = _fake_state(tmp_path / "run-step00000004-state", 4)
    _fake_state(tmp_path / "other-step00000009-state", 9)  # another run's state is never offered
    check_state_folder(old)
    with caplog.at_level(logging.WARNING):  # an older complete state is resumed as asked, naming the newest
        assert load_position(old) == {"global_step": 2, "epoch": 1, "batches_in_epoch": 2}
    assert f"but {new} beside it is newer (step 4)" in caplog.text
    (new / "scheduler.bin").write_bytes(b"t" * 100)  # same size, other bytes
    with pytest.raises(UserError, match=f"--resume {new}: scheduler.bin is damaged: its SHA-256 differs.*"
                                        f"newest complete state of this run is {old} \\(step 2\\)"):
        check_state_folder(new)
    (new / "optimizer.bin").unlink()
    with pytest.raises(UserError, match="optimizer.bin is missing"):
        check_state_folder(new)
    (old / STATE_FILE).unlink()  # an interrupted save leaves no record
    with pytest.raises(UserError, match=f"{STATE_FILE} is missing, so this is not a complete state"):
        check_state_folder(old)


def test_state_without_manifest_is_checked_by_structure(tmp_path):
    """States saved before the manifest: a zip archive or safetensors file that ends early is still caught."""
    from safetensors.torch import save_file

    folder = _fake_state(tmp_path / "run-state", 3)
    (folder / STATE_FILE).write_text(json.dumps({"global_step": 3, "epoch": 1, "batches_in_epoch": 3}))
    save_file({"w": torch.zeros(100)}, str(folder / "model.safetensors"))
    check_state_folder(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(UserError, match="model.safetensors is cut short"):
        check_state_folder(folder)
    (folder / "model.safetensors").write_bytes(data)
    (folder / "optimizer.bin").write_bytes((folder / "optimizer.bin").read_bytes()[:-30])
    with pytest.raises(UserError, match="optimizer.bin is cut short"):
        check_state_folder(folder)


class _Process:
    """One of two processes, as ``together`` sees it (the collective itself is replaced in the test)."""

    def __init__(self, index: int):
        self.is_main_process, self.process_index, self.num_processes = index == 0, index, 2


def test_together_stops_every_process_with_the_failure(monkeypatch):
    import accelerate.utils

    failure = WriteError("the sample image", "/out/s.png", "No space left on device")
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [failure, None])
    ran = []
    with pytest.raises(WriteError) as e:  # the waiting process raises the main process's error
        together(_Process(1), lambda: ran.append(1), "drawing", main_only=True)
    assert str(e.value) == str(failure) and ran == []

    def crash():
        raise KeyError("bug")

    sent = []  # what process 1 hands to the collective when its work hits a bug
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: sent.extend(objs) or [None, *objs])
    with pytest.raises(KeyError):  # the failing process keeps its own error (and traceback, for a bug)
        together(_Process(1), crash, "saving")
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [*objs, *sent])
    with pytest.raises(UserError, match="process 1 failed while saving: KeyError: 'bug'"):
        together(_Process(0), lambda: None, "saving")


# ---------------------------------------------------------------------------------------------- two processes


def test_two_processes_stop_together_when_the_main_one_fails(tmp_path, tiny_checkpoint):
    """The main process cannot save; the other one stops with the same error at once, not at the DDP timeout."""
    out = tmp_path / "disk" / "out"
    with small_disk(tmp_path / "disk", 200 * KB) as disk, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint, output_dir=out,
                                                                    save_every_n_steps=1, max_train_steps=3))
        # torchrun looks at its workers every 5 s: both must have stopped by themselves before it would kill one.
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    "--monitor-interval", "5"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", **disk.env()}
        proc = subprocess.Popen(launcher + disk.command(SCRIPT) + ["--config_file", str(cfg)], cwd=ROOT, env=env,
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, umask=0o022)
        failed_at, lines = [], []

        def read() -> None:
            for line in proc.stderr:
                lines.append(line)
                if line.startswith("error: ") and not failed_at:
                    failed_at.append(time.monotonic())

        reader = threading.Thread(target=read)
        reader.start()
        proc.wait(timeout=400)
        ended = time.monotonic()
        reader.join()
    stderr = "".join(lines)
    assert failed_at and ended - failed_at[0] < 30, stderr[-3000:]
    message = f"error: could not write the LLLite file {out / 'tiny-step00000002.safetensors'}: No space left on device"
    assert stderr.count(message) == 2, stderr[-3000:]  # both processes stopped with it, neither was killed
    assert "SIGTERM" not in stderr and "Signal 15" not in stderr
