"""Captions: read them from disk and apply the per-epoch caption options.

Order of operations in ``process_caption`` (one call per sample and epoch):

1. ``caption_dropout_every_n_epochs = n``: on epochs n, 2n, ... (epochs count from 1) the
   caption is the empty string.
2. ``caption_dropout_rate``: with this probability the caption is the empty string.
3. The caption is split on ``caption_separator`` into tags (stripped, empty ones dropped).
   The fixed tags stay where they are: the first ``keep_tokens`` tags, or, when
   ``keep_tokens_separator`` is set and occurs in the caption, everything before it (and,
   if it occurs a second time, everything after that second occurrence).
4. ``caption_tag_dropout_rate``: each other tag is dropped with this probability.
5. ``shuffle_caption``: the other tags are shuffled.
6. ``caption_prefix`` and ``caption_suffix`` are added (never shuffled or dropped, not
   counted in ``keep_tokens``).

Tags are joined with the separator followed by a space (``", "`` for the default ``","``).
A caption that needs none of steps 3-5 is kept as written. Randomness comes only from the
``numpy.random.Generator`` passed in, so a seeded generator gives reproducible captions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)


class CaptionOptions(Protocol):
    """The caption keys of a subset (``SubsetConfig`` has them all)."""

    caption_extension: str
    shuffle_caption: bool
    caption_separator: str
    keep_tokens: int
    keep_tokens_separator: str
    caption_prefix: str
    caption_suffix: str
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float


def caption_path(image_path: Path, caption_extension: str) -> Path:
    """``<folder>/<basename><caption_extension>`` for an image."""
    return image_path.with_name(image_path.stem + caption_extension)


def read_caption(image_path: Path, caption_extension: str) -> str | None:
    """The caption text of an image, or None when the caption file is missing.

    Non-empty lines are joined with a space, so a caption file may be wrapped.
    """
    path = caption_path(image_path, caption_extension)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def dynamic_caption_options(opts: CaptionOptions) -> list[str]:
    """Names of the set options that make a caption change from epoch to epoch.

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
    return names


def _joiner(separator: str) -> str:
    return separator if separator.endswith(" ") else separator + " "


def _clean_affix(text: str, separator: str) -> str:
    """A prefix/suffix without surrounding separators: they are added by the join."""
    mark = separator.strip() or separator
    return text.strip().strip(mark).strip()


def _split(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def process_caption(caption: str, opts: CaptionOptions, rng: np.random.Generator, epoch: int = 1) -> str:
    """The caption a sample gets this epoch (see the module docstring for the rules)."""
    every = opts.caption_dropout_every_n_epochs
    if every > 0 and epoch > 0 and epoch % every == 0:
        return ""
    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return ""

    sep = opts.caption_separator
    kts = opts.keep_tokens_separator
    tokenwise = opts.shuffle_caption or opts.caption_tag_dropout_rate > 0
    if kts and kts in caption:
        head_text, rest = caption.split(kts, 1)
        body_text, _, tail_text = rest.partition(kts)
        head, body, tail = _split(head_text, sep), _split(body_text, sep), _split(tail_text, sep)
    elif tokenwise:
        tags = _split(caption, sep)
        head, body, tail = tags[: opts.keep_tokens], tags[opts.keep_tokens :], []
    else:
        head, body, tail = [caption.strip()] if caption.strip() else [], [], []

    if opts.caption_tag_dropout_rate > 0:
        body = [t for t in body if rng.random() >= opts.caption_tag_dropout_rate]
    if opts.shuffle_caption and len(body) > 1:
        body = [body[i] for i in rng.permutation(len(body))]

    parts = [_clean_affix(opts.caption_prefix, sep), *head, *body, *tail, _clean_affix(opts.caption_suffix, sep)]
    return _joiner(sep).join(p for p in parts if p)
