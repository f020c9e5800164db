"""The training dataset: paired images and conditioning images, served one bucket-batch at a time.

Contract
--------
``LLLiteDataset(configs, seed)`` scans every subset up front (pairing, image checks,
captions, bucket assignment) and raises one ``UserError`` listing every problem, so
training never stops mid-epoch because of one file.

Each item of the dataset is ONE BATCH whose samples all come from one bucket of one
dataset. ``len(dataset)`` is the number of batches per epoch (the same for every epoch).
Use ``create_dataloader(dataset, num_workers=...)``, which is
``DataLoader(dataset, batch_size=1, sampler=EpochSampler(dataset), collate_fn=unwrap_batch)``:
the sampler hands ``(epoch, batch_index)`` to the workers, so ``set_epoch`` works with
persistent workers too. ``dataset[i]`` alone uses the epoch of the last ``set_epoch``.

Call ``dataset.set_epoch(epoch)`` before each epoch (epochs count from 1). The batch
order, the samples of each batch and every random choice (flip, crop, caption options,
color augmentation) are drawn from generators seeded with ``(seed, epoch, ...)``, so a run
is reproducible for a seed and differs for another seed.

A batch is a dict:

=====================  ======================  ==========================================
key                    type                    meaning
=====================  ======================  ==========================================
images                 float Tensor[B,3,H,W]   training images in [-1, 1]; absent when
                                               latents are cached
latents                float Tensor[B,C,h,w]   cached VAE latents (h = H/8); only when cached
alpha_masks            float Tensor[B,1,h,w]   loss weights in [0, 1] at latent size (alpha
                                               averaged over 8x8 pixels); only when a subset of
                                               the batch has alpha_mask (1 for the others)
conditioning_images    float Tensor[B,3,H,W]   RGB conditioning images in [-1, 1] (made by the
                                               conditioning_preprocessor where one is set)
captions               list[str]               the captions after the caption options
text_hidden            Tensor[B,...]           cached text-encoder hidden states; only when cached
text_pooled            Tensor[B,...]           cached pooled text embeddings; only when cached
original_sizes_hw      LongTensor[B,2]         the image's size (height, width) on disk
crop_top_lefts         LongTensor[B,2]         (top, left) of the crop in the resized image,
                                               left mirrored for a flipped sample
target_sizes_hw        LongTensor[B,2]         the bucket size (height, width)
network_multipliers    float Tensor[B]         the dataset's network_multiplier
network_multiplier     float                   the same, as a number (batches hold one dataset; no device copy)
image_paths            list[str]               the training image files
flipped                BoolTensor[B]           whether the sample was mirrored (flip_aug)
=====================  ======================  ==========================================

Caches are attached by ``library.data.caching``; the dataset only looks them up through the
``LatentLookup`` / ``TextLookup`` protocols. The latent cache also holds the alpha masks and the
guides made by a ``conditioning_preprocessor``; conditioning images from a folder are loaded
from disk per sample (they go to LLLite in pixel space).

``token_warmup_step`` needs the training step of each batch: ``set_step_schedule`` tells the
dataset how many batches make one optimizer step and how long the run is, and the step of batch
``i`` of epoch ``e`` is ``(e - 1) * steps_per_epoch + i // batches_per_step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from library.atomic_io import WriteError, atomic_write_text
from library.data.buckets import (
    BucketPlan,
    Size,
    crop_position,
    face_crop,
    flipped_crop_left,
    resized_size,
)
from library.data.captions import (
    face_info_from_name,
    metadata_caption,
    process_caption,
    read_caption,
    read_metadata_file,
)
from library.data.conditioning_preprocessors import apply_preprocessor
from library.cli import option_label
from library.data.dataset_config import DatasetConfig, DatasetSourceOptions, SubsetConfig, key_label
from library.errors import UserError
from library.image_files import IMAGE_EXTENSIONS, is_image_name
from library.sdxl.text_encoding import TextEncodingOptions

logger = logging.getLogger(__name__)

INFO_CACHE_NAME = ".lllite_image_info.json"
_EXIF_ORIENTATION = 0x0112
_LIST_LIMIT = 10
_LAYOUT_STREAM = 0x4C41594F  # separates the batch-order generator from the per-sample ones
LATENT_SCALE = 8  # pixels per latent pixel (SDXL's VAE)

# Filters when resize_interpolation is unset. Conditioning images are mostly thin lines (edges, poses):
# area averaging keeps every line when shrinking and never rings, where lanczos/bicubic overshoot
# around lines and nearest drops them.
DEFAULT_IMAGE_INTERPOLATION = "lanczos"
DEFAULT_CONDITIONING_INTERPOLATION = "area"
# sd-scripts' mapping of the names: lanczos and box by Pillow, the others by OpenCV.
_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_CV2_FILTERS = {"nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
                "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}


@dataclass(frozen=True)
class ImageItem:
    """One training image, its conditioning image and everything known before loading pixels."""

    index: int
    image_path: Path
    conditioning_path: Path | None  # None: the guide is made from the training image
    caption: str  # as read ("" when missing), lines joined by newlines, before the caption options
    image_size: Size  # (width, height) after EXIF orientation
    conditioning_size: Size | None
    dataset_index: int
    subset: SubsetConfig
    bucket: Size  # (width, height)
    resized: Size  # size before cropping to the bucket
    face: tuple[int, int, int, int] | None = None  # face box from the file name, with face_crop_aug_range

    @property
    def center_crop(self) -> tuple[int, int]:
        return crop_position(self.resized, self.bucket)


class LatentLookup(Protocol):
    """Cached per-image tensors; masks and guides are stored unflipped, for the centre crop."""

    def get_latents(self, item_index: int, flipped: bool) -> torch.Tensor: ...

    def get_alpha_mask(self, item_index: int) -> torch.Tensor: ...

    def get_guide(self, item_index: int) -> torch.Tensor: ...


class TextLookup(Protocol):
    def get_text_outputs(self, item_index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


# ----------------------------------------------------------------------------- images


def list_images(directory: Path) -> list[Path]:
    """Image files directly in ``directory`` (not in subfolders), sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and is_image_name(p))


