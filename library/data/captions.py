"""Captions: read them from disk or a metadata JSON and apply the per-epoch caption options.

Order of operations in ``process_caption`` (one call per sample and epoch):

1. ``caption_dropout_every_n_epochs = n``: on epochs n, 2n, ... (epochs count from 1) the
   caption is the empty string.
2. ``caption_dropout_rate``: with this probability the caption is the empty string.
3. Lines: a caption file may hold several lines. With ``enable_wildcard`` each line is an
   alternative caption and one is picked at random, then every ``{a|b|c}`` is replaced by one of
   its choices (``{{`` and ``}}`` are literal braces). Without it the lines are joined with a space.
4. The caption is split on ``caption_separator`` into tags (stripped, empty ones dropped).
   The fixed tags stay where they are: the first ``keep_tokens`` tags, or, when
   ``keep_tokens_separator`` is set and occurs in the caption, everything before it (and,
   if it occurs a second time, everything after that second occurrence).
5. ``token_warmup_step``: before that training step only the first tags are used, from
   ``token_warmup_min`` at step 0 rising linearly to all of them (a value below 1 is a fraction
   of the run's steps).
6. ``caption_tag_dropout_rate``: each other tag is dropped with this probability.
7. ``shuffle_caption``: the other tags are shuffled.
8. ``caption_prefix`` and ``caption_suffix`` are added (never shuffled or dropped, not
   counted in ``keep_tokens``).
9. ``secondary_separator``: replaced by the caption separator, so tags joined by it move and drop
   together as one tag.

Tags are joined with the separator followed by a space (``", "`` for the default ``","``).
A caption that needs none of steps 4-7 is kept as written. Randomness comes only from the
``numpy.random.Generator`` passed in, so a seeded generator gives reproducible captions.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from library.errors import UserError

logger = logging.getLogger(__name__)

# Private-use characters stand in for escaped braces while wildcards are expanded.
_OPEN, _CLOSE = "\ue000", "\ue001"
_WILDCARD = re.compile(r"\{([^{}]*)\}")


class CaptionOptions(Protocol):
    """The caption keys of a subset (``SubsetConfig`` has them all)."""

    caption_extension: str
    shuffle_caption: bool
    caption_separator: str
    keep_tokens: int
    keep_tokens_separator: str
    secondary_separator: str
    enable_wildcard: bool
    caption_prefix: str
    caption_suffix: str
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float
    token_warmup_min: int
    token_warmup_step: float


def caption_path(image_path: Path, caption_extension: str) -> Path:
    """``<folder>/<basename><caption_extension>`` for an image."""
    return image_path.with_name(image_path.stem + caption_extension)


def face_info_from_name(image_path: Path) -> tuple[int, int, int, int] | None:
    """The face box ``(center_x, center_y, width, height)`` of a ``name_cx_cy_w_h.png`` file, or None.

    This is the naming of sd-scripts' face crop tool: the last four ``_``-separated fields of the
    basename are integers, and a face is present when ``center_x > 0``.
    """
    fields = image_path.stem.split("_")
    if len(fields) < 5 or not all(f.isdigit() for f in fields[-4:]):
        return None
    cx, cy, w, h = (int(f) for f in fields[-4:])
    return (cx, cy, w, h) if cx > 0 and max(w, h) > 0 else None


def read_caption(image_path: Path, caption_extension: str, face_name_fallback: bool = False) -> str | None:
    """The caption text of an image, or None when the caption file is missing.

    Non-empty lines are kept (stripped) and joined with a newline; ``process_caption`` joins them
    with a space, or picks one with ``enable_wildcard``. With ``face_name_fallback`` an image named
    ``name_cx_cy_w_h.png`` without its own caption file uses ``name<caption_extension>``.
    """
    path = caption_path(image_path, caption_extension)
    if not path.is_file() and face_name_fallback and face_info_from_name(image_path) is not None:
        path = image_path.with_name("_".join(image_path.stem.split("_")[:-4]) + caption_extension)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def dynamic_caption_options(opts: CaptionOptions) -> list[str]:
    """Names of the set options that make a caption change from epoch to epoch (or step to step).

    A text-encoder output cache is only correct when this list is empty.
    """
    names = []
    if opts.shuffle_caption:
        names.append("shuffle_caption")
    if opts.caption_dropout_rate > 0:
        names.append("caption_dropout_rate")
    if opts.caption_tag_dropout_rate > 0:
        names.append("caption_tag_dropout_rate")
    if opts.caption_dropout_every_n_epochs > 0:
        names.append("caption_dropout_every_n_epochs")
    if opts.token_warmup_step > 0:
        names.append("token_warmup_step")
    if opts.enable_wildcard:
        names.append("enable_wildcard")
    return names


def warmup_steps(opts: CaptionOptions, max_train_steps: int | None) -> float:
    """The step at which token warmup ends: ``token_warmup_step``, or that fraction of the run when below 1.

    0 means no warmup (also for a fraction when the run's length is not known).
    """
    step = opts.token_warmup_step
    if 0 < step < 1:
        return math.floor(step * max_train_steps) if max_train_steps else 0
    return step


# ----------------------------------------------------------------------------- metadata JSON


def read_metadata_file(path: Path) -> dict[str, dict[str, Any]]:
    """A fine-tuning metadata file as ``{image key: {"caption": ..., "tags": ...}}``.

    ``.json``: sd-scripts' metadata (``merge_captions_to_metadata.py`` and ``merge_dd_tags_to_metadata.py``
    write it): an object whose keys are image paths (absolute, or relative to ``image_dir``, with or
    without extension) and whose values hold ``caption`` and/or ``tags``. ``.jsonl``: one object per
    line with ``image_path``, ``caption`` and/or ``tags``. Other fields (``image_size``, ...) are ignored.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            entries: dict[str, dict[str, Any]] = {}
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
                    raise UserError(f"metadata file {path} line {number}: each line must be an object with an "
                                    '"image_path" string (and "caption" and/or "tags")')
                entries[row["image_path"]] = row
            data: Any = entries
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"metadata file {path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read metadata file {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f'metadata file {path} must map each image to an object with "caption" and/or "tags" '
                        '(as sd-scripts\' merge_captions_to_metadata.py writes it)')
    for key, entry in data.items():
        for field in ("caption", "tags"):
            if entry.get(field) is not None and not isinstance(entry[field], str):
                raise UserError(f'metadata file {path}: "{field}" of {key} must be a string, got {entry[field]!r}')
    return data


