"""Experiment trackers (TensorBoard, Weights & Biases) through accelerate: where the logs go and what is logged.

As in sd-scripts, ``--logging_dir`` alone means TensorBoard, and each run logs into its own
``<logging_dir>/<log_prefix><timestamp>`` folder so that runs never mix.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "all")
DEFAULT_PROJECT = "lllite_control_net_train"
# Never sent to a tracker with --log_config: secrets, and paths that may reveal private names.
_NOT_LOGGED = {"wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
               "train_data_dir", "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir",
               "config_file", "output_config"}  # where the options came from is not an option of the run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("experiment tracking")
    g.add_argument("--logging_dir", default=None, help="folder for tracker logs (alone, it means TensorBoard)")
    g.add_argument("--log_with", default=None, choices=TRACKERS, help="tracker: tensorboard, wandb or all")
    g.add_argument("--log_prefix", default=None, help="prefix of each run's log folder name (before its timestamp)")
    g.add_argument("--log_tracker_name", default=None, help=f"tracker project name (default {DEFAULT_PROJECT})")
    g.add_argument("--log_tracker_config", default=None,
                   help="TOML of per-tracker init arguments, e.g. [wandb] entity = \"me\" (replaces --wandb_run_name)")
    g.add_argument("--log_config", action="store_true",
                   help="send the run's options to the tracker (secrets and paths left out)")
    g.add_argument("--wandb_run_name", default=None, help="name of the run in Weights & Biases")
    g.add_argument("--wandb_api_key", default=None, help="Weights & Biases API key (logs in before the run)")


@dataclass(frozen=True)
class TrackingOptions:
    trackers: tuple[str, ...] = ()
    run_dir: str | None = None  # <logging_dir>/<log_prefix><timestamp>
    project: str = DEFAULT_PROJECT
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # the options sent with --log_config
    wandb_api_key: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrackingOptions":
        log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
        trackers = ("tensorboard", "wandb") if log_with == "all" else (log_with,) if log_with else ()
        if "tensorboard" in trackers and not args.logging_dir:
            raise UserError(f"--log_with {args.log_with} needs --logging_dir (the folder for the TensorBoard logs)")
        wandb_only = ("wandb_run_name", "wandb_api_key")
        for name in wandb_only:
            if getattr(args, name) and "wandb" not in trackers:
                raise UserError(f"--{name} applies to Weights & Biases: add --log_with wandb (or all), or drop it")
        for name in ("log_tracker_name", "log_tracker_config", "log_prefix"):
            if getattr(args, name) and not trackers:
                raise UserError(f"--{name} {getattr(args, name)} needs a tracker: add --logging_dir (TensorBoard) "
                                "or --log_with wandb")
        if args.log_config and not trackers:
            raise UserError("--log_config needs a tracker: add --logging_dir (TensorBoard) or --log_with wandb")
        init_kwargs: dict[str, Any] = {}
        if args.wandb_run_name:
            init_kwargs["wandb"] = {"name": args.wandb_run_name}
        if args.log_tracker_config:
            init_kwargs = _read_tracker_config(args.log_tracker_config)
        run_dir = None
        if args.logging_dir:
            run_dir = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))
        config = {k: _plain(v) for k, v in sorted(vars(args).items()) if k not in _NOT_LOGGED} if args.log_config else None
        return cls(trackers=trackers, run_dir=run_dir, project=args.log_tracker_name or DEFAULT_PROJECT,
                   init_kwargs=init_kwargs, config=config, wandb_api_key=args.wandb_api_key)


def _plain(value: Any) -> Any:
    """Tracker configs take bool/str/int/float/None only."""
    return value if value is None or isinstance(value, (bool, str, int, float)) else str(value)


def _read_tracker_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--log_tracker_config {path}: no such file (a TOML with a table per tracker, e.g. [wandb])")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--log_tracker_config {path} is not valid TOML: {e}") from None
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise UserError(f"--log_tracker_config {path}: {bad[0]} must be a table of init arguments, e.g. [wandb]")
    return data


def check_tracker_packages(opts: TrackingOptions) -> None:
    """Name the missing package before any work starts."""
    needs = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for tracker in opts.trackers:
        try:
            __import__(needs[tracker])
        except ImportError:
            raise UserError(f"--log_with {tracker} needs the {needs[tracker]} package: run `pip install "
                            f"{needs[tracker]}`, or choose another tracker") from None


def start_trackers(accelerator, opts: TrackingOptions) -> None:
    """Log in and open the trackers on the main process."""
    if not opts.trackers or not accelerator.is_main_process:
        return
    if "wandb" in opts.trackers:
        import wandb

        if opts.run_dir:
            os.environ.setdefault("WANDB_DIR", opts.run_dir)
            os.makedirs(opts.run_dir, exist_ok=True)
        if opts.wandb_api_key:
            wandb.login(key=opts.wandb_api_key)
    accelerator.init_trackers(opts.project, config=opts.config, init_kwargs=dict(opts.init_kwargs))
    logger.info("logging to %s%s", ", ".join(opts.trackers), f" in {opts.run_dir}" if opts.run_dir else "")