def probe_image(path: Path) -> Size:
    """Check that an image decodes completely and return its (width, height) after EXIF orientation.

    Raises ``OSError``/``ValueError``/``Image.DecompressionBombError`` for a broken file.
    """
    with Image.open(path) as img:
        img.verify()  # structure and checksums
    with Image.open(path) as img:
        w, h = img.size
        if img.format == "JPEG":
            img.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # decode the whole stream, cheaply
        img.load()  # catches truncated files that verify() accepts
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def open_rgb(path: Path) -> Image.Image:
    """An image as RGB with its EXIF orientation applied."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def open_alpha(path: Path) -> Image.Image:
    """The alpha channel of an image ("L", EXIF orientation applied); fully opaque when it has none."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGBA").getchannel("A")


def image_interpolation(subset: SubsetConfig) -> str:
    return subset.resize_interpolation or DEFAULT_IMAGE_INTERPOLATION


def conditioning_interpolation(subset: SubsetConfig) -> str:
    return subset.resize_interpolation or DEFAULT_CONDITIONING_INTERPOLATION


def resize_image(img: Image.Image, size: Size, interpolation: str = DEFAULT_IMAGE_INTERPOLATION) -> Image.Image:
    """``img`` resized to ``size`` (width, height) with one of the resize_interpolation filters."""
    if img.size == tuple(size):
        return img
    if interpolation in _PIL_FILTERS:
        return img.resize(size, _PIL_FILTERS[interpolation])
    return Image.fromarray(cv2.resize(np.asarray(img), tuple(size), interpolation=_CV2_FILTERS[interpolation]))


