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
conditioning_images    float Tensor[B,3,H,W]   RGB conditioning images in [-1, 1]
captions               list[str]               the captions after the caption options
text_hidden            Tensor[B,...]           cached text-encoder hidden states; only when cached
text_pooled            Tensor[B,...]           cached pooled text embeddings; only when cached
original_sizes_hw      LongTensor[B,2]         the image's size (height, width) on disk
crop_top_lefts         LongTensor[B,2]         (top, left) of the crop in the resized image,
                                               left mirrored for a flipped sample
target_sizes_hw        LongTensor[B,2]         the bucket size (height, width)
network_multipliers    float Tensor[B]         the dataset's network_multiplier
image_paths            list[str]               the training image files
flipped                BoolTensor[B]           whether the sample was mirrored (flip_aug)
=====================  ======================  ==========================================

Caches are attached by ``library.caching``; the dataset only looks them up through the
``LatentLookup`` / ``TextLookup`` protocols. Conditioning images are always loaded from
disk per sample (they go to LLLite in pixel space).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from library.atomic_io import atomic_write_text
from library.buckets import BucketPlan, Size, crop_position, flipped_crop_left, resized_size
from library.captions import process_caption, read_caption
from library.dataset_config import DatasetConfig, SubsetConfig
from library.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INFO_CACHE_NAME = ".lllite_image_info.json"
_EXIF_ORIENTATION = 0x0112
_LIST_LIMIT = 10
_LAYOUT_STREAM = 0x4C41594F  # separates the batch-order generator from the per-sample ones


@dataclass(frozen=True)
class ImageItem:
    """One training image, its conditioning image and everything known before loading pixels."""

    index: int
    image_path: Path
    conditioning_path: Path
    caption: str  # as read from disk ("" when missing), before the caption options
    image_size: Size  # (width, height) after EXIF orientation
    conditioning_size: Size
    dataset_index: int
    subset: SubsetConfig
    bucket: Size  # (width, height)
    resized: Size  # size before cropping to the bucket

    @property
    def center_crop(self) -> tuple[int, int]:
        return crop_position(self.resized, self.bucket)


class LatentLookup(Protocol):
    def get_latents(self, item_index: int, flipped: bool) -> torch.Tensor: ...


class TextLookup(Protocol):
    def get_text_outputs(self, item_index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


# ----------------------------------------------------------------------------- images


def list_images(directory: Path) -> list[Path]:
    """Image files directly in ``directory`` (not in subfolders), sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


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


def crop_and_flip(img: Image.Image, resized: Size, bucket: Size, crop: tuple[int, int], flipped: bool) -> Image.Image:
    """Resize to ``resized``, cut the bucket at ``crop`` = (top, left), then mirror if ``flipped``."""
    if img.size != resized:
        img = img.resize(resized, Image.Resampling.LANCZOS)
    top, left = crop
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    return ImageOps.mirror(img) if flipped else img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 Tensor[3,H,W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def color_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A small random hue shift and brightness change (training image only, never the conditioning)."""
    hsv = np.asarray(img.convert("HSV"), dtype=np.int16).copy()
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-12, 13))) % 256
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.9, 1.1), 0, 255)
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def load_training_image(item: ImageItem, flipped: bool, crop: tuple[int, int] | None = None) -> torch.Tensor:
    """The training image as the model sees it (no color augmentation): Tensor[3,H,W] in [-1, 1]."""
    img = open_rgb(item.image_path)
    return to_tensor(crop_and_flip(img, item.resized, item.bucket, crop or item.center_crop, flipped))


def load_conditioning_image(item: ImageItem, flipped: bool, crop: tuple[int, int]) -> torch.Tensor:
    """The conditioning image cut exactly like the training image.

    A conditioning image of another size is treated as resized to the training image's size:
    it is resized straight to the training image's resized size (one resampling, same result
    geometry), then cropped and flipped the same way.
    """
    img = open_rgb(item.conditioning_path)
    return to_tensor(crop_and_flip(img, item.resized, item.bucket, crop, flipped))


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
            atomic_write_text(self.path, json.dumps({"version": 1, "images": self.entries}))
        except OSError as e:
            logger.warning("could not write the image info cache %s: %s", self.path, e)


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


