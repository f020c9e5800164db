"""Options of ``sdxl_train_control_net_lllite.py``: the parser, the ``--config_file`` TOML, and one resolve step.

Each concern declares its own options next to the code that uses them, as the fields of frozen
dataclasses (``OPTIONS`` in each module, see library/cli.py). ``parse_training_options`` fills all of
them once, before any model or dataset work, and returns frozen ``TrainingOptions`` that the rest of
the run reads; nothing writes into the parsed options afterwards.

Precedence: the command line beats the config file, which beats the defaults. Sections in the file
(``[model]``, ``[training]``, ...) are flattened. Unlike the reference tool, an unknown key is an
error that suggests the closest option, so a typo never silently trains with a default.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import toml

from library import console_logging
from library.atomic_io import atomic_write_text
from library.cli import OptionParser, Options, check_refused, flag, load_config_file, option, option_label
from library.data import caching
from library.data import dataset_config
from library.errors import UserError
from library.training import accelerator as accelerator_setup
from library.training import fidelity as training_fidelity
from library.training import hub_upload, optimizers, saving, tracking
from library.training import loop as training
from library.training import loss as diffusion_loss
from library.training import models as training_models
from library.training import samples as training_samples

logger = logging.getLogger(__name__)

# The concerns, in the order their option groups appear in --help.
_CONCERNS = (training_models, dataset_config, caching, optimizers, diffusion_loss, training, accelerator_setup,
             saving, hub_upload, training_samples, training_fidelity, tracking, console_logging)


def build_parser() -> argparse.ArgumentParser:
    p = OptionParser(
        prog="sdxl_train_control_net_lllite.py",
        description="Train a ControlNet-LLLite for SDXL. Options may also come from --config_file train.toml.",
    )
    p.add_options(ConfigFileOptions)
    for concern in _CONCERNS:
        p.add_options(*concern.OPTIONS)
    return p


@dataclass(frozen=True)
class ConfigFileOptions(Options):
    """Read before the others: they name where the other options come from or go to."""

    group = "config"

    config_file: str | None = option(help="TOML file with options (keys are option names without --)")
    output_config: bool = flag(help="write the non-default options to --config_file and exit")


@dataclass(frozen=True)
class TrainingOptions:
    """Every option of a training run, checked and grouped by the code that uses it."""

    model: training_models.ModelOptions
    attention: training_models.AttentionOptions
    network: training_models.NetworkOptions
    data: dataset_config.DataOptions
    caching: caching.CachingOptions
    optimizer: optimizers.OptimizerOptions
    loss: diffusion_loss.LossOptions
    run: training.RunOptions
    precision: accelerator_setup.PrecisionOptions
    distributed: accelerator_setup.DistributedOptions
    saving: saving.SavingOptions
    hub: hub_upload.HubOptions
    samples: training_samples.SampleOptions
    fidelity: training_fidelity.FidelityOptions
    tracking: tracking.TrackingOptions
    console: console_logging.ConsoleLogOptions


def resolve(args: argparse.Namespace) -> TrainingOptions:
    """Check every option and build the options objects. Raises ``UserError`` on the first problem."""
    options = TrainingOptions(
        model=training_models.ModelOptions.from_args(args),
        attention=training_models.AttentionOptions.from_args(args),
        network=training_models.NetworkOptions.from_args(args),
        caching=caching.CachingOptions.from_args(args),
        optimizer=optimizers.OptimizerOptions.from_args(args),
        loss=diffusion_loss.LossOptions.from_args(args),
        run=training.RunOptions.from_args(args),
        precision=accelerator_setup.PrecisionOptions.from_args(args),
        distributed=accelerator_setup.DistributedOptions.from_args(args),
        saving=saving.SavingOptions.from_args(args),
        hub=hub_upload.HubOptions.from_args(args),
        samples=training_samples.SampleOptions.from_args(args),
        fidelity=training_fidelity.FidelityOptions.from_args(args),
        tracking=tracking.TrackingOptions.from_args(args),
        console=console_logging.ConsoleLogOptions.from_args(args),
        data=dataset_config.DataOptions.from_args(args),  # last: it reads folders, the others only the options
    )
    caching.validate_caching_options(options.data.datasets, cache_latents=options.caching.latents,
                                     cache_text_encoder_outputs=options.caching.text)
    tracking.check_tracker_packages(options.tracking)
    accelerator_setup.check_deepspeed_installed(options.distributed)
    return options


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Command line + ``--config_file`` + defaults, as parsed options (``--output_config`` writes and exits)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    if first.config_file and not first.output_config:
        parser.set_defaults(**load_config_file(first.config_file, parser, skip=("config_file", "output_config"),
                                               foreign=foreign_config_keys()))
    args = parser.parse_args(argv)
    if args.output_config:
        write_config(args)
        raise SystemExit(0)
    return parser, args


def parse_training_options(argv: Sequence[str] | None = None) -> TrainingOptions:
    """Everything the user gave, checked once, before any model or dataset work."""
    parser, args = parse_args(argv)
    check_refused(parser, args)
    return resolve(args)


def foreign_config_keys() -> frozenset[str]:
    """Keys sd-scripts' LLLite trainer ignores in a config file (see the list's header)."""
    text = (Path(__file__).parent / "foreign_config_keys.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def output_folders(options: TrainingOptions) -> list[tuple[str, Path]]:
    """The folders a run writes to, by the option that names them (created last, after every other check)."""
    folders = [(option_label(saving.SavingOptions, "output_dir"), options.saving.output_dir)]
    if options.console.file is not None:
        folders.append((option_label(console_logging.ConsoleLogOptions, "file"), options.console.file.parent))
    if options.model.tokenizer_cache_dir:
        folders.append((option_label(training_models.ModelOptions, "tokenizer_cache_dir"), Path(options.model.tokenizer_cache_dir)))
    if options.tracking.run_dir:
        folders.append((option_label(tracking.TrackingOptions, "logging_dir"), Path(options.tracking.run_dir).parent))
    return folders


def write_config(args: argparse.Namespace) -> None:
    """Write the options that differ from the defaults to ``--config_file``."""
    if not args.config_file:
        raise UserError("--output_config needs --config_file PATH: the file to write")
    defaults = build_parser().parse_args([])
    values = {
        k: v
        for k, v in vars(args).items()
        if k not in ("config_file", "output_config") and v != getattr(defaults, k, None) and v is not None
    }
    atomic_write_text(args.config_file, toml.dumps(values))
    logger.info("wrote %d options to %s", len(values), args.config_file)