def crop_and_flip(img: Image.Image, resized: Size, bucket: Size, crop: tuple[int, int], flipped: bool,
                  interpolation: str = DEFAULT_IMAGE_INTERPOLATION) -> Image.Image:
    """Resize to ``resized``, cut the bucket at ``crop`` = (top, left), then mirror if ``flipped``."""
    img = resize_image(img, resized, interpolation)
    top, left = crop
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    return ImageOps.mirror(img) if flipped else img


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (PIL or HxWx3 uint8) -> float32 Tensor[3,H,W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def latent_mask(alpha: Image.Image) -> torch.Tensor:
    """An alpha crop ("L", size a multiple of 8) -> Tensor[1,H/8,W/8] in [0, 1]: the mean alpha of each 8x8 block."""
    arr = np.asarray(alpha, dtype=np.float32) / 255.0
    h, w = arr.shape
    small = cv2.resize(arr, (w // LATENT_SCALE, h // LATENT_SCALE), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(small))[None]


def make_guide(item: ImageItem, resized: Size, crop: tuple[int, int], image: Image.Image | None = None) -> np.ndarray:
    """The guide of a sample (unflipped): the subset's conditioning_preprocessor applied after resizing and cropping.

    The source is the conditioning image when the subset has a conditioning_data_dir, else the
    training image (``image``: its crop, when already loaded, before color augmentation).
    """
    sub = item.subset
    if item.conditioning_path is not None:
        source = crop_and_flip(open_rgb(item.conditioning_path), resized, item.bucket, crop, False,
                               conditioning_interpolation(sub))
    elif image is not None:
        source = image
    else:
        source = crop_and_flip(open_rgb(item.image_path), resized, item.bucket, crop, False, image_interpolation(sub))
    return apply_preprocessor(sub.conditioning_preprocessor, np.array(source, dtype=np.uint8), **sub.preprocessor_options)


def color_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A small random hue shift and brightness change (training image only, never the conditioning)."""
    hsv = np.asarray(img.convert("HSV"), dtype=np.int16).copy()
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-12, 13))) % 256
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.9, 1.1), 0, 255)
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def load_training_image(item: ImageItem, flipped: bool, crop: tuple[int, int] | None = None) -> torch.Tensor:
    """The training image as the model sees it (no color augmentation): Tensor[3,H,W] in [-1, 1]."""
    img = open_rgb(item.image_path)
    return to_tensor(crop_and_flip(img, item.resized, item.bucket, crop or item.center_crop, flipped,
                                   image_interpolation(item.subset)))


def load_conditioning_image(item: ImageItem, flipped: bool, crop: tuple[int, int], resized: Size | None = None) -> torch.Tensor:
    """The conditioning image cut exactly like the training image (for a subset without a preprocessor).

    A conditioning image of another size is treated as resized to the training image's size:
    it is resized straight to the training image's resized size (one resampling, same result
    geometry), then cropped and flipped the same way.
    """
    img = open_rgb(item.conditioning_path)
    return to_tensor(crop_and_flip(img, resized or item.resized, item.bucket, crop, flipped,
                                   conditioning_interpolation(item.subset)))


def sample_geometry(item: ImageItem, rng: np.random.Generator) -> tuple[Size, tuple[int, int]]:
    """``(resized, (top, left))`` of one sample: the face crop, or the bucket crop (random with random_crop)."""
    sub = item.subset
    if sub.face_crop_aug_range is not None and item.face is not None:
        return face_crop(item.image_size, item.bucket, item.face, sub.face_crop_aug_range, rng, sub.random_crop)
    return item.resized, crop_position(item.resized, item.bucket, rng if sub.random_crop else None)


def static_caption(item: ImageItem) -> str:
    """The caption with only the fixed options applied (prefix/suffix, keep_tokens_separator).

    Equal to the per-epoch caption when ``dynamic_caption_options(item.subset)`` is empty.
    """
    return process_caption(item.caption, item.subset, np.random.default_rng(0), epoch=0)


# ----------------------------------------------------------------------------- scanning


class _ImageInfoCache:
    """``cache_info = true``: remembers checked image sizes in ``<dir>/.lllite_image_info.json``."""

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.path = directory / INFO_CACHE_NAME
        self.enabled = enabled
        self.entries: dict[str, list[int]] = {}
        self.dirty = False
        if enabled and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8")).get("images", {})
            except (OSError, ValueError, AttributeError):
                logger.warning("ignoring unreadable image info cache %s", self.path)

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def lookup(self, path: Path) -> Size | None:
        entry = self.entries.get(path.name) if self.enabled else None
        if entry and len(entry) == 4 and entry[:2] == self._stamp(path):
            return (entry[2], entry[3])
        return None

    def store(self, path: Path, size: Size) -> None:
        if self.enabled:
            self.entries[path.name] = [*self._stamp(path), size[0], size[1]]
            self.dirty = True

    def save(self) -> None:
        if not (self.enabled and self.dirty):
            return
        try:
            atomic_write_text(self.path, json.dumps({"version": 1, "images": self.entries}), "the image info cache")
        except (OSError, WriteError) as e:  # it only saves reading the image sizes next time
            logger.warning("could not write the image info cache %s: %s", self.path, getattr(e, "reason", e))


def _names(paths: Sequence[Any], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(str(p) for p in list(paths)[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def _by_stem(paths: list[Path], folder_key: str, folder: Path, problems: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    dupes = []
    for p in paths:
        if p.stem in out:
            dupes.append(f"{out[p.stem].name} / {p.name}")
        out[p.stem] = p
    if dupes:
        problems.append(
            f"{folder_key} {folder}: {len(dupes)} basename(s) used by two images, so the pairing is ambiguous "
            f"(keep one of each): {_names(dupes)}"
        )
    return out


def _probe_all(paths: list[Path], caches: dict[Path, _ImageInfoCache], desc: str) -> tuple[dict[Path, Size], list[str]]:
    """Sizes of every image (checked in parallel threads) and the unreadable ones with the reason."""
    sizes: dict[Path, Size] = {}
    todo = []
    for p in paths:
        known = caches[p.parent].lookup(p)
        if known is None:
            todo.append(p)
        else:
            sizes[p] = known

    def probe(p: Path) -> tuple[Path, Size | None, str]:
        try:
            return p, probe_image(p), ""
        except Exception as e:  # any decoder failure means "unreadable", reported with its reason
            return p, None, f"{type(e).__name__}: {e}"

    bad = []
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for p, size, why in tqdm(pool.map(probe, todo), total=len(todo), desc=desc, disable=len(todo) < 200):
            if size is None:
                bad.append(f"{p} ({why})")
            else:
                sizes[p] = size
                caches[p.parent].store(p, size)
    return sizes, bad


def _metadata_images(sub: SubsetConfig, problems: list[str]) -> tuple[dict[str, Path], dict[Path, str]]:
    """The images listed in a subset's metadata_file (by basename) and their captions.

    A key is an image path, absolute or relative to image_dir, with or without its extension.
    """
    assert sub.metadata_file is not None
    try:
        entries = read_metadata_file(sub.metadata_file)
    except UserError as e:
        problems.append(str(e))
        return {}, {}
    listing: dict[Path, dict[str, Path]] = {}
    found: list[Path] = []
    captions: dict[Path, str] = {}
    missing = []
    for key, entry in entries.items():
        path = Path(key) if Path(key).is_absolute() else sub.image_dir / key
        if not (is_image_name(path) and path.is_file()):
            folder = path.parent
            if folder not in listing:
                listing[folder] = {p.stem: p for p in list_images(folder)} if folder.is_dir() else {}
            path = listing[folder].get(path.name)
        if path is None:
            missing.append(key)
            continue
        found.append(path)
        captions[path] = metadata_caption(entry, sub.caption_separator, sub.enable_wildcard)
    if missing:
        problems.append(f"{len(missing)} image(s) listed in metadata_file {sub.metadata_file} are not found (keys are "
                        f"paths absolute or relative to image_dir {sub.image_dir}): {_names(missing)}")
    if not entries:
        problems.append(f"metadata_file {sub.metadata_file} lists no images")
    unlisted = len({p.stem for p in list_images(sub.image_dir)} - {p.stem for p in found})
    if unlisted:
        logger.info("%d image(s) in %s are not listed in %s and are not used", unlisted, sub.image_dir, sub.metadata_file)
    return _by_stem(found, "metadata_file", sub.metadata_file, problems), captions


_Pair = tuple[int, SubsetConfig, Path, Path | None]  # (dataset index, subset, image, conditioning image or None)


def scan_datasets(configs: Sequence[DatasetConfig]) -> list[ImageItem]:
    """Pair, check and bucket every image of every subset; one ``UserError`` lists all problems."""
    problems: list[str] = []
    pairs, listed_captions = _pair_subsets(configs, problems)
    sizes = _probe_pairs(pairs, problems)
    if problems:
        raise UserError("the dataset cannot be used:\n  " + "\n  ".join(problems))
    return _make_items(configs, pairs, sizes, listed_captions)


def _pair_subsets(configs: Sequence[DatasetConfig], problems: list[str]) -> tuple[list[_Pair], dict[tuple[int, Path], str]]:
    """Every (image, conditioning image) pair; ``listed_captions`` holds the captions of metadata files."""
    pairs: list[_Pair] = []
    listed_captions: dict[tuple[int, Path], str] = {}  # (subset id, image) -> caption from a metadata file
    for ds_index, ds in enumerate(configs):
        for sub in ds.subsets:
            if sub.metadata_file is not None:
                images, captions = _metadata_images(sub, problems)
                listed_captions.update({(id(sub), path): caption for path, caption in captions.items()})
            else:
                images = _by_stem(list_images(sub.image_dir), "image_dir", sub.image_dir, problems)
                if not images:
                    problems.append(f"image_dir {sub.image_dir} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
                    continue
            if sub.conditioning_data_dir is None:
                pairs.extend((ds_index, sub, images[s], None) for s in images)
                continue
            conds = _by_stem(list_images(sub.conditioning_data_dir), "conditioning_data_dir", sub.conditioning_data_dir, problems)
            no_cond = [images[s].name for s in images if s not in conds]
            no_image = [conds[s].name for s in conds if s not in images]
            if no_cond:
                problems.append(
                    f"{len(no_cond)} training image(s) in {sub.image_dir} have no conditioning image with the same "
                    f"basename in {sub.conditioning_data_dir}: {_names(no_cond)}"
                )
            if no_image and sub.metadata_file is None:
                problems.append(
                    f"{len(no_image)} conditioning image(s) in {sub.conditioning_data_dir} have no training image with "
                    f"the same basename in {sub.image_dir}: {_names(no_image)}"
                )
            pairs.extend((ds_index, sub, images[s], conds[s]) for s in images if s in conds)
    return pairs, listed_captions


def _probe_pairs(pairs: list[_Pair], problems: list[str]) -> dict[Path, Size]:
    """The size of every image (from the info caches where allowed); unreadable images become problems."""
    info_dirs = {folder for _, sub, img, cond in pairs if sub.cache_info for folder in (img.parent, cond and cond.parent) if folder}
    folders = {folder for _, _, img, cond in pairs for folder in (img.parent, cond and cond.parent) if folder}
    caches = {folder: _ImageInfoCache(folder, folder in info_dirs) for folder in folders}
    all_paths = list(dict.fromkeys(p for _, _, img, cond in pairs for p in (img, cond) if p is not None))
    sizes, unreadable = _probe_all(all_paths, caches, "checking images")
    for cache in caches.values():
        cache.save()
    if unreadable:
        problems.append(f"{len(unreadable)} image(s) cannot be read (fix or remove them): " + _names(unreadable))
    return sizes


def _make_items(configs: Sequence[DatasetConfig], pairs: list[_Pair], sizes: dict[Path, Size],
                listed_captions: dict[tuple[int, Path], str]) -> list[ImageItem]:
    """Captions and buckets of the checked pairs, with warnings for what looks wrong but can train."""
    plans = [
        BucketPlan(ds.resolution, ds.enable_bucket, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps, ds.bucket_no_upscale)
        for ds in configs
    ]
    items: list[ImageItem] = []
    missing_captions: list[tuple[Path, str]] = []
    resized_conds = 0
    odd_aspect: list[str] = []
    for ds_index, sub, img, cond in pairs:
        face_crop_on = sub.face_crop_aug_range is not None
        if sub.metadata_file is not None:
            caption = listed_captions[(id(sub), img)] or None
        else:
            caption = read_caption(img, sub.caption_extension, face_name_fallback=face_crop_on)
        if caption is None:
            missing_captions.append((img, sub.caption_extension))
        size, cond_size = sizes[img], (sizes[cond] if cond is not None else None)
        if cond_size is not None and cond_size != size:
            resized_conds += 1
            if abs(cond_size[0] / cond_size[1] - size[0] / size[1]) > 0.02 * size[0] / size[1]:
                odd_aspect.append(f"{cond.name} {cond_size[0]}x{cond_size[1]} vs {img.name} {size[0]}x{size[1]}")
        bucket = plans[ds_index].select(size)
        face = face_info_from_name(img) if face_crop_on else None
        items.append(
            ImageItem(len(items), img, cond, caption or "", size, cond_size, ds_index, sub, bucket,
                      resized_size(size, bucket), face)
        )
    if missing_captions:
        logger.warning(
            "%d image(s) have no caption and train with an empty caption: %s%s", len(missing_captions),
            _names([img.name for img, _ in missing_captions]), _other_caption_hint(missing_captions)
        )
    if resized_conds:
        logger.info("%d conditioning image(s) differ in size from their training image and are resized to it", resized_conds)
    if odd_aspect:
        logger.warning(
            "%d conditioning image(s) have another aspect ratio than their training image and will be stretched "
            "(check the pairing): %s", len(odd_aspect), _names(odd_aspect)
        )
    faces = [item for item in items if item.subset.face_crop_aug_range is not None]
    if faces and not any(item.face for item in faces):
        logger.warning("face_crop_aug_range is set but no image is named name_cx_cy_w_h (the face box): it has no effect")
    return items


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class BatchSpec:
    """One batch of one epoch: (item index, repeat number) pairs from a single bucket."""

    dataset_index: int
    bucket: Size
    samples: tuple[tuple[int, int], ...]


class LLLiteDataset(torch.utils.data.Dataset):
    """Bucketed batches of (image, conditioning image, caption); see the module docstring."""

    def __init__(self, configs: Sequence[DatasetConfig], seed: int | None = 0,
                 text_encoding: TextEncodingOptions = TextEncodingOptions()) -> None:
        if not configs:
            raise UserError(f"no dataset configured: give {option_label(DatasetSourceOptions, 'dataset_config')} or "
                            f"{key_label('image_dir')} and {key_label('conditioning_data_dir')}")
        self.configs = list(configs)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**32))
            logger.info("no seed given: the dataset uses seed %d", seed)
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.items = scan_datasets(self.configs)
        self.epoch = 1
        # How captions are encoded: what the text-encoder cache depends on besides the caption.
        self.text_encoding = text_encoding
        self.batches_per_step = 1
        self.max_train_steps: int | None = None
        self.latent_cache: LatentLookup | None = None
        self.text_cache: TextLookup | None = None
        groups: dict[tuple[int, Size], list[int]] = {}
        for item in self.items:
            groups.setdefault((item.dataset_index, item.bucket), []).append(item.index)
        self._groups = sorted(groups.items())
        self._num_batches = sum(
            -(-sum(self.items[i].subset.num_repeats for i in idx) // self.configs[ds].batch_size) for (ds, _), idx in self._groups
        )
        self._layout_cache: tuple[int, list[BatchSpec]] | None = None
        logger.info("%s", self.summary())

    # -- bookkeeping

    def summary(self) -> str:
        lines = [f"{len(self.items)} image pairs, {self.num_samples} samples and {len(self)} batches per epoch"]
        for (ds, (bw, bh)), idx in self._groups:
            lines.append(f"  dataset {ds} bucket {bw}x{bh}: {len(idx)} images")
        return "\n".join(lines)

    @property
    def num_samples(self) -> int:
        """Samples per epoch (images times their num_repeats)."""
        return sum(item.subset.num_repeats for item in self.items)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (from 1); the order and the random choices depend on (seed, epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    def set_step_schedule(self, batches_per_step: int, max_train_steps: int) -> None:
        """How batches map to training steps, for ``token_warmup_step`` (the trainer calls this once).

        ``batches_per_step``: batches of the whole dataset per optimizer step (processes times
        gradient accumulation steps); ``max_train_steps``: the run's length, for a warmup given as
        a fraction.
        """
        self.batches_per_step = max(1, int(batches_per_step))
        self.max_train_steps = int(max_train_steps)

    def step_of(self, epoch: int, index: int) -> int:
        """The training step (from 0) at which batch ``index`` of ``epoch`` is trained."""
        steps_per_epoch = max(1, math.ceil(len(self) / self.batches_per_step))
        return (epoch - 1) * steps_per_epoch + index // self.batches_per_step

    def attach_latent_cache(self, cache: LatentLookup | None) -> None:
        self.latent_cache = cache

    def attach_text_cache(self, cache: TextLookup | None) -> None:
        self.text_cache = cache

    # -- layout

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *(int(k) & 0xFFFFFFFFFFFFFFFF for k in keys)])

    def batches_for_epoch(self, epoch: int) -> list[BatchSpec]:
        """The batches of an epoch in order (deterministic for (seed, epoch))."""
        if self._layout_cache is not None and self._layout_cache[0] == epoch:
            return self._layout_cache[1]
        rng = self._rng(_LAYOUT_STREAM, epoch)
        batches: list[BatchSpec] = []
        for (ds, bucket), indices in self._groups:
            samples = [(i, r) for i in indices for r in range(self.items[i].subset.num_repeats)]
            samples = [samples[k] for k in rng.permutation(len(samples))]
            size = self.configs[ds].batch_size
            batches.extend(BatchSpec(ds, bucket, tuple(samples[k : k + size])) for k in range(0, len(samples), size))
        batches = [batches[k] for k in rng.permutation(len(batches))]
        self._layout_cache = (epoch, batches)
        return batches

    # -- loading

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        return self.get_batch(index, epoch=epoch)

    def get_batch(self, index: int, epoch: int | None = None, load_images: bool | None = None) -> dict[str, Any]:
        """Batch ``index`` of ``epoch`` (default: the current one).

        ``load_images`` defaults to "only when latents are not cached"; ``debug_dataset``
        sets it to get the pixels even with cached latents.
        """
        epoch = self.epoch if epoch is None else epoch
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (the dataset has {len(self)} batches)")
        spec = self.batches_for_epoch(epoch)[index]
        if load_images is None:
            load_images = self.latent_cache is None
        step = self.step_of(epoch, index)
        samples = [self._sample(self.items[i], repeat, epoch, load_images, step) for i, repeat in spec.samples]

        batch: dict[str, Any] = {}
        if load_images:
            batch["images"] = torch.stack([s["image"] for s in samples])
        if self.latent_cache is not None:
            batch["latents"] = torch.stack([s["latents"] for s in samples])
        if any("alpha_mask" in s for s in samples):
            bw, bh = spec.bucket
            ones = torch.ones(1, bh // LATENT_SCALE, bw // LATENT_SCALE)
            batch["alpha_masks"] = torch.stack([s.get("alpha_mask", ones) for s in samples])
        batch["conditioning_images"] = torch.stack([s["conditioning"] for s in samples])
        batch["captions"] = [s["caption"] for s in samples]
        if self.text_cache is not None:
            batch["text_hidden"] = torch.stack([s["text"][0] for s in samples])
            batch["text_pooled"] = torch.stack([s["text"][1] for s in samples])
        batch["original_sizes_hw"] = torch.tensor([s["original_hw"] for s in samples], dtype=torch.long)
        batch["crop_top_lefts"] = torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long)
        batch["target_sizes_hw"] = torch.tensor([s["target_hw"] for s in samples], dtype=torch.long)
        multiplier = self.configs[spec.dataset_index].network_multiplier
        batch["network_multipliers"] = torch.full((len(samples),), multiplier, dtype=torch.float32)
        batch["network_multiplier"] = float(multiplier)
        batch["image_paths"] = [str(self.items[i].image_path) for i, _ in spec.samples]
        batch["flipped"] = torch.tensor([s["flipped"] for s in samples], dtype=torch.bool)
        return batch

    def _sample(self, item: ImageItem, repeat: int, epoch: int, load_image: bool, step: int) -> dict[str, Any]:
        sub = item.subset
        rng = self._rng(epoch, item.index, repeat)
        flipped = bool(sub.flip_aug and rng.random() < 0.5)
        resized, crop = sample_geometry(item, rng)
        caption = process_caption(item.caption, sub, rng, epoch, step=step, max_train_steps=self.max_train_steps)

        out: dict[str, Any] = {"flipped": flipped, "caption": caption}
        guide = mask = None  # unflipped
        if load_image:
            img = crop_and_flip(open_rgb(item.image_path), resized, item.bucket, crop, False, image_interpolation(sub))
            if sub.alpha_mask:
                alpha = crop_and_flip(open_alpha(item.image_path), resized, item.bucket, crop, False, image_interpolation(sub))
                mask = latent_mask(alpha)
            if sub.conditioning_preprocessor:
                guide = to_tensor(make_guide(item, resized, crop, img))  # before color augmentation
            if flipped:
                img = ImageOps.mirror(img)
            if sub.color_aug:
                img = color_augment(img, rng)
            out["image"] = to_tensor(img)
        if self.latent_cache is not None:
            out["latents"] = self.latent_cache.get_latents(item.index, flipped)
            # Cached geometry is the centre crop: the options that move the crop cannot be cached.
            if mask is None and sub.alpha_mask:
                mask = self.latent_cache.get_alpha_mask(item.index)
            if guide is None and sub.conditioning_preprocessor:
                guide = self.latent_cache.get_guide(item.index).float() / 127.5 - 1.0
        if self.text_cache is not None:
            out["text"] = self.text_cache.get_text_outputs(item.index)
        if sub.conditioning_preprocessor:
            out["conditioning"] = guide.flip(-1) if flipped else guide
        else:
            out["conditioning"] = load_conditioning_image(item, flipped, crop, resized)
        if mask is not None:
            out["alpha_mask"] = mask.flip(-1) if flipped else mask

        top, left = crop
        if flipped:
            left = flipped_crop_left(resized[0], left, item.bucket[0])
        out["crop_top_left"] = (top, left)
        out["original_hw"] = (item.image_size[1], item.image_size[0])
        out["target_hw"] = (item.bucket[1], item.bucket[0])
        return out


# ----------------------------------------------------------------------------- loader


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, batch_index)``; the epoch is read from the dataset when iteration starts."""

    def __init__(self, dataset: LLLiteDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.dataset.epoch
        return iter([(epoch, i) for i in range(len(self.dataset))])

    def __len__(self) -> int:
        return len(self.dataset)


def unwrap_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate_fn`` for ``DataLoader(batch_size=1)``: the dataset already made the batch."""
    if len(items) != 1:
        raise ValueError("LLLiteDataset items are whole batches: use DataLoader(batch_size=1)")
    return items[0]


def _other_caption_hint(missing: list[tuple[Path, str]]) -> str:
    """A caption file with the other usual extension beside a captionless image: say which key to set."""
    for img, ext in missing:
        for other in (".txt", ".caption"):
            if other != ext and img.with_suffix(other).is_file():
                return (f" ({img.with_suffix(other).name} is there: set caption_extension = \"{other}\"; "
                        f"the default is \"{ext}\", as in sd-scripts)" if ext == ".caption" else
                        f" ({img.with_suffix(other).name} is there: set caption_extension = \"{other}\")")
    return ""


def create_dataloader(
    dataset: LLLiteDataset, num_workers: int = 0, persistent_workers: bool = False, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """The DataLoader the trainer should use (one batch per step, epoch-aware workers)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=1,
        sampler=EpochSampler(dataset),
        collate_fn=unwrap_batch,
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory,
    )
