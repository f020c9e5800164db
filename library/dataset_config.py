"""Dataset configuration: read and validate ``dataset.toml`` or the command-line dataset options.

The job of this module is to turn what the user wrote into checked, immutable config
objects (``DatasetConfig`` holding ``SubsetConfig``s). Nothing here opens an image.

Two ways in:

* ``load_dataset_config(path, cli_defaults)``: a TOML file with ``[general]``,
  ``[[datasets]]`` and ``[[datasets.subsets]]``. Options ascend: a subset key beats the
  same key on its dataset, a dataset key beats ``[general]``, and ``[general]`` beats
  the command-line defaults (``cli_defaults``), which beat the built-in defaults.
* ``config_from_args(args)``: no TOML, ``--train_data_dir`` + ``--conditioning_data_dir``
  and the command-line dataset options make one dataset with one subset.

``build_dataset_configs(args)`` picks the right one for a training command line.

Every problem found is collected and reported in one ``UserError``: unknown keys (with
a "did you mean" suggestion), wrong types, values out of range, missing required keys
and directories that do not exist. The reference tool ignores unknown keys silently;
a typo here is an error.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from library.errors import UserError

# Each key maps to (kind, default). Kinds: bool, int, float, str, path, resolution.
# A default of None on a path key means "required".
SUBSET_KEYS: dict[str, tuple[str, Any]] = {
    "image_dir": ("path", None),
    "conditioning_data_dir": ("path", None),
    "caption_extension": ("str", ".txt"),
    "num_repeats": ("int", 1),
    "shuffle_caption": ("bool", False),
    "caption_separator": ("str", ","),
    "keep_tokens": ("int", 0),
    "keep_tokens_separator": ("str", ""),
    "flip_aug": ("bool", False),
    "color_aug": ("bool", False),
    "random_crop": ("bool", False),
    "caption_prefix": ("str", ""),
    "caption_suffix": ("str", ""),
    "caption_dropout_rate": ("float", 0.0),
    "caption_dropout_every_n_epochs": ("int", 0),
    "caption_tag_dropout_rate": ("float", 0.0),
    "cache_info": ("bool", False),
}

DATASET_KEYS: dict[str, tuple[str, Any]] = {
    "resolution": ("resolution", (1024, 1024)),
    "batch_size": ("int", 1),
    "enable_bucket": ("bool", False),
    "min_bucket_reso": ("int", 256),
    "max_bucket_reso": ("int", 2048),
    "bucket_reso_steps": ("int", 64),
    "bucket_no_upscale": ("bool", False),
    "network_multiplier": ("float", 1.0),
}

ALL_KEYS: dict[str, tuple[str, Any]] = {**DATASET_KEYS, **SUBSET_KEYS}

# Command-line option names that differ from the dataset key they set.
CLI_ALIASES: dict[str, str] = {"train_batch_size": "batch_size", "train_data_dir": "image_dir"}

_DATASET_KEY_HINT = {k: "it is a dataset key: move it to the [[datasets]] table (or [general])" for k in DATASET_KEYS}

_KIND_WORDS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "path": "a string (a directory path)",
    "resolution": "an integer or a list of two integers [width, height]",
}


@dataclass(frozen=True)
class SubsetConfig:
    """One folder of training images paired with one folder of conditioning images."""

    image_dir: Path
    conditioning_data_dir: Path
    caption_extension: str = ".txt"
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    cache_info: bool = False


@dataclass(frozen=True)
class DatasetConfig:
    """A group of subsets sharing a resolution, batch size and bucketing rules.

    ``resolution`` is ``(width, height)``; with bucketing its area is the bucket area.
    """

    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int] = (1024, 1024)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0


class _Problems:
    """Collects every problem so that the user can fix them all in one go."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        head = f"{len(self.items)} problem(s) in the dataset config {self.source}:"
        raise UserError("\n  ".join([head, *self.items]) + "\nSee docs/dataset.md for every key and its meaning.")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f'the string "{value}"'
    if isinstance(value, (list, tuple)):
        return f"the list {list(value)}"
    if isinstance(value, dict):
        return "a table"
    return f"the {type(value).__name__} {value!r}"


