"""Caching of VAE latents and text-encoder outputs for an ``LLLiteDataset``.

The encoders are passed in, so this module never loads a model:

* ``cache_latents(dataset, encode_fn, vae_id, ...)`` with
  ``encode_fn(images: Tensor[b,3,H,W] float32 in [-1,1]) -> Tensor[b,C,H/8,W/8]``
  (already scaled latents). ``vae_id`` identifies the VAE (the caller computes it, e.g. a
  hash of its weights or path and dtype).
* ``cache_text_encoder_outputs(dataset, encode_fn, te_id, ...)`` with
  ``encode_fn(captions: list[str]) -> (hidden Tensor[b,...], pooled Tensor[b,...])``.

Memory only (``to_disk=False``): every process encodes every item and keeps CPU tensors
(in ``dtype``). Identical work is shared: an image used twice with the same bucket, or one
caption used by many images, is encoded once.

On disk (``to_disk=True``), one safetensors file per image, next to the image:

* latents: ``<basename>_<W>x<H>_lllite.safetensors`` (W x H = bucket), tensors ``latents``
  and, with ``flip_aug``, ``latents_flipped``; with ``alpha_mask`` also ``alpha_mask`` (latent-sized
  loss weights) and with a ``conditioning_preprocessor`` ``guide`` (uint8, one channel when the
  guide is gray). If the same image at the same bucket is used with another resize filter or
  preprocessor (another subset), that one uses ``<basename>_<W>x<H>_lllite_<8 hex digits>.safetensors``;
* text-encoder outputs: ``<basename>_lllite_te.safetensors`` (tensors ``hidden`` and
  ``pooled``); if the same image gets several different captions (several subsets), the
  other captions use ``<basename>_lllite_te_<8 hex digits of the caption hash>.safetensors``.

The metadata of each file holds what the tensors depend on: a format and pipeline version,
the SHA-256 of the image file, bucket, resized size, crop, resize filter, stored orientations and
the ``vae_id`` (latents), whether a mask is stored, the preprocessor with its options and the
SHA-256 of the conditioning image it reads (guides), or the exact caption and the ``te_id`` (text),
and the dtype. A file whose metadata does not match is re-encoded and replaced (atomically), never
reused; when only the mask or guide part is out of date, the stored latents are kept and only that
part is made again. ``skip_check`` (``--skip_cache_check``) trusts the image files: a latent file
whose metadata matches in everything else is used without hashing the images it was made from. With
several processes, process r encodes and writes only the files k with
``k % num_processes == r``, then ``wait_for_everyone()`` and every process reads the files
(lazily, per batch). No two processes write the same file.

Options that make a cache wrong are refused up front by ``validate_caching_options``:
``random_crop``, ``color_aug`` and ``face_crop_aug_range`` with latent caching, and the caption
options that change a caption from epoch to epoch with text-encoder caching.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from library.atomic_io import atomic_path
from library.cli import Limit, Options, flag, option
from library.data.captions import dynamic_caption_options
from library.data.dataset_config import DatasetConfig
from library.data.dataset import (
    ImageItem,
    LLLiteDataset,
    conditioning_interpolation,
    crop_and_flip,
    image_interpolation,
    latent_mask,
    load_training_image,
    make_guide,
    open_alpha,
    static_caption,
)
from library.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")  # one cache file to fill: a latent target, or (path, caption)

LATENT_FORMAT = "lllite-latents-2"
TEXT_FORMAT = "lllite-text-encoder-1"
# Bump when resizing/cropping changes, so that old latent files are re-encoded.
PIPELINE_VERSION = "1"

LatentEncodeFn = Callable[[torch.Tensor], torch.Tensor]
TextEncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def _no_wait() -> None:
    return None


@dataclass(frozen=True)
class Processes:
    """Who this process is among the training processes, for sharing the disk cache work."""

    index: int = 0
    count: int = 1
    wait_for_everyone: Callable[[], None] = _no_wait
    show_progress: bool = True


SINGLE_PROCESS = Processes()


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class CachingOptions(Options):
    group = "caching"

    latents: bool = flag(name="cache_latents", help="encode every image with the VAE once, before training")
    latents_to_disk: bool = flag(
        name="cache_latents_to_disk",
        help="keep the latent cache on disk beside the images (reused across runs; implies --cache_latents)")
    vae_batch_size: int = option(1, type=int, limit=Limit(1), help="images per VAE call while caching, >= 1")
    text: bool = flag(name="cache_text_encoder_outputs", help="encode every caption once, before training")
    text_to_disk: bool = flag(
        name="cache_text_encoder_outputs_to_disk",
        help="keep the text-encoder cache on disk (reused across runs; implies --cache_text_encoder_outputs)")
    skip_check: bool = flag(
        name="skip_cache_check",
        help="trust existing latent cache files without hashing the images they were made from: a file "
             "whose recorded settings (bucket, crop, resize filter, VAE, dtype, flips, mask, preprocessor) "
             "match is used even if an image changed since (a faster start on large datasets). Missing or "
             "mismatched files are still made. sd-scripts skips its own content checks likewise")

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        return {**v, "latents": v["latents"] or v["latents_to_disk"], "text": v["text"] or v["text_to_disk"]}


OPTIONS = (CachingOptions,)


# ----------------------------------------------------------------------------- checks


def validate_caching_options(
    configs: Sequence[DatasetConfig], *, cache_latents: bool = False, cache_text_encoder_outputs: bool = False
) -> None:
    """Refuse caching combined with options whose output changes every epoch (call it before loading models)."""
    problems = []
    for i, ds in enumerate(configs):
        for j, sub in enumerate(ds.subsets):
            where = f"datasets[{i}].subsets[{j}] (image_dir {sub.image_dir})"
            if cache_latents:
                pixel_opts = [name for name in ("random_crop", "color_aug", "face_crop_aug_range") if getattr(sub, name)]
                if pixel_opts:
                    problems.append(
                        f"{where}: cache_latents cannot be combined with {' and '.join(pixel_opts)}: a latent cache "
                        "holds one encoding per image, so every epoch would see the same crop and colors. "
                        f"Turn off {' and '.join(pixel_opts)}, or turn off cache_latents."
                    )
            if cache_text_encoder_outputs:
                dyn = dynamic_caption_options(sub)
                if dyn:
                    problems.append(
                        f"{where}: cache_text_encoder_outputs cannot be combined with {', '.join(dyn)}: the text "
                        "encoder outputs are cached once per caption, but these options change the caption every "
                        f"epoch. Turn off {', '.join(dyn)}, or turn off cache_text_encoder_outputs."
                    )
    if problems:
        raise UserError("\n".join(problems))


def _check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string identifying the encoder, got {value!r}")


def _read_metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # missing, truncated or foreign file: treated as "no valid cache"
        return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path, "the cache file") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- latents

# Metadata keys that say whether a file's mask and guide are current (the rest is about its latents).
_EXTRA_KEYS = ("alpha_mask", "guide", "guide_source_sha256", "guide_interpolation")
# Keys that tie a file to the bytes of the images it was made from (trusted with skip_check).
_HASH_KEYS = ("image_sha256", "guide_source_sha256")


def latent_cache_path(item: ImageItem, variant: str = "") -> Path:
    bw, bh = item.bucket
    suffix = f"_{variant}" if variant else ""
    return item.image_path.with_name(f"{item.image_path.stem}_{bw}x{bh}_lllite{suffix}.safetensors")


def guide_spec(item: ImageItem) -> str:
    """The preprocessor and its options as stored in the metadata ("" without a preprocessor)."""
    sub = item.subset
    if not sub.conditioning_preprocessor:
        return ""
    return json.dumps([sub.conditioning_preprocessor, sub.preprocessor_options], sort_keys=True)


@dataclass
class _LatentTarget:
    """One cache entry: an image at one bucket, used by one or more dataset items."""

    path: Path
    item: ImageItem
    flips: set[bool] = field(default_factory=set)
    alpha: bool = False
    item_indices: list[int] = field(default_factory=list)

    def metadata(self, image_sha: str, guide_sha: str, vae_id: str, dtype: torch.dtype) -> dict[str, str]:
        top, left = self.item.center_crop
        guide = guide_spec(self.item)
        from_conditioning = bool(guide) and self.item.conditioning_path is not None
        return {
            "format": LATENT_FORMAT,
            "pipeline": PIPELINE_VERSION,
            "vae_id": vae_id,
            "image_sha256": image_sha,
            "bucket": "{}x{}".format(*self.item.bucket),
            "resized": "{}x{}".format(*self.item.resized),
            "crop_top_left": f"{top},{left}",
            "interpolation": image_interpolation(self.item.subset),
            "flips": ",".join(str(int(f)) for f in sorted(self.flips)),
            "dtype": _dtype_name(dtype),
            "alpha_mask": str(int(self.alpha)),
            "guide": guide,
            "guide_source_sha256": guide_sha if from_conditioning else "",
            "guide_interpolation": conditioning_interpolation(self.item.subset) if from_conditioning else "",
        }

    def extras(self) -> dict[str, torch.Tensor]:
        """The mask and guide of this entry, for the centre crop (unflipped)."""
        item = self.item
        out: dict[str, torch.Tensor] = {}
        if self.alpha:
            alpha = crop_and_flip(open_alpha(item.image_path), item.resized, item.bucket, item.center_crop, False,
                                  image_interpolation(item.subset))
            out["alpha_mask"] = latent_mask(alpha)
        if item.subset.conditioning_preprocessor:
            guide = torch.from_numpy(make_guide(item, item.resized, item.center_crop)).permute(2, 0, 1).contiguous()
            # Canny, lineart and gray guides are gray: one channel is a third of the size.
            out["guide"] = guide[:1].clone() if bool((guide == guide[:1]).all()) else guide
        return out


def _target_key(item: ImageItem) -> tuple:
    """What makes two items need different tensors for the same image and bucket."""
    source = item.conditioning_path if item.subset.conditioning_preprocessor else None
    return (image_interpolation(item.subset), guide_spec(item), source, conditioning_interpolation(item.subset))


def _latent_targets(dataset: LLLiteDataset) -> list[_LatentTarget]:
    targets: dict[tuple, _LatentTarget] = {}
    first_key: dict[Path, tuple] = {}
    for item in dataset.items:
        key = _target_key(item)
        plain = latent_cache_path(item)
        first = first_key.setdefault(plain, key)
        variant = "" if key == first else hashlib.sha256(repr(key).encode()).hexdigest()[:8]
        path = latent_cache_path(item, variant)
        target = targets.setdefault((path, key), _LatentTarget(path, item))
        target.flips.update({False, True} if item.subset.flip_aug else {False})
        target.alpha = target.alpha or item.subset.alpha_mask
        target.item_indices.append(item.index)
    return list(targets.values())


def _latent_file_state(target: _LatentTarget, expected: dict[str, str]) -> str:
    """"ok", "extras" (latents current, mask or guide not) or "stale" (make everything)."""
    meta = _read_metadata(target.path)
    if meta is None:
        return "stale"
    stored_flips = set(meta.get("flips", "").split(","))
    latents_same = all(meta.get(k) == v for k, v in expected.items() if k != "flips" and k not in _EXTRA_KEYS)
    if not (latents_same and {str(int(f)) for f in target.flips} <= stored_flips):
        return "stale"
    return "ok" if all(meta.get(k) == v for k, v in expected.items() if k in _EXTRA_KEYS) else "extras"


def _latent_key(flipped: bool) -> str:
    return "latents_flipped" if flipped else "latents"


def _guide_rgb(guide: torch.Tensor) -> torch.Tensor:
    return guide.expand(3, -1, -1) if guide.shape[0] == 1 else guide


class MemoryLatents:
    """In-memory latents: ``tensors[item_index][flipped]``, with masks and guides by item."""

    def __init__(self) -> None:
        self.tensors: dict[int, dict[bool, torch.Tensor]] = {}
        self.extras: dict[int, dict[str, torch.Tensor]] = {}

    def get_latents(self, item_index: int, flipped: bool) -> torch.Tensor:
        return self.tensors[item_index][flipped]

    def get_alpha_mask(self, item_index: int) -> torch.Tensor:
        return self.extras[item_index]["alpha_mask"]

    def get_guide(self, item_index: int) -> torch.Tensor:
        return _guide_rgb(self.extras[item_index]["guide"])


class DiskLatents:
    """Latents (and masks and guides) read from their cache file when a batch needs them."""

    def __init__(self, paths: dict[int, Path]) -> None:
        self.paths = paths

    def _get(self, item_index: int, name: str) -> torch.Tensor:
        with safe_open(str(self.paths[item_index]), framework="pt") as f:
            return f.get_tensor(name)

    def get_latents(self, item_index: int, flipped: bool) -> torch.Tensor:
        return self._get(item_index, _latent_key(flipped))

    def get_alpha_mask(self, item_index: int) -> torch.Tensor:
        return self._get(item_index, "alpha_mask")

    def get_guide(self, item_index: int) -> torch.Tensor:
        return _guide_rgb(self._get(item_index, "guide"))


def _encode_latents(
    jobs: list[tuple[_LatentTarget, bool]],
    encode_fn: LatentEncodeFn,
    batch_size: int,
    dtype: torch.dtype,
    on_done: Callable[[_LatentTarget, dict[bool, torch.Tensor]], None],
    show_progress: bool,
) -> None:
    """Encode (target, flipped) jobs in VAE batches of one bucket; call ``on_done`` per finished target."""
    jobs = sorted(jobs, key=lambda j: (j[0].item.bucket, str(j[0].path), j[1]))
    pending: dict[Path, dict[bool, torch.Tensor]] = {}
    with tqdm(total=len(jobs), desc="caching latents", disable=not show_progress) as bar:
        start = 0
        while start < len(jobs):
            bucket = jobs[start][0].item.bucket
            end = start
            while end < len(jobs) and end - start < batch_size and jobs[end][0].item.bucket == bucket:
                end += 1
            chunk = jobs[start:end]
            images = torch.stack([load_training_image(t.item, flipped) for t, flipped in chunk])
            with torch.no_grad():
                latents = encode_fn(images)
            _check_latent_shape(latents, images)
            latents = latents.detach().to("cpu", dtype)
            for k, (target, flipped) in enumerate(chunk):
                done = pending.setdefault(target.path, {})
                done[flipped] = latents[k].clone()
                if len(done) == len(target.flips):
                    on_done(target, pending.pop(target.path))
            bar.update(len(chunk))
            start = end


def _check_latent_shape(latents: torch.Tensor, images: torch.Tensor) -> None:
    b, _, h, w = images.shape
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] != b or tuple(latents.shape[2:]) != (h // 8, w // 8):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"the latent encode_fn returned {got} for images of shape {tuple(images.shape)}; expected ({b}, C, {h // 8}, {w // 8})")


def _fill_disk_cache(what: str, targets: list[T], state: Callable[[T], str], encode: Callable[[list[T]], None],
                     processes: Processes, *, path_of: Callable[[T], Path],
                     redo: tuple[Callable[[list[T]], None], str] | None = None) -> None:
    """The skeleton both disk caches share: each process checks and fills its share of the files (``state``: ok,
    stale, or extras, whose tensors are kept and the rest ``redo``ne), all wait, then every file is checked again,
    so that another process's failure is reported here too."""
    mine = [t for k, t in enumerate(targets) if k % processes.count == processes.index]
    states = [state(t) for t in mine]
    todo = [t for t, s in zip(mine, states) if s == "stale"]
    again = [t for t, s in zip(mine, states) if s == "extras"]
    up_to_date = len(mine) - len(todo) - len(again)
    if redo is None:
        logger.info("%s: %d of %d files up to date, %d to encode", what, up_to_date, len(mine), len(todo))
    else:
        logger.info("%s: %d of %d files up to date, %d to encode, %d %s", what, up_to_date, len(mine), len(todo),
                    len(again), redo[1])
    encode(todo)
    if redo is not None:
        redo[0](again)
    processes.wait_for_everyone()
    bad = [str(path_of(t)) for t in targets if state(t) != "ok"]
    if bad:
        raise UserError(f"{len(bad)} {what} file(s) are missing or out of date after caching (did another process "
                        "fail?): " + ", ".join(bad[:10]))


