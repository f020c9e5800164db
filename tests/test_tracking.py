"""Trackers and console logging of the training script (--logging_dir, --log_*, --wandb_*, --console_log_*).

TensorBoard runs for real and its event files are read back with the tensorboard package. Weights &
Biases is a stand-in package that records what accelerate and the script hand it (wandb itself is a
large install and needs a server or its offline service); what reaches ``wandb.init`` is what
sd-scripts' options mean.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from library.errors import UserError
from library.training import tracking
from library.training.options import build_parser
from tests.conftest import make_shape_dataset
from tests.test_train_script import ROOT, SCRIPT, base_options, run_train, write_config


def tracking_options(*argv: str) -> tracking.TrackingOptions:
    return tracking.TrackingOptions.from_args(build_parser().parse_args(list(argv)))


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps_of(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def fidelity_guides(root: Path) -> Path:
    """Three held-out canny guides with their prompts, in the form tools/evaluate_control.py takes."""
    held = make_shape_dataset(root / "held", n=3, seed=5).parent
    guides = root / "guides"
    guides.mkdir()
    for p in sorted((held / "conditioning").glob("*.png")):
        (guides / p.name).write_bytes(p.read_bytes())
        (guides / f"{p.stem}.txt").write_text("a red square")
    return guides


# ---------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_logs_every_series_under_the_run_folder(tmp_path, tiny_checkpoint):
    """One run with samples and fidelity every 2 steps: loss, lr, sample images with their guides and the fidelity
    figures with and without the LLLite are all in the event files, at the steps asked for."""
    guide = tmp_path / "data" / "conditioning" / "000.png"
    prompts = tmp_path / "prompts.txt"
    trackers_toml = tmp_path / "trackers.toml"
    trackers_toml.write_text("[tensorboard]\nfilename_suffix = \".lllite\"\n")
    opts = base_options(tmp_path, tiny_checkpoint, logging_dir=tmp_path / "logs", log_prefix="canny_",
                        log_tracker_name="my_project", log_tracker_config=trackers_toml, log_config=True,
                        sample_prompts=prompts, sample_every_n_steps=2, sample_at_first=True, sample_sampler="euler",
                        fidelity_guides=fidelity_guides(tmp_path), fidelity_steps=3, fidelity_seed=11,
                        cache_latents=True, cache_text_encoder_outputs=True)
    cfg = write_config(tmp_path / "train.toml", **opts)
    prompts.write_text(f"a red square --w 64 --h 64 --s 3 --d 7 --cn {guide.as_posix()}\n")
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]

    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"canny_\d{14}", runs[0].name)  # <log_prefix><timestamp>
    project = runs[0] / "my_project"
    events = sorted(project.glob("events.out.tfevents.*"))
    assert events and all(e.name.endswith(".lllite") for e in events)  # the [tensorboard] init argument reached it
    acc = read_events(project)
    assert steps_of(acc, "loss/current") == [1, 2, 3, 4] == steps_of(acc, "loss/average") == steps_of(acc, "lr")
    assert steps_of(acc, "loss/epoch") == [2, 4]  # 2 steps per epoch
    assert [round(e.value, 6) for e in acc.Scalars("lr")] == [0.001] * 4
    # at first (0), every 2 steps; with and without the LLLite
    for tag in ("fidelity/edge_f1", "fidelity/edge_f1_base", "fidelity/edge_ssim", "fidelity/edge_ssim_base"):
        assert steps_of(acc, tag) == [0, 2, 4], tag
    with_lllite = {e.step: e.value for e in acc.Scalars("fidelity/edge_f1")}
    base = [e.value for e in acc.Scalars("fidelity/edge_f1_base")]
    assert len(set(base)) == 1 and 0.0 <= base[0] <= 1.0  # the baseline is measured once
    assert with_lllite[0] == pytest.approx(base[0])  # the untrained LLLite does nothing yet
    images = acc.Images("samples/00")
    assert [e.step for e in images] == [0, 2, 4] and (images[0].width, images[0].height) == (128, 64)  # guide | sample
    caption = acc.Tensors("samples/00/caption/text_summary")[0].tensor_proto.string_val[0].decode()
    assert caption.startswith("a red square")
    assert re.search(r"control fidelity at step 4 on 3 guides: edge F1 [\d.]+ with the LLLite, [\d.]+ without", res.stderr)
    # --log_config: the options, without paths that may name private folders
    import yaml

    hparams = yaml.safe_load(next(project.glob("*/hparams.yml")).read_text())
    assert hparams["learning_rate"] == 0.001 and hparams["network_dim"] == 8 and hparams["log_prefix"] == "canny_"
    for hidden in ("pretrained_model_name_or_path", "output_dir", "logging_dir", "fidelity_guides", "sample_prompts",
                   "dataset_config", "wandb_api_key", "huggingface_token", "config_file"):
        assert hidden not in hparams
    assert re.search(r"^\d\d:\d\d:\d\d INFO library\.training\.tracking: logging to tensorboard", res.stderr, re.M)  # full format


# ---------------------------------------------------------------------------------------------- Weights & Biases


FAKE_WANDB = '''
"""Stand-in for wandb: records what it is handed into $FAKE_WANDB_RECORD."""
import json, os

_record = {"login": None, "init": None, "config": {}, "logs": [], "finished": False}


def _save():
    with open(os.environ["FAKE_WANDB_RECORD"], "w") as f:
        json.dump(_record, f)


def login(key=None, **kwargs):
    _record["login"] = key
    _save()


class Image:
    def __init__(self, data, caption=None):
        self.size, self.caption = list(data.size), caption


class _Config(dict):
    def update(self, values, allow_val_change=False):
        _record["config"].update(values)
        _save()


config = _Config()


class _Run:
    def log(self, values, step=None, **kwargs):
        plain = {k: ({"image": v.size, "caption": v.caption} if isinstance(v, Image) else v) for k, v in values.items()}
        _record["logs"].append({"step": step, "values": plain})
        _save()

    def finish(self):
        _record["finished"] = True
        _save()


def init(**kwargs):
    _record["init"] = {**kwargs, "WANDB_DIR": os.environ.get("WANDB_DIR")}
    _save()
    return _Run()
'''


def fake_wandb(root: Path) -> Path:
    """A package named wandb, with metadata, so accelerate takes it for the real one."""
    (root / "wandb").mkdir(parents=True)
    (root / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    meta = root / "wandb-0.0.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: wandb\nVersion: 0.0.0\n")
    return root


def test_wandb_gets_the_options_as_sd_scripts_means_them(tmp_path, tiny_checkpoint):
    site = fake_wandb(tmp_path / "site")
    record = tmp_path / "wandb_record.json"
    guide = tmp_path / "data" / "conditioning" / "000.png"
    prompts = tmp_path / "prompts.txt"
    trackers_toml = tmp_path / "trackers.toml"
    trackers_toml.write_text('[wandb]\nentity = "my-team"\ntags = ["canny", "tiny"]\n')
    opts = base_options(tmp_path, tiny_checkpoint, max_train_steps=2, log_with="wandb", logging_dir=tmp_path / "logs",
                        log_tracker_name="lllite-proj", wandb_run_name="first-try", wandb_api_key="secret-key",
                        log_tracker_config=trackers_toml, log_config=True, sample_prompts=prompts,
                        sample_every_n_steps=2, sample_sampler="euler", cache_latents=True,
                        cache_text_encoder_outputs=True)
    cfg = write_config(tmp_path / "train.toml", **opts)
    prompts.write_text(f"a red square --w 64 --h 64 --s 2 --d 7 --cn {guide.as_posix()}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "FAKE_WANDB_RECORD": str(record)}
    res = subprocess.run([sys.executable, str(SCRIPT), "--config_file", str(cfg)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads(record.read_text())
    assert rec["login"] == "secret-key"  # --wandb_api_key logs in before the run
    init = rec["init"]
    run_dir = next((tmp_path / "logs").iterdir())
    assert init["project"] == "lllite-proj" and init["name"] == "first-try"
    assert init["entity"] == "my-team" and init["tags"] == ["canny", "tiny"]  # the [wandb] table, with the run name
    assert init["WANDB_DIR"] == str(run_dir)  # wandb's local files go into the run's log folder
    assert not (run_dir / "lllite-proj").exists()  # no TensorBoard without asking for it
    config = rec["config"]
    assert config["network_dim"] == 8 and config["wandb_run_name"] == "first-try"
    assert "wandb_api_key" not in config and "secret-key" not in json.dumps(config)
    logged = {k: sorted({entry["step"] for entry in rec["logs"] if k in entry["values"]})
              for entry in rec["logs"] for k in entry["values"]}
    assert logged["loss/current"] == logged["loss/average"] == logged["lr"] == [1, 2]
    assert logged["loss/epoch"] == [2] and logged["samples/00"] == [2]
    sample = next(e["values"]["samples/00"] for e in rec["logs"] if "samples/00" in e["values"])
    assert sample["image"] == [128, 64] and sample["caption"].startswith("a red square")
    assert rec["finished"]
    assert "secret-key" not in res.stderr


# ---------------------------------------------------------------------------------------------- option checks


@pytest.mark.parametrize("argv, message", [
    (["--log_with", "tensorboard"], "needs --logging_dir"),
    (["--log_with", "all"], "needs --logging_dir"),
    (["--log_tracker_name", " ", "--logging_dir", "logs"], "--log_tracker_name is empty"),
])
def test_tracking_option_mistakes(argv, message):
    with pytest.raises(UserError, match=message):
        tracking_options(*argv)


# sd-scripts ignores these without their tracker: here too, with one warning line each.
@pytest.mark.parametrize("argv, warning", [
    (["--log_prefix", "x_", "--log_with", "wandb"], "--log_prefix x_ does nothing without --logging_dir"),
    (["--wandb_run_name", "r", "--logging_dir", "logs"], "--wandb_run_name r does nothing without --log_with wandb"),
    (["--wandb_api_key", "k", "--logging_dir", "logs"], "--wandb_api_key *** does nothing without --log_with wandb"),
    (["--log_tracker_name", "p"], "--log_tracker_name p does nothing without --logging_dir (TensorBoard) or"),
    (["--log_config"], "--log_config does nothing without --logging_dir (TensorBoard) or --log_with wandb"),
])
def test_tracking_options_without_their_tracker_warn(argv, warning, caplog):
    with caplog.at_level("WARNING"):
        tracking_options(*argv)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(warning) and "k" not in warnings[0].split()[1]


@pytest.mark.parametrize("toml_text, extra, message", [
    ('[wandb]\nentity = "me"\n', [], r"has a \[wandb\] table, but wandb is not a tracker of this run"),
    ('[mlflow]\nx = 1\n', [], r"\[mlflow\] is not a tracker"),
    ('entity = "me"\n', [], "entity must be a table"),
    ('[tensorboard]\nlog_dir = "x"\n', [], r"\[tensorboard\] log_dir is set by --logging_dir"),
    ('[wandb]\nproject = "x"\n', ["--log_with", "all"], r"\[wandb\] project is set by --log_tracker_name"),
    ('[wandb]\nname = "a"\n', ["--log_with", "all", "--wandb_run_name", "b"], "disagree: keep one"),
    ("[tensorboard\n", [], "is not valid TOML"),
])
def test_tracker_config_mistakes(tmp_path, toml_text, extra, message):
    cfg = tmp_path / "trackers.toml"
    cfg.write_text(toml_text)
    with pytest.raises(UserError, match=message):
        tracking_options("--logging_dir", str(tmp_path / "logs"), "--log_tracker_config", str(cfg), *extra)


def test_tracker_config_merges_with_the_run_name_and_checks_argument_names(tmp_path):
    cfg = tmp_path / "trackers.toml"
    cfg.write_text('[wandb]\nentity = "me"\n[tensorboard]\nflush_secs = 5\n')
    o = tracking_options("--logging_dir", str(tmp_path / "logs"), "--log_with", "all", "--log_tracker_config", str(cfg),
                         "--wandb_run_name", "r1", "--wandb_api_key", "k3y")
    assert o.trackers == ("tensorboard", "wandb")
    assert o.init_kwargs == {"wandb": {"entity": "me", "name": "r1"}, "tensorboard": {"flush_secs": 5}}
    assert "k3y" not in repr(o)
    cfg.write_text("[tensorboard]\nflush_every = 5\n")
    o = tracking_options("--logging_dir", str(tmp_path / "logs"), "--log_tracker_config", str(cfg))
    with pytest.raises(UserError, match=r"\[tensorboard\] flush_every is not an argument tensorboard takes \(it takes "
                                        r"log_dir, comment, purge_step, max_queue, flush_secs"):
        tracking.check_tracker_packages(o)


def test_missing_tracker_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails as if it were not installed
    with pytest.raises(UserError, match=r"--log_with wandb needs the wandb package: run `pip install wandb`"):
        tracking.check_tracker_packages(tracking_options("--log_with", "wandb"))
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match=r"needs the tensorboard package: run `pip install tensorboard`"):
        tracking.check_tracker_packages(tracking_options("--logging_dir", str(tmp_path)))


# ---------------------------------------------------------------------------------------------- console log


def test_console_log_file_simple_and_debug_level(tmp_path):
    """--debug_dataset runs without a model, so the console options are seen in a few seconds."""
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tmp_path / "not_needed.safetensors"))
    log = tmp_path / "logs" / "train.log"
    res = run_train("--config_file", str(cfg), "--debug_dataset", "--console_log_file", str(log),
                    "--console_log_simple", "--console_log_level", "DEBUG")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert any(re.fullmatch(r"INFO: wrote 4 debug images to .*debug_dataset", ln) for ln in lines), lines[-5:]
    assert any(ln.startswith("DEBUG: ") for ln in lines)  # the chosen level reaches the file
    assert not any(re.match(r"\d\d:\d\d:\d\d", ln) for ln in lines)  # simple: no time, no source
    assert "wrote 4 debug images" not in res.stderr  # with a file, the console keeps warnings and errors only


def test_console_log_level_hides_less_severe_messages(tmp_path):
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tmp_path / "not_needed.safetensors"))
    res = run_train("--config_file", str(cfg), "--debug_dataset", "--console_log_level", "WARNING")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "out" / "debug_dataset").glob("*.png"))) == 4  # it ran
    assert " INFO " not in res.stderr and "wrote 4 debug images" not in res.stderr


def test_console_log_file_that_is_a_folder_is_refused(tmp_path):
    from library.console_logging import ConsoleLogOptions

    with pytest.raises(UserError, match="is a folder; give a file path"):
        ConsoleLogOptions.from_args(build_parser().parse_args(["--console_log_file", str(tmp_path)]))
