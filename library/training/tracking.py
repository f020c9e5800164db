"""Experiment trackers (TensorBoard, Weights & Biases) through accelerate: where the logs go and what is logged.

As in sd-scripts, ``--logging_dir`` alone means TensorBoard, and each run logs into its own
``<logging_dir>/<log_prefix><timestamp>`` folder so that runs never mix; TensorBoard writes its
event files into the ``<log_tracker_name>`` folder inside it. What a run logs: ``loss/current``,
``loss/average`` (over the last epoch's worth of steps) and ``lr`` every step, ``loss/epoch`` at the
end of each epoch, the sample images beside their guides, and the ``fidelity/*`` figures.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from library.cli import Needs, Options, flag, option, switched_off
from library.errors import UserError

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "all")
DEFAULT_PROJECT = "lllite_control_net_train"
# Never sent to a tracker with --log_config: secrets, and paths that may reveal private names
# (sd-scripts leaves out the first ten; the other paths are left out here too).
_NOT_LOGGED = {"wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
               "train_data_dir", "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir",
               "config_file", "output_config", "dataset_config", "network_weights", "resume", "sample_prompts",
               "fidelity_guides",
               "console_log_file", "log_tracker_config", "metadata_thumbnail"}
# Init arguments that accelerate sets from other options: given again in --log_tracker_config, the tracker
# would get them twice and fail.
_SET_BY_OPTIONS = {"tensorboard": {"log_dir": "--logging_dir"}, "wandb": {"project": "--log_tracker_name"}}


@dataclass(frozen=True)
class TrackingOptions(Options):
    group = "experiment tracking"

    logging_dir: str | None = option(
        help="folder for tracker logs; alone it means TensorBoard. Each run logs into "
             "<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/ (TensorBoard into its <log_tracker_name> subfolder; "
             "Weights & Biases keeps its local files there too, as WANDB_DIR)")
    log_with: str | None = option(
        choices=TRACKERS,
        help="tracker: tensorboard (needs --logging_dir), wandb, or all (both). Default: tensorboard when "
             "--logging_dir is given, else none")
    log_prefix: str | None = option(
        needs=Needs("logging_dir", "it names the run's folder there", off=lambda v: not v),
        help="prefix of each run's log folder name, before its timestamp (needs --logging_dir)")
    log_tracker_name: str | None = option(
        help=f"project name: TensorBoard's subfolder and the Weights & Biases project (default {DEFAULT_PROJECT})")
    log_tracker_config: str | None = option(
        help="TOML with a table of init arguments per tracker in use: [tensorboard] for SummaryWriter "
             "(e.g. flush_secs = 30), [wandb] for wandb.init (e.g. entity = \"me\", tags = [\"canny\"]). "
             "Unlike sd-scripts, --wandb_run_name still applies (as [wandb] name), and a table for a "
             "tracker not in use or an argument the tracker does not take is an error")
    log_config: bool = flag(
        help="send the run's options to the trackers as its config (TensorBoard hparams, W&B config); "
             "keys, tokens and paths are left out")
    wandb_run_name: str | None = option(help="name of the run in Weights & Biases (needs --log_with wandb or all)")
    wandb_api_key: str | None = option(
        repr=False,  # a secret: kept out of every repr and log
        help="Weights & Biases API key: logs in before the run (needs --log_with wandb or all). Never logged; "
             "prefer a config file, WANDB_API_KEY or `wandb login`, since W&B records the command line")
    trackers: tuple[str, ...] = ()
    run_dir: str | None = None  # <logging_dir>/<log_prefix><timestamp>
    project: str = DEFAULT_PROJECT
    init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per tracker
    config: dict[str, Any] | None = None  # the options sent with --log_config

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        log_with = v["log_with"] or ("tensorboard" if v["logging_dir"] else None)
        trackers = ("tensorboard", "wandb") if log_with == "all" else (log_with,) if log_with else ()
        if "tensorboard" in trackers and not v["logging_dir"]:
            raise UserError(f"--log_with {v['log_with']} needs --logging_dir (the folder for the TensorBoard logs)")
        for name in ("wandb_run_name", "wandb_api_key"):
            if v[name] and "wandb" not in trackers:
                shown = "***" if name == "wandb_api_key" else v[name]
                switched_off(f"--{name} {shown}", "--log_with wandb (or all)", "it applies to Weights & Biases")
        no_tracker = "--logging_dir (TensorBoard) or --log_with wandb"
        for name in ("log_tracker_name", "log_tracker_config"):
            if v[name] is not None and not trackers:
                switched_off(f"--{name} {v[name]}", no_tracker)
        if v["log_config"] and not trackers:
            switched_off("--log_config", no_tracker)
        if v["log_tracker_name"] is not None and not v["log_tracker_name"].strip():
            raise UserError("--log_tracker_name is empty: give a project name, or drop it for the default "
                            f"{DEFAULT_PROJECT}")
        init_kwargs = _read_tracker_config(v["log_tracker_config"], trackers) if v["log_tracker_config"] and trackers else {}
        if v["wandb_run_name"]:
            wandb_kwargs = init_kwargs.setdefault("wandb", {})
            if "name" in wandb_kwargs and wandb_kwargs["name"] != v["wandb_run_name"]:
                raise UserError(f"--wandb_run_name {v['wandb_run_name']} and name = {wandb_kwargs['name']!r} in the "
                                f"[wandb] table of --log_tracker_config {v['log_tracker_config']} disagree: keep one")
            wandb_kwargs["name"] = v["wandb_run_name"]
        run_dir = None
        if v["logging_dir"]:
            run_dir = os.path.join(v["logging_dir"], (v["log_prefix"] or "") + time.strftime("%Y%m%d%H%M%S"))
        config = ({k: _plain(x) for k, x in sorted(vars(args).items()) if k not in _NOT_LOGGED}
                  if v["log_config"] else None)
        return {**v, "trackers": trackers, "run_dir": run_dir, "project": v["log_tracker_name"] or DEFAULT_PROJECT,
                "init_kwargs": init_kwargs, "config": config}


OPTIONS = (TrackingOptions,)


def _plain(value: Any) -> Any:
    """Tracker configs take bool/str/int/float/None only (lists become their text, as in sd-scripts)."""
    return value if value is None or isinstance(value, (bool, str, int, float)) else str(value)


def _read_tracker_config(path: str, trackers: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--log_tracker_config {path}: no such file (a TOML with a table per tracker, e.g. [wandb])")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--log_tracker_config {path} is not valid TOML: {e}") from None
    for name, table in data.items():
        if not isinstance(table, dict):
            raise UserError(f"--log_tracker_config {path}: {name} must be a table of init arguments, e.g. [wandb]")
        if name not in ("tensorboard", "wandb"):
            raise UserError(f"--log_tracker_config {path}: [{name}] is not a tracker; the tables are [tensorboard] "
                            "and [wandb]")
        if name not in trackers:
            raise UserError(f"--log_tracker_config {path} has a [{name}] table, but {name} is not a tracker of this "
                            f"run ({', '.join(trackers)}): add --log_with {name} or all, or remove the table")
        for key in table:
            if key in _SET_BY_OPTIONS[name]:
                raise UserError(f"--log_tracker_config {path}: [{name}] {key} is set by {_SET_BY_OPTIONS[name][key]}; "
                                "use that option instead")
    return {name: dict(table) for name, table in data.items()}


def check_tracker_packages(opts: TrackingOptions) -> None:
    """Name a missing package, or an init argument the tracker does not take, before any work starts."""
    for tracker in opts.trackers:
        try:
            module = __import__(tracker)
        except ImportError:
            raise UserError(f"--log_with {tracker} needs the {tracker} package: run `pip install {tracker}`, "
                            "or choose another tracker") from None
        kwargs = opts.init_kwargs.get(tracker, {})
        if not kwargs:
            continue
        if tracker == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            target = SummaryWriter.__init__
        else:
            target = getattr(module, "init", None)
        _check_init_arguments(tracker, target, kwargs)


def _check_init_arguments(tracker: str, target: Any, kwargs: dict[str, Any]) -> None:
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return  # no signature to check against: the tracker itself will say
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in kwargs if k not in params or k == "self"]
    if unknown:
        allowed = ", ".join(k for k in params if k != "self")
        raise UserError(f"--log_tracker_config: [{tracker}] {unknown[0]} is not an argument {tracker} takes "
                        f"(it takes {allowed})")


def start_trackers(accelerator, opts: TrackingOptions) -> None:
    """Log in and open the trackers on the main process."""
    if not opts.trackers or not accelerator.is_main_process:
        return
    if "wandb" in opts.trackers:
        import wandb

        if opts.run_dir:
            # --logging_dir wins over a WANDB_DIR from the environment, as in sd-scripts: the option is explicit.
            os.makedirs(opts.run_dir, exist_ok=True)
            os.environ["WANDB_DIR"] = opts.run_dir
        if opts.wandb_api_key:
            wandb.login(key=opts.wandb_api_key)
    try:
        accelerator.init_trackers(opts.project, config=opts.config,
                                  init_kwargs={k: dict(v) for k, v in opts.init_kwargs.items()})
    except Exception as e:  # any tracker's own failure (login, network, bad argument value), said plainly
        raise UserError(f"could not start the tracker(s) {', '.join(opts.trackers)} (--log_with, --log_tracker_config): "
                        f"{type(e).__name__}: {e}") from None
    logger.info("logging to %s%s", ", ".join(opts.trackers), f" in {opts.run_dir}" if opts.run_dir else "")


# ---------------------------------------------------------------------------------------------- logging


def log_values(accelerator, values: dict[str, float], step: int) -> None:
    """Scalars to every tracker of the run (none: nothing happens)."""
    if accelerator.trackers:
        accelerator.log(values, step=step)


def log_images(accelerator, images: dict[str, tuple[Any, str]], step: int) -> None:
    """``{tag: (PIL image, caption)}`` to every tracker: TensorBoard gets the image and the caption as text,
    Weights & Biases an image with its caption."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            writer = tracker.writer
            for tag, (image, caption) in images.items():
                writer.add_image(tag, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")
                writer.add_text(f"{tag}/caption", caption, global_step=step)
            writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(image, caption=caption) for tag, (image, caption) in images.items()}, step=step)