def cache_latents(
    dataset: LLLiteDataset,
    encode_fn: LatentEncodeFn,
    vae_id: str,
    *,
    to_disk: bool = False,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    processes: Processes = SINGLE_PROCESS,
    skip_check: bool = False,
) -> None:
    """Encode every training image once (both orientations with flip_aug) and attach the cache to ``dataset``.

    The cache also holds the alpha masks and preprocessor guides of the subsets that use them. After
    this, batches carry ``latents`` instead of ``images``. ``skip_check``: see the module docstring.
    """
    _check_id("vae_id", vae_id)
    validate_caching_options(dataset.configs, cache_latents=True)
    batch_size = max(1, int(batch_size))
    targets = _latent_targets(dataset)

    if not to_disk:
        cache = MemoryLatents()

        def keep(target: _LatentTarget, tensors: dict[bool, torch.Tensor]) -> None:
            extras = target.extras()
            for index in target.item_indices:
                cache.tensors[index] = tensors
                cache.extras[index] = extras

        jobs = [(t, f) for t in targets for f in sorted(t.flips)]
        _encode_latents(jobs, encode_fn, batch_size, dtype, keep, processes.show_progress)
        dataset.attach_latent_cache(cache)
        return

    shas: dict[Path, str] = {}

    def sha(path: Path | None) -> str:
        if path is None:
            return ""
        if path not in shas:
            shas[path] = _sha256(path)
        return shas[path]

    def full_metadata(target: _LatentTarget) -> dict[str, str]:
        guide_source = target.item.conditioning_path if target.item.subset.conditioning_preprocessor else None
        return target.metadata(sha(target.item.image_path), sha(guide_source), vae_id, dtype)

    def state(target: _LatentTarget) -> str:
        if not skip_check:
            return _latent_file_state(target, full_metadata(target))
        # Every recorded setting must match; the image hashes are trusted, so no image is read.
        expected = {k: v for k, v in target.metadata("", "", vae_id, dtype).items() if k not in _HASH_KEYS}
        return _latent_file_state(target, expected)

    def write(target: _LatentTarget, tensors: dict[bool, torch.Tensor]) -> None:
        _write(target.path, {**{_latent_key(f): t for f, t in tensors.items()}, **target.extras()}, full_metadata(target))

    def encode(todo: list[_LatentTarget]) -> None:
        _encode_latents([(t, f) for t in todo for f in sorted(t.flips)], encode_fn, batch_size, dtype, write,
                        processes.show_progress)

    def redo_extras(targets: list[_LatentTarget]) -> None:
        for target in targets:
            with safe_open(str(target.path), framework="pt") as f:
                stored = {f_: f.get_tensor(_latent_key(f_)) for f_ in target.flips}
            write(target, stored)

    _fill_disk_cache("latent cache", targets, state, encode, processes, path_of=lambda t: t.path,
                     redo=(redo_extras, "with a mask or guide to redo"))
    dataset.attach_latent_cache(DiskLatents({i: t.path for t in targets for i in t.item_indices}))


