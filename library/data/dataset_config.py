"""Dataset configuration: read and validate ``dataset.toml`` or the command-line dataset options.

The job of this module is to turn what the user wrote into checked, immutable config
objects (``DatasetConfig`` holding ``SubsetConfig``s). Nothing here opens an image.

Two ways in:

* ``load_dataset_config(path, cli_defaults)``: a TOML file with ``[general]``,
  ``[[datasets]]`` and ``[[datasets.subsets]]``. Options ascend: a subset key beats the
  same key on its dataset, a dataset key beats ``[general]``, and ``[general]`` beats
  the command-line defaults (``cli_defaults``), which beat the built-in defaults.
* ``config_from_args(args)``: no TOML, ``--train_data_dir`` + ``--conditioning_data_dir``
  (or ``--conditioning_preprocessor``, or ``--in_json``) and the command-line dataset options make
  one dataset with one subset.

``build_dataset_configs(args)`` picks the right one for a training command line.

Every problem found is collected and reported in one ``UserError``: unknown keys (with
a "did you mean" suggestion), wrong types, values out of range, missing required keys
and directories that do not exist. The reference tool ignores unknown keys silently;
a typo here is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import tomllib

from library.cli import Limit, Option, Options, flag, option, parse_key_values, refused
from library.data import conditioning_preprocessors
from library.errors import UserError
from library.sdxl.text_encoding import TextEncodingOptions

# The resize filters of resize_interpolation (sd-scripts' names; linear = bilinear, cubic = bicubic).
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

# The dataset keys are declared once, as the fields of SubsetConfig and DatasetConfig (``key``): kind,
# default, allowed values and the command-line option that sets them as a default for every subset.
# Kinds: bool, int, float, str, path, file, resolution, pair, table.


@dataclass(frozen=True)
class Key:
    """One dataset TOML key: how its value is read and checked, and its command-line option."""

    kind: str
    limit: Limit | None = None  # the range, checked by cli.Limit (the one range checker)
    one_of: tuple[str, ...] | None = None
    rule: Callable[[str, Any], str | None] | None = None  # a problem no range or choice describes
    option: str | None = ""  # the command-line option that sets it ("" = the key's own name, None = none)
    help: str = ""
    group: str = "dataset"  # its --help section
    alias: tuple[tuple[str, str], ...] = ()  # more option names, each with its help

    def problem(self, name: str, value: Any) -> str | None:
        """What is wrong with ``value`` for the key ``name``, or None."""
        if self.limit is not None:
            wrong = self.limit.problem(name, value)
            if wrong:
                return wrong
        if self.one_of is not None and value not in self.one_of:
            close = difflib.get_close_matches(value, list(self.one_of), n=1, cutoff=0.4)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            return f'{name} = "{value}" is not one of {", ".join(self.one_of)}{hint}'
        return self.rule(name, value) if self.rule is not None else None


def key(default: Any = dataclasses.MISSING, kind: str = "str", **kw: Any) -> Any:
    """A config field that is a dataset key (see ``Key``)."""
    return field(default=default, metadata={"key": Key(kind, **kw)})


def _dotted(name: str, v: str) -> str | None:
    return f'{name} = "{v}" has no dot; did you mean ".{v}"?' if v and v.isalnum() else None


def _not_empty(name: str, v: str) -> str | None:
    return f'{name} must not be empty (the default is ",")' if v == "" else None


def _low_high(name: str, v: tuple[float, float]) -> str | None:
    if 0 < v[0] <= v[1]:
        return None
    return f"{name} must be [low, high] with 0 < low <= high (crop side / face size, e.g. [2.0, 4.0]), got {list(v)}"


def _bucket_step(name: str, v: int) -> str | None:
    return None if v > 0 and v % 8 == 0 else f"{name} must be a positive multiple of 8 (64 is usual), got {v}"


def _multiple_of_8(name: str, v: tuple[int, int]) -> str | None:
    w, h = v
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        return f"{name} must be positive multiples of 8 (the VAE works on 8x8 blocks), got {w}x{h}"
    return None


@dataclass(frozen=True)
class SubsetConfig:
    """One folder of training images paired with one folder of conditioning images.

    image_dir is required; conditioning_data_dir is required unless conditioning_preprocessor is set.
    """

    image_dir: Path = key(kind="path", option="train_data_dir",
        help="training images (when no --dataset_config)")
    conditioning_data_dir: Path | None = key(None, "path",
        help="conditioning images, paired with the training images by basename (when no --dataset_config). "
                 "With --conditioning_preprocessor the guides are made from these images instead")
    metadata_file: Path | None = key(None, "file", option="in_json",
        help="fine-tuning metadata JSON (or .jsonl) giving the captions/tags of the images of --train_data_dir "
                 "instead of caption files: sd-scripts' FineTuningDataset, here still paired with conditioning "
                 "images. The dataset TOML's subset key is metadata_file. Only the listed images are used")
    num_repeats: int = key(1, "int", limit=Limit(1), option="dataset_repeats",
        help="how many times each image is used per epoch (the num_repeats key; sd-scripts' option for "
                 "--in_json datasets, here a default for every subset)")
    cache_info: bool = key(False, "bool",
        help="remember checked image sizes in <folder>/.lllite_image_info.json (by file size and time), so "
                 "later runs skip decoding unchanged images")
    caption_extension: str = key(".caption", "str", rule=_dotted, group="captions", alias=(("caption_extention", "the same as --caption_extension (sd-scripts' misspelled alias; giving both with different "
             "values is an error)"),),
        help="caption file extension (default .caption, as in sd-scripts)")
    caption_prefix: str = key("", "str", group="captions",
        help="text added before every caption, as its own first tag: never shuffled, dropped or counted "
                 "in keep_tokens (sd-scripts prepends it with a space)")
    caption_suffix: str = key("", "str", group="captions",
        help="text added after every caption, as its own last tag: never shuffled or dropped")
    caption_separator: str = key(",", "str", rule=_not_empty, group="captions",
        help='what separates the tags of a caption (default ",")')
    shuffle_caption: bool = key(False, "bool", group="captions",
        help="shuffle the tags every epoch")
    keep_tokens: int = key(0, "int", limit=Limit(0), group="captions",
        help="the first N tags are never shuffled or dropped (>= 0)")
    keep_tokens_separator: str = key("", "str", group="captions",
        help="if set and in a caption: the tags before it are fixed, and after a second occurrence the tags "
                 "after that too; overrides --keep_tokens for that caption")
    secondary_separator: str = key("", "str", group="captions",
        help="joins tags that move and drop together: replaced by the caption separator after shuffling "
                 'and dropout (e.g. ";;;": "red hair;;;long hair" stays one tag)')
    enable_wildcard: bool = key(False, "bool", group="captions",
        help="{a|b|c} in a caption becomes one of a, b, c at random each epoch ({{ and }} are literal braces), "
                 "and a caption file with several lines gives one line at random (without it the lines are "
                 "joined with a space, where sd-scripts takes the first line)")
    caption_dropout_rate: float = key(0.0, "float", limit=Limit(0, 1), group="captions",
        help="train a sample with an empty caption with this probability, 0..1")
    caption_dropout_every_n_epochs: int = key(0, "int", limit=Limit(0), group="captions",
        help="every N-th epoch (N, 2N, ...; epochs count from 1) every caption is empty (>= 0, 0 = off)")
    caption_tag_dropout_rate: float = key(0.0, "float", limit=Limit(0, 1), group="captions",
        help="drop each tag that is not fixed with this probability, 0..1")
    token_warmup_min: int = key(1, "int", limit=Limit(0), group="captions",
        help="tags used at step 0 with --token_warmup_step (default 1, >= 0)")
    token_warmup_step: float = key(0.0, "float", limit=Limit(0), group="captions",
        help="tag warmup: before this step only the first tags of each caption are used, from "
                 "--token_warmup_min rising linearly to all; below 1 it is that fraction of the run's steps "
                 "(0 = off). Fixed tags (keep_tokens) always stay. As in sd-scripts")
    flip_aug: bool = key(False, "bool", group="images, guides and masks",
        help="random horizontal flips (image and conditioning together)")
    color_aug: bool = key(False, "bool", group="images, guides and masks",
        help="small random hue shift and brightness change of the training image, never the conditioning "
                 "image (cannot be combined with latent caching)")
    random_crop: bool = key(False, "bool", group="images, guides and masks",
        help="crop at a random position instead of the centre, the same crop for both images (cannot be "
                 "combined with latent caching; sd-scripts refuses it for ControlNet)")
    face_crop_aug_range: tuple[float, float] | None = key(None, "pair", rule=_low_high, group="images, guides and masks",
        help='"low,high", e.g. "2.0,4.0": for images named name_cx_cy_w_h.png (the face box, as sd-scripts\' '
                 "face crop tool writes them), scale each epoch so that the crop's short side is low..high times "
                 "the face size, and crop around the face (jittered; wider with --random_crop). Conditioning "
                 "images get the same scale and crop. Without bucketing only, as in sd-scripts; not with "
                 "latent caching. Such images use name.txt as caption when name_cx_cy_w_h.txt is missing")
    resize_interpolation: str | None = key(None, "str", one_of=INTERPOLATIONS, group="images, guides and masks",
        help=f"resize filter for training and conditioning images: {', '.join(INTERPOLATIONS)} (sd-scripts' "
                 "names: lanczos and box by Pillow, the others by OpenCV; linear = bilinear, cubic = bicubic). "
                 "Unset: lanczos for training images and area for conditioning images, whose thin edge lines "
                 "lanczos and bicubic ring around and nearest can drop when shrinking")
    alpha_mask: bool = key(False, "bool", group="images, guides and masks",
        help="use each training image's alpha channel as a loss mask: the loss at each latent pixel is "
                 "multiplied by the mean alpha (0..1) of its 8x8 pixels, then averaged as usual (as in sd-scripts). "
                 "Images without alpha weigh 1. Cached with the latents")
    conditioning_preprocessor: str | None = key(None, "str", one_of=tuple(conditioning_preprocessors.PREPROCESSORS), group="images, guides and masks",
        help=f"make the guides in the data pipeline: {', '.join(conditioning_preprocessors.PREPROCESSORS)} "
                 "(as tools/make_conditioning.py), applied to each training image after resizing and cropping, "
                 "so guide and image line up exactly; with --conditioning_data_dir it is applied to the "
                 "conditioning images instead. Cached with the latents")
    conditioning_preprocessor_args: tuple[tuple[str, Any], ...] = key((), "table", group="images, guides and masks",
        help='the preprocessor\'s options as name=value, e.g. "low_threshold=100" "high_threshold=200" '
                 "(canny also takes low/high); see tools/make_conditioning.py for each preprocessor's options")

    @property
    def preprocessor_options(self) -> dict[str, Any]:
        """``conditioning_preprocessor_args`` as keyword arguments of the preprocessor."""
        return dict(self.conditioning_preprocessor_args)


@dataclass(frozen=True)
class DatasetConfig:
    """A group of subsets sharing a resolution, batch size and bucketing rules.

    ``resolution`` is ``(width, height)``; with bucketing its area is the bucket area.
    """

    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int] = key((1024, 1024), "resolution", rule=_multiple_of_8,
        help='training area, "1024" or "width,height": positive multiples of 8 (default 1024)')
    batch_size: int = key(1, "int", limit=Limit(1), option="train_batch_size",
        help="batch size per process, >= 1 (when the dataset TOML gives none; default 1)")
    enable_bucket: bool = key(False, "bool",
        help="aspect-ratio buckets")
    min_bucket_reso: int = key(256, "int", limit=Limit(0, low_open=True),
        help="smallest bucket side in px, > 0 and a multiple of --bucket_reso_steps (default 256)")
    max_bucket_reso: int = key(1024, "int", limit=Limit(0, low_open=True),
        help="largest bucket side in px, >= --min_bucket_reso and a multiple of --bucket_reso_steps (default 1024, as in sd-scripts; SDXL buckets wider than 1024 need 2048)")
    bucket_reso_steps: int = key(64, "int", rule=_bucket_step,
        help="bucket sides are multiples of this, a positive multiple of 8 (default 64)")
    bucket_no_upscale: bool = key(False, "bool",
        help="never upscale an image to fit a bucket")
    network_multiplier: float = key(1.0, "float", limit=Limit(), option=None)


def _keys(cls: type) -> dict[str, tuple[Key, Any]]:
    return {f.name: (f.metadata["key"], None if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls) if "key" in f.metadata}


SUBSET_KEYS: dict[str, tuple[Key, Any]] = _keys(SubsetConfig)
DATASET_KEYS: dict[str, tuple[Key, Any]] = _keys(DatasetConfig)
ALL_KEYS: dict[str, tuple[Key, Any]] = {**DATASET_KEYS, **SUBSET_KEYS}

# Command-line option names that differ from the dataset key they set.
CLI_ALIASES: dict[str, str] = {name: k for k, (spec, _) in ALL_KEYS.items()
                               for name in (spec.option, *(a for a, _ in spec.alias)) if name and name != k}
# Keys that name one subset's own files: on the command line they make the no-TOML subset and
# cannot be defaults for a TOML's subsets.
_FOLDER_KEYS = ("image_dir", "conditioning_data_dir", "metadata_file")

_DATASET_KEY_HINT = {k: "it is a dataset key: move it to the [[datasets]] table (or [general])" for k in DATASET_KEYS}

_KIND_WORDS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "path": "a string (a directory path)",
    "file": "a string (a file path)",
    "resolution": "an integer or a list of two integers [width, height]",
    "pair": "a list of two numbers [low, high]",
    "table": "a table of option = value, e.g. { low_threshold = 100, high_threshold = 200 }",
}


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
        # The problems come last, so that the last line a user sees is one of them.
        head = f"{len(self.items)} problem(s) in the dataset config {self.source} (docs/dataset.md has every key):"
        raise UserError("\n  ".join([head, *self.items]))


def _parse_pair(value: Any) -> tuple[float, float] | None:
    """Accept [2.0, 4.0] or the command-line form "2.0,4.0"."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return (float(value[0]), float(value[1]))
    return None