def _parse_resolution(value: Any) -> tuple[int, int] | None:
    """Accept 1024, [1024, 768], "1024" or "1024,768" (the command-line form)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
            return None
        nums = [int(p) for p in parts]
        return (nums[0], nums[-1])
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return (int(value[0]), int(value[1]))
    return None


def _convert(key: str, value: Any, where: str, problems: _Problems, from_cli: bool) -> Any:
    """Check the type of one value where it was written; return it converted or None."""
    kind = ALL_KEYS[key][0]
    ok = False
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif kind in ("str", "path"):
        ok = isinstance(value, str) or (from_cli and isinstance(value, os.PathLike))
        if ok:
            value = os.fspath(value)
    elif kind == "resolution":
        parsed = _parse_resolution(value) if (from_cli or not isinstance(value, str)) else None
        if parsed is not None:
            return parsed
    if ok:
        return value
    hint = ""
    if isinstance(value, str) and (kind in ("int", "float", "bool") or (kind == "resolution" and value.isdigit())):
        hint = f" (write {key} = {value} without quotes)"
    problems.add(where, f"{key} must be {_KIND_WORDS[kind]}, got {_describe(value)}{hint}")
    return None


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else "; see docs/dataset.md for the valid keys"


def _read_section(
    table: Mapping[str, Any],
    allowed: Mapping[str, Any],
    where: str,
    problems: _Problems,
    *,
    skip: Sequence[str] = (),
    misplaced_hint: Mapping[str, str] | None = None,
    from_cli: bool = False,
) -> dict[str, Any]:
    """Validate the keys and value types of one table; return the valid entries."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in allowed:
            if misplaced_hint and key in misplaced_hint:
                problems.add(where, f'"{key}" cannot be set here; {misplaced_hint[key]}')
            else:
                problems.add(where, f'unknown key "{key}"{_suggest(key, [*allowed, *skip])}')
            continue
        converted = _convert(key, value, where, problems, from_cli)
        if converted is not None:
            out[key] = converted
    return out


def _resolve_dir(value: str, key: str, where: str, base_dir: Path | None, problems: _Problems) -> Path | None:
    """Relative paths are taken from the current directory, then from the TOML file's folder."""
    path = Path(os.path.expanduser(value))
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if base_dir is not None and not path.is_absolute():
        candidates.append(base_dir / path)
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    if any(c.exists() for c in candidates):
        problems.add(where, f'{key} = "{value}" is a file, not a directory')
    else:
        tried = " or ".join(str(c) for c in candidates)
        problems.add(where, f'{key} = "{value}": the directory does not exist (looked for {tried})')
    return None


def _check_ranges(values: Mapping[str, Any], where: str, problems: _Problems) -> None:
    """Value checks that need no other key, done where the value is written."""
    for key, v in values.items():
        if key in ("num_repeats", "batch_size") and v < 1:
            problems.add(where, f"{key} must be at least 1, got {v}")
        elif key in ("keep_tokens", "caption_dropout_every_n_epochs") and v < 0:
            problems.add(where, f"{key} must be 0 or more, got {v}")
        elif key in ("caption_dropout_rate", "caption_tag_dropout_rate") and not (0.0 <= v <= 1.0):
            problems.add(where, f"{key} must be between 0 and 1, got {v}")
        elif key == "network_multiplier" and not math.isfinite(v):
            problems.add(where, f"{key} must be a finite number, got {v}")
        elif key == "caption_separator" and v == "":
            problems.add(where, 'caption_separator must not be empty (the default is ",")')
        elif key == "caption_extension" and v and v.isalnum():
            problems.add(where, f'caption_extension = "{v}" has no dot; did you mean ".{v}"?')
        elif key == "bucket_reso_steps" and (v <= 0 or v % 8 != 0):
            problems.add(where, f"bucket_reso_steps must be a positive multiple of 8 (64 is usual), got {v}")
        elif key in ("min_bucket_reso", "max_bucket_reso") and v <= 0:
            problems.add(where, f"{key} must be positive, got {v}")
        elif key == "resolution":
            w, h = v
            if w <= 0 or h <= 0 or w % 8 or h % 8:
                problems.add(where, f"resolution must be positive multiples of 8 (the VAE works on 8x8 blocks), got {w}x{h}")