# ----------------------------------------------------------------------------- text encoder


def text_cache_path(item: ImageItem, caption: str, primary: bool = True) -> Path:
    """The text cache file of an image; ``primary=False`` for an extra caption of the same image."""
    stem = item.image_path.stem
    if primary:
        return item.image_path.with_name(f"{stem}_lllite_te.safetensors")
    digest = hashlib.sha256(caption.encode("utf-8")).hexdigest()[:8]
    return item.image_path.with_name(f"{stem}_lllite_te_{digest}.safetensors")


class MemoryTexts:
    """In-memory text-encoder outputs, shared between items with the same caption."""

    def __init__(self) -> None:
        self.by_caption: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.caption_of: dict[int, str] = {}

    def get_text_outputs(self, item_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.by_caption[self.caption_of[item_index]]


class DiskTexts:
    """Text-encoder outputs read from their cache file when a batch needs them."""

    def __init__(self, paths: dict[int, Path]) -> None:
        self.paths = paths

    def get_text_outputs(self, item_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(str(self.paths[item_index]), framework="pt") as f:
            return f.get_tensor("hidden"), f.get_tensor("pooled")


def _encode_texts(
    captions: list[str], encode_fn: TextEncodeFn, batch_size: int, dtype: torch.dtype, show_progress: bool
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    for start in tqdm(range(0, len(captions), batch_size), desc="caching text encoder outputs", disable=not show_progress):
        chunk = captions[start : start + batch_size]
        with torch.no_grad():
            out = encode_fn(chunk)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) and t.shape[0] == len(chunk) for t in out)):
            raise ValueError(f"the text encode_fn must return (hidden, pooled) tensors with batch size {len(chunk)}")
        hidden, pooled = (t.detach().to("cpu", dtype) for t in out)
        for k, caption in enumerate(chunk):
            yield caption, hidden[k].clone(), pooled[k].clone()