def _parse_table(value: Any) -> tuple[tuple[str, Any], ...] | None:
    """A TOML table, or the command-line form ["low_threshold=100", ...]; values must be scalars."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = parse_key_values("conditioning_preprocessor_args", value)
    if not isinstance(value, Mapping):
        return None
    if not all(isinstance(v, (bool, int, float, str)) for v in value.values()):
        return None
    return tuple(sorted(value.items()))


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
    kind = ALL_KEYS[key][0].kind
    ok = False
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif kind in ("str", "path", "file"):
        ok = isinstance(value, str) or (from_cli and isinstance(value, os.PathLike))
        if ok:
            value = os.fspath(value)
    elif kind == "resolution":
        parsed = _parse_resolution(value) if (from_cli or not isinstance(value, str)) else None
        if parsed is not None:
            return parsed
    elif kind == "pair":
        parsed = _parse_pair(value) if (from_cli or not isinstance(value, str)) else None
        if parsed is not None:
            return parsed
    elif kind == "table":
        parsed = _parse_table(value) if (from_cli or isinstance(value, Mapping)) else None
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


def _path_candidates(value: str, base_dir: Path | None) -> list[Path]:
    """Relative paths are taken from the current directory, then from the TOML file's folder."""
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return [path]
    return [Path.cwd() / path] + ([base_dir / path] if base_dir is not None else [])