def metadata_caption(entry: dict[str, Any], separator: str, enable_wildcard: bool) -> str:
    """The caption of a metadata entry: its caption, then its tags after the separator.

    With ``enable_wildcard`` the tags (one line) are added to every line of the caption, so each
    alternative caption keeps them, as in sd-scripts.
    """
    caption = (entry.get("caption") or "").strip()
    tags = (entry.get("tags") or "").strip()
    if not tags:
        return caption
    if enable_wildcard:
        tags = tags.replace("\n", separator)
        lines = [line.strip() for line in caption.split("\n") if line.strip()] or [""]
        return "\n".join(f"{line}{separator}{tags}" if line else tags for line in lines)
    return f"{caption}{separator}{tags}" if caption else tags


# ----------------------------------------------------------------------------- processing


def _joiner(separator: str) -> str:
    return separator if separator.endswith(" ") else separator + " "


def _clean_affix(text: str, separator: str) -> str:
    """A prefix/suffix without surrounding separators: they are added by the join."""
    mark = separator.strip() or separator
    return text.strip().strip(mark).strip()


def _split(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def expand_wildcards(text: str, rng: np.random.Generator) -> str:
    """Replace every ``{a|b|c}`` with one of its choices; ``{{``/``}}`` stand for literal braces."""
    text = text.replace("{{", _OPEN).replace("}}", _CLOSE)

    def choose(match: re.Match) -> str:
        choices = match.group(1).split("|")
        return choices[int(rng.integers(len(choices)))]

    return _WILDCARD.sub(choose, text).replace(_OPEN, "{").replace(_CLOSE, "}")


def _pick_text(caption: str, opts: CaptionOptions, rng: np.random.Generator) -> str:
    if not opts.enable_wildcard:
        return " ".join(caption.split("\n"))
    lines = caption.split("\n")
    line = lines[int(rng.integers(len(lines)))] if len(lines) > 1 else lines[0]
    return expand_wildcards(line, rng)


def process_caption(caption: str, opts: CaptionOptions, rng: np.random.Generator, epoch: int = 1, *,
                    step: int | None = None, max_train_steps: int | None = None) -> str:
    """The caption a sample gets this epoch (see the module docstring for the rules).

    ``step`` is the training step the sample is trained at (from 0) and ``max_train_steps`` the
    run's length; both only matter for ``token_warmup_step`` (no step: no warmup).
    """
    every = opts.caption_dropout_every_n_epochs
    if every > 0 and epoch > 0 and epoch % every == 0:
        return ""
    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return ""
    caption = _pick_text(caption, opts, rng)

    sep = opts.caption_separator
    kts = opts.keep_tokens_separator
    warmup = warmup_steps(opts, max_train_steps) if step is not None else 0
    tokenwise = opts.shuffle_caption or opts.caption_tag_dropout_rate > 0 or opts.token_warmup_step > 0
    if kts and kts in caption:
        head_text, rest = caption.split(kts, 1)
        body_text, _, tail_text = rest.partition(kts)
        head, body, tail = _split(head_text, sep), _split(body_text, sep), _split(tail_text, sep)
    elif tokenwise:
        tags = _split(caption, sep)
        head, body, tail = tags[: opts.keep_tokens], tags[opts.keep_tokens :], []
    else:
        head, body, tail = [caption.strip()] if caption.strip() else [], [], []

    if warmup and step < warmup:
        # sd-scripts' formula: the first tags, from token_warmup_min at step 0 to all of them at the end.
        count = math.floor(step * (len(body) - opts.token_warmup_min) / warmup) + opts.token_warmup_min
        body = body[: max(0, count)]
    if opts.caption_tag_dropout_rate > 0:
        body = [t for t in body if rng.random() >= opts.caption_tag_dropout_rate]
    if opts.shuffle_caption and len(body) > 1:
        body = [body[i] for i in rng.permutation(len(body))]

    parts = [_clean_affix(opts.caption_prefix, sep), *head, *body, *tail, _clean_affix(opts.caption_suffix, sep)]
    text = _joiner(sep).join(p for p in parts if p)
    if opts.secondary_separator:
        text = text.replace(opts.secondary_separator, _joiner(sep))
    return text