def _text_targets(dataset: LLLiteDataset) -> dict[Path, tuple[str, list[int]]]:
    """Cache file -> (caption, item indices); an image with several captions gets several files."""
    targets: dict[Path, tuple[str, list[int]]] = {}
    primary_caption: dict[Path, str] = {}
    for item in dataset.items:
        caption = static_caption(item)
        first = primary_caption.setdefault(item.image_path, caption)
        path = text_cache_path(item, caption, primary=caption == first)
        targets.setdefault(path, (caption, []))[1].append(item.index)
    return targets


def cache_text_encoder_outputs(
    dataset: LLLiteDataset,
    encode_fn: TextEncodeFn,
    te_id: str,
    *,
    to_disk: bool = False,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    processes: Processes = SINGLE_PROCESS,
) -> None:
    """Encode every caption once and attach the cache; batches then carry ``text_hidden``/``text_pooled``."""
    _check_id("te_id", te_id)
    validate_caching_options(dataset.configs, cache_text_encoder_outputs=True)
    batch_size = max(1, int(batch_size))

    if not to_disk:
        cache = MemoryTexts()
        for item in dataset.items:
            cache.caption_of[item.index] = static_caption(item)
        unique = list(dict.fromkeys(cache.caption_of.values()))
        for caption, hidden, pooled in _encode_texts(unique, encode_fn, batch_size, dtype, processes.show_progress):
            cache.by_caption[caption] = (hidden, pooled)
        dataset.attach_text_cache(cache)
        return

    def expected(caption: str) -> dict[str, str]:
        return {"format": TEXT_FORMAT, "te_id": te_id, "caption": caption, "dtype": _dtype_name(dtype)}

    def valid(path: Path, caption: str) -> bool:
        meta = _read_metadata(path)
        return meta is not None and all(meta.get(k) == v for k, v in expected(caption).items())

    def encode(todo: list[tuple[Path, str]]) -> None:
        paths_of: dict[str, list[Path]] = {}
        for path, caption in todo:
            paths_of.setdefault(caption, []).append(path)
        for caption, hidden, pooled in _encode_texts(list(paths_of), encode_fn, batch_size, dtype, processes.show_progress):
            for path in paths_of[caption]:
                _write(path, {"hidden": hidden, "pooled": pooled}, expected(caption))

    targets = _text_targets(dataset)
    _fill_disk_cache("text encoder cache", [(p, c) for p, (c, _) in targets.items()],
                     lambda t: "ok" if valid(*t) else "stale", encode, processes, path_of=lambda t: t[0])
    dataset.attach_text_cache(DiskTexts({i: p for p, (_, indices) in targets.items() for i in indices}))