def _resolve_dir(value: str, key: str, where: str, base_dir: Path | None, problems: _Problems) -> Path | None:
    candidates = _path_candidates(value, base_dir)
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
    """Value checks that need no other key, done where the value is written (from each key's declaration)."""
    for name, v in values.items():
        wrong = ALL_KEYS[name][0].problem(name, v)
        if wrong:
            problems.add(where, wrong)


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


def _resolve_file(value: str, key: str, where: str, base_dir: Path | None, problems: _Problems) -> Path | None:
    candidates = _path_candidates(value, base_dir)
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    tried = " or ".join(str(c) for c in candidates)
    problems.add(where, f'{key} = "{value}": the file does not exist (looked for {tried})')
    return None


def _build_subset(merged: Mapping[str, Any], where: str, base_dir: Path | None, problems: _Problems,
                  enable_bucket: bool = False) -> SubsetConfig | None:
    ok = True
    paths: dict[str, Path] = {}
    preprocessor = merged.get("conditioning_preprocessor")
    required = [("image_dir", "the folder of training images")]
    if preprocessor is None or "conditioning_data_dir" in merged:
        required.append(("conditioning_data_dir", "the folder of conditioning images (required for ControlNet-LLLite; "
                                                  'or set conditioning_preprocessor = "canny" to make the guides from '
                                                  "the training images)"))
    for key, hint in required:
        if key not in merged:
            problems.add(where, f"{key} is missing: set {key} = \"...\" to {hint}")
            ok = False
            continue
        resolved = _resolve_dir(merged[key], key, where, base_dir, problems)
        if resolved is None:
            ok = False
        else:
            paths[key] = resolved
    if ok and paths["image_dir"] == paths.get("conditioning_data_dir"):
        problems.add(where, "image_dir and conditioning_data_dir are the same folder; keep the conditioning images in their "
                            'own folder (or drop conditioning_data_dir and set conditioning_preprocessor = "canny")')
        ok = False
    if "metadata_file" in merged:
        resolved = _resolve_file(merged["metadata_file"], "metadata_file", where, base_dir, problems)
        ok = ok and resolved is not None
        if resolved is not None:
            paths["metadata_file"] = resolved
    args = merged.get("conditioning_preprocessor_args", ())
    if preprocessor is None and args:
        problems.add(where, "conditioning_preprocessor_args is set but conditioning_preprocessor is not: name the "
                            f'preprocessor (one of {", ".join(conditioning_preprocessors.PREPROCESSORS)})')
        ok = False
    elif preprocessor in conditioning_preprocessors.PREPROCESSORS:
        try:
            args = tuple(sorted(conditioning_preprocessors.canonical_options(preprocessor, dict(args)).items()))
        except UserError as e:
            problems.add(where, f"conditioning_preprocessor_args: {e}")
            ok = False
    if merged.get("face_crop_aug_range") is not None and enable_bucket:
        problems.add(where, "face_crop_aug_range applies without bucketing only (as in sd-scripts): set "
                            "enable_bucket = false or drop face_crop_aug_range")
        ok = False
    if not ok:
        return None
    kwargs = {k: merged.get(k, SUBSET_KEYS[k][1]) for k in SUBSET_KEYS}
    kwargs.update(paths)
    kwargs["conditioning_preprocessor_args"] = args
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
        subsets.append(_build_subset(sub_merged, sub_where, base_dir, problems, enable_bucket=ds_values["enable_bucket"]))
    if any(s is None for s in subsets):
        return None
    return DatasetConfig(subsets=tuple(subsets), **ds_values)