def _check_buckets(values: Mapping[str, Any], where: str, problems: _Problems) -> None:
    """Checks between the bucket keys of one dataset (after merging)."""
    steps, lo, hi = values["bucket_reso_steps"], values["min_bucket_reso"], values["max_bucket_reso"]
    if steps <= 0 or steps % 8 or lo <= 0 or hi <= 0:
        return  # already reported
    if lo > hi:
        problems.add(where, f"min_bucket_reso ({lo}) is larger than max_bucket_reso ({hi})")
    if values["enable_bucket"]:
        for key, v in (("min_bucket_reso", lo), ("max_bucket_reso", hi)):
            if v % steps:
                problems.add(where, f"{key} ({v}) must be a multiple of bucket_reso_steps ({steps})")
        w, h = values["resolution"]
        if min(w, h) < lo or max(w, h) > hi:
            problems.add(where, f"resolution {w}x{h} must lie within min_bucket_reso {lo} and max_bucket_reso {hi}")


def _build_subset(merged: Mapping[str, Any], where: str, base_dir: Path | None, problems: _Problems) -> SubsetConfig | None:
    ok = True
    dirs: dict[str, Path] = {}
    for key, hint in (
        ("image_dir", "the folder of training images"),
        ("conditioning_data_dir", "the folder of conditioning images (required for ControlNet-LLLite)"),
    ):
        if key not in merged:
            problems.add(where, f"{key} is missing: set {key} = \"...\" to {hint}")
            ok = False
            continue
        resolved = _resolve_dir(merged[key], key, where, base_dir, problems)
        if resolved is None:
            ok = False
        else:
            dirs[key] = resolved
    if ok and dirs["image_dir"] == dirs["conditioning_data_dir"]:
        problems.add(where, "image_dir and conditioning_data_dir are the same folder; keep the conditioning images in their own folder")
        ok = False
    if not ok:
        return None
    kwargs = {k: merged.get(k, SUBSET_KEYS[k][1]) for k in SUBSET_KEYS}
    kwargs.update(dirs)
    return SubsetConfig(**kwargs)