def scan_datasets(configs: Sequence[DatasetConfig]) -> list[ImageItem]:
    """Pair, check and bucket every image of every subset; one ``UserError`` lists all problems."""
    problems: list[str] = []
    pairs: list[tuple[int, SubsetConfig, Path, Path]] = []
    for ds_index, ds in enumerate(configs):
        for sub in ds.subsets:
            images = _by_stem(list_images(sub.image_dir), "image_dir", sub.image_dir, problems)
            conds = _by_stem(list_images(sub.conditioning_data_dir), "conditioning_data_dir", sub.conditioning_data_dir, problems)
            if not images:
                problems.append(f"image_dir {sub.image_dir} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
                continue
            no_cond = [images[s].name for s in images if s not in conds]
            no_image = [conds[s].name for s in conds if s not in images]
            if no_cond:
                problems.append(
                    f"{len(no_cond)} training image(s) in {sub.image_dir} have no conditioning image with the same "
                    f"basename in {sub.conditioning_data_dir}: {_names(no_cond)}"
                )
            if no_image:
                problems.append(
                    f"{len(no_image)} conditioning image(s) in {sub.conditioning_data_dir} have no training image with "
                    f"the same basename in {sub.image_dir}: {_names(no_image)}"
                )
            pairs.extend((ds_index, sub, images[s], conds[s]) for s in images if s in conds)

    info_dirs = {folder for _, sub, img, cond in pairs if sub.cache_info for folder in (img.parent, cond.parent)}
    folders = {folder for _, _, img, cond in pairs for folder in (img.parent, cond.parent)}
    caches = {folder: _ImageInfoCache(folder, folder in info_dirs) for folder in folders}
    all_paths = list(dict.fromkeys(p for _, _, img, cond in pairs for p in (img, cond)))
    sizes, unreadable = _probe_all(all_paths, caches, "checking images")
    for cache in caches.values():
        cache.save()
    if unreadable:
        problems.append(f"{len(unreadable)} image(s) cannot be read (fix or remove them): " + _names(unreadable))
    if problems:
        raise UserError("the dataset cannot be used:\n  " + "\n  ".join(problems))

    plans = [
        BucketPlan(ds.resolution, ds.enable_bucket, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps, ds.bucket_no_upscale)
        for ds in configs
    ]
    items: list[ImageItem] = []
    missing_captions: list[str] = []
    resized_conds = 0
    odd_aspect: list[str] = []
    for ds_index, sub, img, cond in pairs:
        caption = read_caption(img, sub.caption_extension)
        if caption is None:
            missing_captions.append(img.name)
        size, cond_size = sizes[img], sizes[cond]
        if cond_size != size:
            resized_conds += 1
            if abs(cond_size[0] / cond_size[1] - size[0] / size[1]) > 0.02 * size[0] / size[1]:
                odd_aspect.append(f"{cond.name} {cond_size[0]}x{cond_size[1]} vs {img.name} {size[0]}x{size[1]}")
        bucket = plans[ds_index].select(size)
        items.append(
            ImageItem(len(items), img, cond, caption or "", size, cond_size, ds_index, sub, bucket, resized_size(size, bucket))
        )
    if missing_captions:
        logger.warning(
            "%d image(s) have no caption file and train with an empty caption: %s", len(missing_captions), _names(missing_captions)
        )
    if resized_conds:
        logger.info("%d conditioning image(s) differ in size from their training image and are resized to it", resized_conds)
    if odd_aspect:
        logger.warning(
            "%d conditioning image(s) have another aspect ratio than their training image and will be stretched "
            "(check the pairing): %s", len(odd_aspect), _names(odd_aspect)
        )
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

    def __init__(self, configs: Sequence[DatasetConfig], seed: int | None = 0) -> None:
        if not configs:
            raise UserError("no dataset configured: give --dataset_config or --train_data_dir and --conditioning_data_dir")
        self.configs = list(configs)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**32))
            logger.info("no seed given: the dataset uses seed %d", seed)
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.items = scan_datasets(self.configs)
        self.epoch = 1
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
        samples = [self._sample(self.items[i], repeat, epoch, load_images) for i, repeat in spec.samples]

        batch: dict[str, Any] = {}
        if load_images:
            batch["images"] = torch.stack([s["image"] for s in samples])
        if self.latent_cache is not None:
            batch["latents"] = torch.stack([s["latents"] for s in samples])
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
        batch["image_paths"] = [str(self.items[i].image_path) for i, _ in spec.samples]
        batch["flipped"] = torch.tensor([s["flipped"] for s in samples], dtype=torch.bool)
        return batch

    def _sample(self, item: ImageItem, repeat: int, epoch: int, load_image: bool) -> dict[str, Any]:
        sub = item.subset
        rng = self._rng(epoch, item.index, repeat)
        flipped = bool(sub.flip_aug and rng.random() < 0.5)
        crop = crop_position(item.resized, item.bucket, rng if sub.random_crop else None)
        caption = process_caption(item.caption, sub, rng, epoch)

        out: dict[str, Any] = {"flipped": flipped, "caption": caption}
        if load_image:
            img = crop_and_flip(open_rgb(item.image_path), item.resized, item.bucket, crop, flipped)
            if sub.color_aug:
                img = color_augment(img, rng)
            out["image"] = to_tensor(img)
        if self.latent_cache is not None:
            out["latents"] = self.latent_cache.get_latents(item.index, flipped)
        if self.text_cache is not None:
            out["text"] = self.text_cache.get_text_outputs(item.index)
        out["conditioning"] = load_conditioning_image(item, flipped, crop)

        top, left = crop
        if flipped:
            left = flipped_crop_left(item.resized[0], left, item.bucket[0])
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