def dataset_options_from_args(args: Any) -> dict[str, Any]:
    """The dataset options given on a command line (argparse Namespace or any object/mapping).

    Attributes that are missing or None count as "not given". Options named otherwise than their
    key (``CLI_ALIASES``) are renamed: ``train_batch_size`` becomes ``batch_size``, ``train_data_dir``
    ``image_dir``, ``in_json`` ``metadata_file``, ``dataset_repeats`` ``num_repeats`` and the
    misspelled ``caption_extention`` ``caption_extension``.
    """
    get = args.get if isinstance(args, Mapping) else (lambda name, default=None: getattr(args, name, default))
    out: dict[str, Any] = {}
    for name in [*ALL_KEYS, *CLI_ALIASES]:
        value = get(name, None)
        if value is None:
            continue
        key = CLI_ALIASES.get(name, name)
        if key in out and out[key] != value:
            raise UserError(f"--{name} {value} and --{key} {out[key]} set the same thing ({key}) to different values: "
                            "give one of them")
        out[key] = value
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
    cli = _cli_layer({k: v for k, v in (cli_defaults or {}).items() if k not in _FOLDER_KEYS}, problems)

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

    ``--conditioning_preprocessor`` may replace ``--conditioning_data_dir``. Every other dataset key
    may come from the same object (``--resolution``, ``--train_batch_size``, ``--caption_extension``,
    ``--enable_bucket``, ``--in_json``, ...).
    """
    options = dataset_options_from_args(args)
    problems = _Problems("given on the command line")
    if "image_dir" not in options:
        problems.add("command line", "--train_data_dir is required when no --dataset_config is given")
    if "conditioning_data_dir" not in options and "conditioning_preprocessor" not in options:
        problems.add("command line", "--conditioning_data_dir is required when no --dataset_config is given (or "
                                     "--conditioning_preprocessor, to make the guides from the training images)")
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
    given = [f"--{name}" for name in ("train_data_dir", "conditioning_data_dir", "in_json") if getattr(args, name, None) is not None]
    if given:
        raise UserError(
            f"{' and '.join(given)} cannot be combined with --dataset_config {dataset_config}: "
            "set image_dir, conditioning_data_dir and metadata_file in the dataset TOML's subsets, or drop --dataset_config"
        )
    return load_dataset_config(dataset_config, dataset_options_from_args(args))


# ---------------------------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class DatasetSourceOptions(Options):
    group = "dataset"

    dataset_config: str | None = option(help="dataset TOML (see docs/dataset.md)")


KEY_GROUPS = ("dataset", "captions", "images, guides and masks")


def key_label(name: str) -> str:
    """``--option`` of the dataset key ``name`` on the command line (messages take it from the declaration)."""
    spec = ALL_KEYS[name][0]
    if spec.option is None:
        raise KeyError(f"the dataset key {name} has no command-line option")
    return f"--{spec.option or name}"


def key_options() -> tuple[Option, ...]:
    """The dataset keys' command-line options, from their declarations: each, when given, is a default for
    every subset (``dataset_options_from_args``), checked as the key is."""
    kinds = {"int": {"type": int}, "float": {"type": float}, "resolution": {"joins_list": True},
             "pair": {"joins_list": True}, "table": {"nargs": "*"}}
    out = []
    for name, (spec, _) in {**SUBSET_KEYS, **DATASET_KEYS}.items():
        if spec.option is None:
            continue
        for option_name, help_text in ((spec.option or name, spec.help), *spec.alias):
            out.append(Option(name=option_name, help=help_text, group=spec.group, flag=spec.kind == "bool",
                              **kinds.get(spec.kind, {})))
    return tuple(sorted(out, key=lambda o: KEY_GROUPS.index(o.group)))


@dataclass(frozen=True)
class DataOptions(Options):
    """The checked dataset configs, how their captions are encoded and how batches are loaded."""

    group = "dataset"

    debug_dataset: bool = flag(help="save a few batches as images to check pairing, then exit")
    num_workers: int = option(8, name="max_data_loader_n_workers", type=int, limit=Limit(0),
                              help="data-loading worker processes, >= 0, at most the CPU count (0: load in the training process)")
    persistent_workers: bool = flag(name="persistent_data_loader_workers", help="keep workers alive between epochs")
    dataset_class: None = refused(
        "custom dataset classes are not supported: the dataset is built from folders. Use "
        "--train_data_dir with --conditioning_data_dir (or --conditioning_preprocessor), a dataset TOML "
        "(--dataset_config), or a metadata JSON (--in_json)")
    reg_data_dir: None = refused(
        "regularization images are a DreamBooth concept (keeping a class prior while a "
        "model learns a subject) that does not apply to LLLite training, which learns to follow a guide. "
        "Drop it; add more image/guide pairs as another [[datasets.subsets]] instead")
    prior_loss_weight: None = refused(
        "it weights the loss of regularization images, a DreamBooth concept that does "
        "not apply to LLLite training. Drop it (to weigh a dataset's samples, use network_multiplier)",
        type=float, reference_default=1.0)
    datasets: tuple[DatasetConfig, ...] = ()
    text_encoding: TextEncodingOptions = TextEncodingOptions()

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        return {**v, "text_encoding": TextEncodingOptions.from_args(args), "datasets": tuple(build_dataset_configs(args)),
                "num_workers": min(v["num_workers"], os.cpu_count() or 1)}  # as sd-scripts: never more workers than CPUs


# In --help order: the dataset group goes on with DataOptions' own options.
OPTIONS = (DatasetSourceOptions, *key_options(), DataOptions, TextEncodingOptions)