def _build_dataset(
    layers: Sequence[Mapping[str, Any]],
    subset_tables: Sequence[tuple[str, Mapping[str, Any]]],
    where: str,
    base_dir: Path | None,
    problems: _Problems,
) -> DatasetConfig | None:
    """``layers`` go from least to most specific (defaults first); each subset table comes last."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    ds_values = {k: merged.get(k, DATASET_KEYS[k][1]) for k in DATASET_KEYS}
    _check_buckets(ds_values, where, problems)
    subsets = []
    for sub_where, sub_values in subset_tables:
        sub_merged = {k: v for k, v in merged.items() if k in SUBSET_KEYS}
        sub_merged.update(sub_values)
        subsets.append(_build_subset(sub_merged, sub_where, base_dir, problems))
    if any(s is None for s in subsets):
        return None
    return DatasetConfig(subsets=tuple(subsets), **ds_values)


def dataset_options_from_args(args: Any) -> dict[str, Any]:
    """The dataset options given on a command line (argparse Namespace or any object/mapping).

    Attributes that are missing or None count as "not given". ``train_batch_size`` becomes
    ``batch_size``; ``train_data_dir`` becomes ``image_dir``.
    """
    get = args.get if isinstance(args, Mapping) else (lambda name, default=None: getattr(args, name, default))
    out: dict[str, Any] = {}
    for name in [*ALL_KEYS, *CLI_ALIASES]:
        value = get(name, None)
        if value is not None:
            out[CLI_ALIASES.get(name, name)] = value
    return out


def _cli_layer(options: Mapping[str, Any], problems: _Problems) -> dict[str, Any]:
    """Check command-line values; problems name the option as ``--name``."""
    layer: dict[str, Any] = {}
    for key, value in options.items():
        if key not in ALL_KEYS:
            problems.add("command line", f'unknown dataset option "{key}"{_suggest(key, list(ALL_KEYS))}')
            continue
        converted = _convert(key, value, f"command line --{key}", problems, from_cli=True)
        if converted is not None:
            layer[key] = converted
    _check_ranges(layer, "command line", problems)
    return layer


def load_dataset_config(path: str | os.PathLike, cli_defaults: Mapping[str, Any] | None = None) -> list[DatasetConfig]:
    """Read and validate a dataset TOML.

    ``cli_defaults`` holds dataset options from the training command line (for example
    ``{"resolution": "1024", "batch_size": 4}``, see ``dataset_options_from_args``); they
    apply where the TOML does not set the key. Raises ``UserError`` listing every problem.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset config {path} does not exist (given as --dataset_config)")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"dataset config {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read dataset config {path}: {e}") from None

    problems = _Problems(str(path))
    cli = _cli_layer({k: v for k, v in (cli_defaults or {}).items() if k not in ("image_dir", "conditioning_data_dir")}, problems)

    for key in data:
        if key not in ("general", "datasets"):
            problems.add("top level", f'unknown table or key "{key}"{_suggest(key, ["general", "datasets"])}')

    general_raw = data.get("general", {})
    if not isinstance(general_raw, dict):
        problems.add("top level", "general must be a table: write [general]")
        general_raw = {}
    general = _read_section(general_raw, ALL_KEYS, "[general]", problems)
    _check_ranges(general, "[general]", problems)

    datasets_raw = data.get("datasets", [])
    if isinstance(datasets_raw, dict):
        problems.add("top level", "datasets must be an array of tables: write [[datasets]], not [datasets]")
        datasets_raw = []
    if not datasets_raw:
        problems.add("top level", "no [[datasets]] table: add at least one [[datasets]] with a [[datasets.subsets]]")

    defaults = {k: v[1] for k, v in DATASET_KEYS.items()}
    configs: list[DatasetConfig | None] = []
    for i, ds_raw in enumerate(datasets_raw):
        where = f"datasets[{i}]"
        if not isinstance(ds_raw, dict):
            problems.add(where, "must be a table: write [[datasets]]")
            continue
        ds_values = _read_section(ds_raw, ALL_KEYS, where, problems, skip=("subsets",))
        _check_ranges(ds_values, where, problems)
        subsets_raw = ds_raw.get("subsets", [])
        if isinstance(subsets_raw, dict) or not isinstance(subsets_raw, list):
            problems.add(where, "subsets must be an array of tables: write [[datasets.subsets]]")
            subsets_raw = []
        if not subsets_raw:
            problems.add(where, "has no [[datasets.subsets]]: add one with image_dir and conditioning_data_dir")
        subset_tables = []
        for j, sub_raw in enumerate(subsets_raw):
            sub_where = f"{where}.subsets[{j}]"
            if not isinstance(sub_raw, dict):
                problems.add(sub_where, "must be a table: write [[datasets.subsets]]")
                continue
            sub_values = _read_section(sub_raw, SUBSET_KEYS, sub_where, problems, misplaced_hint=_DATASET_KEY_HINT)
            _check_ranges(sub_values, sub_where, problems)
            subset_tables.append((sub_where, sub_values))
        configs.append(_build_dataset([defaults, cli, general, ds_values], subset_tables, where, path.resolve().parent, problems))

    problems.raise_if_any()
    return [c for c in configs if c is not None]


def config_from_args(args: Any) -> list[DatasetConfig]:
    """The no-TOML mode: one dataset, one subset from ``--train_data_dir`` and ``--conditioning_data_dir``.

    Every other dataset key may come from the same object (``--resolution``,
    ``--train_batch_size``, ``--caption_extension``, ``--enable_bucket``, ...).
    """
    options = dataset_options_from_args(args)
    problems = _Problems("given on the command line")
    for key, option in (("image_dir", "--train_data_dir"), ("conditioning_data_dir", "--conditioning_data_dir")):
        if key not in options:
            problems.add("command line", f"{option} is required when no --dataset_config is given")
    layer = _cli_layer(options, problems)
    subset_values = {k: v for k, v in layer.items() if k in SUBSET_KEYS}
    defaults = {k: v[1] for k, v in DATASET_KEYS.items()}
    config = None
    if not problems.items:
        config = _build_dataset([defaults, layer], [("command line", subset_values)], "command line", None, problems)
    problems.raise_if_any()
    assert config is not None
    return [config]


def build_dataset_configs(args: Any) -> list[DatasetConfig]:
    """Dataset configs for a training command line: ``--dataset_config`` or the no-TOML mode."""
    dataset_config = getattr(args, "dataset_config", None)
    if dataset_config is None:
        return config_from_args(args)
    given = [f"--{name}" for name in ("train_data_dir", "conditioning_data_dir") if getattr(args, name, None) is not None]
    if given:
        raise UserError(
            f"{' and '.join(given)} cannot be combined with --dataset_config {dataset_config}: "
            "set image_dir and conditioning_data_dir in the dataset TOML, or drop --dataset_config"
        )
    return load_dataset_config(dataset_config, dataset_options_from_args(args))


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset options of the training command line (each also a [general]-level default for the TOML)."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset_config", help="dataset TOML (see docs/dataset.md)")
    g.add_argument("--train_data_dir", help="training images (when no --dataset_config)")
    g.add_argument("--conditioning_data_dir", help="conditioning images (when no --dataset_config)")
    g.add_argument("--resolution", help='training area, "1024" or "1024,1024"').joins_list = True
    g.add_argument("--train_batch_size", type=int, default=None, help="batch size (when the dataset TOML gives none)")
    g.add_argument("--caption_extension", default=None, help="caption file extension (default .txt)")
    g.add_argument("--shuffle_caption", action="store_true", default=None, help="shuffle comma-separated tags")
    g.add_argument("--keep_tokens", type=int, default=None, help="keep the first N tags in place when shuffling")
    g.add_argument("--flip_aug", action="store_true", default=None, help="random horizontal flips (image and conditioning together)")
    g.add_argument("--enable_bucket", action="store_true", default=None, help="aspect-ratio buckets")
    g.add_argument("--min_bucket_reso", type=int, default=None, help="smallest bucket side")
    g.add_argument("--max_bucket_reso", type=int, default=None, help="largest bucket side")
    g.add_argument("--bucket_reso_steps", type=int, default=None, help="bucket sides are multiples of this")
    g.add_argument("--bucket_no_upscale", action="store_true", default=None, help="never upscale an image to fit a bucket")
    g.add_argument("--caption_dropout_rate", type=float, default=None, help="drop the whole caption with this probability")
    g.add_argument("--debug_dataset", action="store_true", help="save a few batches as images to check pairing, then exit")
    g.add_argument("--max_data_loader_n_workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep workers alive between epochs")


@dataclass(frozen=True)
class DataOptions:
    """The checked dataset configs and how batches are loaded."""

    datasets: tuple[DatasetConfig, ...]
    num_workers: int = 0
    persistent_workers: bool = False
    debug_dataset: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataOptions":
        if args.max_data_loader_n_workers < 0:
            raise UserError(f"--max_data_loader_n_workers {args.max_data_loader_n_workers} is out of range: it must be >= 0")
        return cls(datasets=tuple(build_dataset_configs(args)), num_workers=args.max_data_loader_n_workers,
                   persistent_workers=args.persistent_data_loader_workers, debug_dataset=args.debug_dataset)
