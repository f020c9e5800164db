"""LLLite files and training states on disk: when to save, names, metadata, pruning and resuming.

Every decision about saving lives in ``Saver``: the loop tells it that a step or an epoch ended
and it writes, prunes and uploads what the options ask for. Files and states are written to a
temporary name and renamed into place, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import contextlib
import logging
import mimetypes
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from library.atomic_io import WriteError, as_write_error, publish_folder, remove_tree
from library.cli import Limit, Options, flag, option, switched_off
from library.errors import UserError
from library.training.states import check_state_folder, load_position, write_state_record
from library.training.together import together

logger = logging.getLogger(__name__)

SAVE_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SavingOptions(Options):
    group = "saving"

    output_dir: Path = option("output", convert=Path, help="where LLLite files, states and samples go")
    output_name: str | None = option(  # None: sd-scripts' stems, see Saver.stem
        help="file name stem of the saved LLLite files (default as in sd-scripts: last.safetensors, "
             "epoch-000001.safetensors, at-step00000100.safetensors)")
    extension: str = option("safetensors", name="save_model_as", choices=("safetensors", "ckpt", "pt"),
                            help="file format of saved LLLite files")
    save_precision: str | None = option(choices=tuple(SAVE_PRECISIONS),
                                        help="dtype of saved files (default: as trained, fp32)")
    every_n_epochs: int | None = option(name="save_every_n_epochs", type=int, limit=Limit(1),
                                        help="save an LLLite file every N epochs, >= 1")
    every_n_steps: int | None = option(name="save_every_n_steps", type=int, limit=Limit(1),
                                       help="save an LLLite file every N steps, >= 1")
    epoch_ratio: int | None = option(
        name="save_n_epoch_ratio", type=int, limit=Limit(0), what="0 is off, as in sd-scripts",
        help="save at least N files over the run, evenly spaced by epochs, >= 0 (0: off; instead of --save_every_n_epochs)")
    last_n_epochs: int | None = option(
        name="save_last_n_epochs", type=int, limit=Limit(1),
        help="keep only the last N files saved by epoch, >= 1 (needs --save_every_n_epochs or --save_n_epoch_ratio)")
    last_n_epochs_state: int | None = option(
        name="save_last_n_epochs_state", type=int, limit=Limit(1),
        help="keep only the last N states saved by epoch, >= 1 (default: --save_last_n_epochs; needs --save_state)")
    last_n_steps: int | None = option(
        name="save_last_n_steps", type=int, limit=Limit(1),
        help="keep the files saved by step at most N steps old and remove older ones, >= 1 (needs --save_every_n_steps; "
             "as sd-scripts, N counts steps, not files)")
    last_n_steps_state: int | None = option(
        name="save_last_n_steps_state", type=int, limit=Limit(1),
        help="as --save_last_n_steps, for states, >= 1 (default: --save_last_n_steps; needs --save_state)")
    save_state: bool = flag(help="also save optimizer/scheduler/RNG state with each file, to resume from")
    save_state_on_train_end: bool = flag(help="save a state at the end of training (to continue it later)")
    resume: Path | None = option(help="a state folder written with --save_state or --save_state_on_train_end")
    metadata: dict[str, str] = field(default_factory=dict)  # modelspec.* given by the user

    @property
    def dtype(self) -> torch.dtype | None:
        return SAVE_PRECISIONS.get(self.save_precision or "")

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        name = v["output_name"]
        if name is not None and (not name or "/" in name or "\\" in name or name in (".", "..")):
            raise UserError(f"--output_name {name!r} must be a plain file name stem without folders (folders go in --output_dir)")
        _check_combinations(args)
        # With resume_from_huggingface, --resume names a state on the hub: hub_upload downloads it before training.
        resume = Path(v["resume"]) if v["resume"] and not args.resume_from_huggingface else None
        if resume is not None:
            check_state_folder(resume)
        return {**v, "resume": resume, "last_n_epochs_state": v["last_n_epochs_state"] or v["last_n_epochs"],
                "last_n_steps_state": v["last_n_steps_state"] or v["last_n_steps"],
                "metadata": _user_metadata(ModelspecOptions.from_args(args))}

    def epoch_interval(self, num_epochs: int) -> int | None:
        """Epochs between saves: ``--save_every_n_epochs``, or spread by ``--save_n_epoch_ratio``."""
        if self.epoch_ratio:
            return max(1, num_epochs // self.epoch_ratio)
        return self.every_n_epochs


@dataclass(frozen=True)
class ModelspecOptions(Options):
    """``--metadata_<name>``: ``modelspec.<name>`` of the saved file."""

    group = "file metadata (modelspec)"

    title: str | None = option(name="metadata_title", help="modelspec.title of the saved file (default: --output_name)")
    author: str | None = option(name="metadata_author", help="modelspec.author of the saved file")
    description: str | None = option(name="metadata_description", help="modelspec.description of the saved file")
    license: str | None = option(name="metadata_license", help="modelspec.license of the saved file")
    tags: str | None = option(name="metadata_tags", help="modelspec.tags of the saved file (comma-separated)")
    usage_hint: str | None = option(name="metadata_usage_hint", help="modelspec.usage_hint of the saved file")
    thumbnail: str | None = option(
        name="metadata_thumbnail",
        help="modelspec.thumbnail of the saved file (an image file, stored as a data URL, or a data: URL)")
    merged_from: str | None = option(name="metadata_merged_from", help="modelspec.merged_from of the saved file")
    trigger_phrase: str | None = option(name="metadata_trigger_phrase", help="modelspec.trigger_phrase of the saved file")
    preprocessor: str | None = option(name="metadata_preprocessor", help="modelspec.preprocessor of the saved file")
    is_negative_embedding: str | None = option(name="metadata_is_negative_embedding",
                                               help="modelspec.is_negative_embedding of the saved file")


OPTIONS = (SavingOptions, ModelspecOptions)


def _check_combinations(args: argparse.Namespace) -> None:
    if args.save_n_epoch_ratio and args.save_every_n_epochs:
        raise UserError(f"--save_n_epoch_ratio {args.save_n_epoch_ratio} and --save_every_n_epochs "
                        f"{args.save_every_n_epochs} both set the epoch interval: keep one")
    # Pruning with nothing to prune: sd-scripts runs and the option does nothing, so here too (one warning).
    needs = {"save_last_n_epochs": ("save_every_n_epochs", "save_n_epoch_ratio"),
             "save_last_n_epochs_state": ("save_every_n_epochs", "save_n_epoch_ratio"),
             "save_last_n_steps": ("save_every_n_steps",), "save_last_n_steps_state": ("save_every_n_steps",)}
    for opt, required in needs.items():
        if getattr(args, opt) and not any(getattr(args, r) for r in required):
            switched_off(f"--{opt} {getattr(args, opt)}", " or ".join("--" + r for r in required),
                         "it prunes the files they save")
    for opt in ("save_last_n_epochs_state", "save_last_n_steps_state"):
        if getattr(args, opt) and not args.save_state:
            switched_off(f"--{opt} {getattr(args, opt)}", "--save_state", "it prunes the states --save_state writes")


def _user_metadata(given: ModelspecOptions) -> dict[str, str]:
    out = {}
    for name, value in dataclasses.asdict(given).items():
        if value is None:
            continue
        if name == "thumbnail" and not str(value).startswith("data:"):
            value = _data_url(Path(value))
        out[f"modelspec.{name}"] = str(value)
    return out


def _data_url(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"--metadata_thumbnail {path}: no such file (give an image file or a data: URL)")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


# ---------------------------------------------------------------------------------------------- run state


@dataclass
class Progress:
    global_step: int = 0  # optimizer steps done
    epoch: int = 1  # current epoch, from 1
    batches_in_epoch: int = 0  # data-loader batches consumed in the current epoch


class TrainingRNG:
    """The random stream of noise and timesteps, saved with the training state.

    It is separate from torch's global generator, which data loaders and libraries also draw
    from, so a resumed run draws exactly the noise the uninterrupted run would have.
    """

    def __init__(self, seed: int, process_index: int):
        self.process_index = process_index
        self.generator = torch.Generator().manual_seed(seed * 1000 + process_index)

    def _file(self, folder: Path) -> Path:
        return Path(folder) / f"noise_rng_{self.process_index}.pt"

    def save(self, folder: Path) -> None:
        """Each process saves its own stream (accelerate's custom objects are saved by the main process only)."""
        with open(self._file(folder), "wb") as f:  # through Python, so a full disk surfaces as an OSError
            torch.save(self.generator.get_state(), f)

    def load(self, folder: Path) -> None:
        path = self._file(folder)
        if not path.is_file():
            raise UserError(f"--resume {folder}: {path.name} is missing; was the state written with another number of processes?")
        self.generator.set_state(torch.load(path, weights_only=True))


def load_progress(state_dir: Path) -> Progress:
    return Progress(**load_position(state_dir))


class Uploader(Protocol):
    def upload(self, local: Path) -> None: ...


# ---------------------------------------------------------------------------------------------- the saver


class Saver:
    """Names, writes, prunes and uploads LLLite files and training states (the main process writes)."""

    def __init__(self, opts: SavingOptions, accelerator, network, run_metadata: dict[str, str], num_epochs: int,
                 rng: TrainingRNG, uploader: Uploader | None = None, last_state: Path | None = None):
        self.opts = opts
        self.accelerator = accelerator
        self.network = network
        self.run_metadata = run_metadata
        self.epoch_interval = opts.epoch_interval(num_epochs)
        self.num_epochs = num_epochs
        self.rng = rng
        self.uploader = uploader
        self.last_saved: Path | None = None  # the newest complete LLLite file of this run
        self.last_state: Path | None = last_state  # the newest complete state, to continue from (the resumed one first)

    # -- names -----------------------------------------------------------------------------------

    def stem(self, tag: str | None) -> str:
        """``<name>-<tag>`` or ``<name>``; without --output_name, sd-scripts' names: epoch-, at-, last."""
        name = self.opts.output_name
        if name is None:
            name = "last" if tag is None else "at" if tag.startswith("step") else "epoch"
        return f"{name}-{tag}" if tag else name

    def model_path(self, tag: str | None) -> Path:
        return self.opts.output_dir / f"{self.stem(tag)}.{self.opts.extension}"

    def state_path(self, tag: str | None) -> Path:
        return self.opts.output_dir / f"{self.stem(tag)}-state"

    # -- events from the loop ----------------------------------------------------------------------

    def on_step_end(self, progress: Progress, max_steps: int) -> None:
        every = self.opts.every_n_steps
        step = progress.global_step
        if not every or step % every or step >= max_steps:
            return
        self._save_tagged(f"step{step:08d}", progress)
        self._prune_steps(step)

    def on_epoch_end(self, epoch: int, progress: Progress, max_steps: int) -> None:
        every = self.epoch_interval
        if not every or epoch % every or epoch >= self.num_epochs or progress.global_step >= max_steps:
            return
        self._save_tagged(f"{epoch:06d}", progress)
        self._prune_epochs(epoch)

    def _save_tagged(self, tag: str, progress: Progress) -> None:
        self.save_model(tag, progress)
        if self.opts.save_state:
            self.save_state(tag, progress)

    def on_train_end(self, progress: Progress) -> Path:
        final = self.save_model(None, progress)
        if self.opts.save_state or self.opts.save_state_on_train_end:
            self.save_state(None, progress)
        return final

    # -- writing ---------------------------------------------------------------------------------

    def metadata(self, progress: Progress) -> dict[str, str]:
        meta = {**self.run_metadata, "ss_steps": str(progress.global_step), "ss_epoch": str(progress.epoch),
                "ss_training_finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # sd-scripts' title: --metadata_title, else --output_name, else "LoRA@<time>" (its LLLite files say LoRA)
        meta.setdefault("modelspec.title", self.opts.output_name or f"LoRA@{time.strftime('%Y-%m-%dT%H:%M:%S')}")
        meta.update(self.opts.metadata)
        return meta

    def save_model(self, tag: str | None, progress: Progress) -> Path:
        path = self.model_path(tag)

        def write() -> None:
            unwrapped = self.accelerator.unwrap_model(self.network)
            try:
                unwrapped.save(path, dtype=self.opts.dtype, metadata=self.metadata(progress))
            except WriteError as e:
                raise WriteError("the LLLite file", e.path, e.reason) from None
            logger.info("saved %s", path)
            if self.uploader is not None:
                self.uploader.upload(path)

        together(self.accelerator, write, f"saving {path}", main_only=True)
        self.last_saved = path
        return path

    def save_state(self, tag: str | None, progress: Progress) -> None:
        """accelerate state (weights, optimizer, scheduler, RNG) + our position, renamed into place when complete.

        Every process writes its part into a temporary folder; when any part fails, the folder goes
        and every process stops with the failure (see ``together``).
        """
        final = self.state_path(tag)
        tmp = final.with_name(f".{final.name}.tmp")
        acc = self.accelerator
        together(acc, lambda: remove_tree(tmp), f"clearing {tmp}", main_only=True)  # left by a killed run
        try:
            together(acc, lambda: self._write_state_parts(tmp, final), f"saving the training state {final}")
            together(acc, lambda: self._publish_state(tmp, final, progress), f"saving the training state {final}",
                     main_only=True)
        except BaseException:
            if acc.is_main_process:
                remove_tree(tmp)
            raise
        self.last_state = final

    def _write_state_parts(self, tmp: Path, final: Path) -> None:
        try:
            self.accelerator.save_state(str(tmp))
            self.rng.save(tmp)
        except Exception as e:  # asked before the folder is removed: a disk still full tells why torch stopped
            raise (as_write_error(e, "the training state", final) or e) from None

    def _publish_state(self, tmp: Path, final: Path, progress: Progress) -> None:
        write_state_record(tmp, progress.__dict__)  # written last: a state without it is incomplete
        publish_folder(tmp, final, "the training state")
        logger.info("saved training state %s", final)
        if self.uploader is not None:
            self.uploader.upload(final)

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """A write that fails mid-run also says which file and state are complete, and how to continue."""
        try:
            yield
        except WriteError as e:
            raise UserError(f"{e}. {self.what_is_kept(e)}") from None

    def what_is_kept(self, error: WriteError) -> str:
        full = "space" in error.reason or "quota" in error.reason
        fix = "free some space there (or choose another --output_dir)" if full else f"fix the cause ({error.reason})"
        model = f"The newest complete LLLite file is {self.last_saved}" if self.last_saved else "No LLLite file was saved"
        if self.last_state is not None:
            return (f"{model} and the newest complete state is {self.last_state}; {fix}, then run the same command "
                    f"with --resume {self.last_state} to continue from there.")
        hint = "" if self.opts.save_state else " (--save_state keeps one)"
        return f"{model} and no state to resume from was saved{hint}; {fix}, then run it again."

    # -- pruning ---------------------------------------------------------------------------------

    def _prune_epochs(self, epoch: int) -> None:
        """Keep the last N epoch saves: saves are ``epoch_interval`` apart, so older numbers go."""
        every = self.epoch_interval or 1
        self._remove(epoch - every * self.opts.last_n_epochs if self.opts.last_n_epochs else None,
                     epoch - every * self.opts.last_n_epochs_state if self.opts.last_n_epochs_state else None,
                     lambda n: f"{n:06d}", every)

    def _prune_steps(self, step: int) -> None:
        """Keep the saves at most N steps old (N counted in steps, as in sd-scripts)."""
        every = self.opts.every_n_steps or 1
        self._remove(step - self.opts.last_n_steps - 1 if self.opts.last_n_steps else None,
                     step - self.opts.last_n_steps_state - 1 if self.opts.last_n_steps_state else None,
                     lambda n: f"step{n:08d}", every)

    def _remove(self, model_upto: int | None, state_upto: int | None, tag_of, every: int) -> None:
        """Remove model files numbered <= ``model_upto`` and states numbered <= ``state_upto``."""
        if not self.accelerator.is_main_process:
            return
        for upto, path_of in ((model_upto, self.model_path), (state_upto, self.state_path)):
            if upto is None:
                continue
            for n in range(every, upto + 1, every):
                path = path_of(tag_of(n))
                if not path.exists():
                    continue
                try:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except OSError as e:  # an old save that stays is no loss: training goes on
                    logger.warning("could not remove %s (older than the last saves kept): %s", path, e.strerror or e)
                    continue
                logger.info("removed %s (older than the last saves kept)", path)


def run_metadata(options: Any, models: Any, resolution: tuple[int, int], loss: Any = None) -> dict[str, str]:
    """``ss_*``/``modelspec.*`` fields that describe the run, written into every saved file.

    ``loss``: the loss options the run trains with (after the checkpoint's markers); default the options'.
    """
    o = options
    loss = o.loss if loss is None else loss
    meta = {
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "v" if loss.v_parameterization else "epsilon",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": models.name,
        "ss_learning_rate": str(o.optimizer.learning_rate),
        "ss_optimizer": o.optimizer.name,
        "ss_lr_scheduler": o.optimizer.lr_scheduler,
        "ss_mixed_precision": o.precision.mixed_precision,
        "ss_full_bf16": str(bool(o.precision.full_bf16)),
        "ss_network_dropout": str(o.network.dropout),
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_seed": str(o.run.seed),
        "ss_noise_offset": str(o.loss.noise_offset),
        "ss_min_snr_gamma": str(o.loss.min_snr_gamma),
        "ss_v_parameterization": str(bool(loss.v_parameterization)),
    }
    if o.loss.min_timestep is not None or o.loss.max_timestep is not None:  # as sd-scripts: only when one is given
        meta["modelspec.timestep_range"] = f"{o.loss.min_timestep or 0},{1000 if o.loss.max_timestep is None else o.loss.max_timestep}"
    if o.data.text_encoding.clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(o.data.text_encoding.clip_skip)
    return meta
