"""Latent and text-encoder caches: reuse, invalidation, flips, refusals and several processes."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import library.data.caching as caching
from library.data.caching import (
    Processes,
    cache_latents,
    cache_text_encoder_outputs,
    validate_caching_options,
)
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.dataset import LLLiteDataset, load_training_image
from library.errors import UserError
from library.sdxl.text_encoding import TextEncodingOptions
from library.training.cache_filling import text_cache_id

QUIET = Processes(show_progress=False)


def draw(path: Path, size: tuple[int, int], left: int, background: int) -> None:
    w, h = size
    arr = np.full((h, w, 3), background, dtype=np.uint8)
    arr[8:30, left : left + 20] = 255
    Image.fromarray(arr).save(path)


def make_data(root: Path, n: int = 3, caption: str | None = None) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "cond").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw(root / "img" / f"{i}.png", (96, 64), 5 + 10 * i, 40)
        draw(root / "cond" / f"{i}.png", (96, 64), 5 + 10 * i, 0)
        (root / "img" / f"{i}.caption").write_text(caption or f"caption {i}", encoding="utf-8")


def dataset(root: Path, seed: int = 0, resolution: tuple[int, int] = (64, 64), **subset_kw) -> LLLiteDataset:
    sub = SubsetConfig(image_dir=root / "img", conditioning_data_dir=root / "cond", **subset_kw)
    cfg = DatasetConfig(
        subsets=(sub,), resolution=resolution, batch_size=2, enable_bucket=True,
        min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
    )
    return LLLiteDataset([cfg], seed=seed)


class FakeVAE:
    """Latents = 8x8 average pool of the image plus a 4th channel; counts its work."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0
        self.batch_sizes: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += images.shape[0]
        self.batch_sizes.append(images.shape[0])
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


class FakeTE:
    def __init__(self) -> None:
        self.captions: list[str] = []

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.captions.extend(captions)
        lengths = torch.tensor([float(len(c)) for c in captions])
        return lengths[:, None, None].expand(-1, 5, 6).clone(), lengths[:, None].expand(-1, 3).clone()


def expected_latent(ds: LLLiteDataset, index: int, flipped: bool) -> torch.Tensor:
    return FakeVAE()(load_training_image(ds.items[index], flipped)[None])[0]


def cache_files(root: Path, pattern: str = "*_lllite.safetensors") -> list[Path]:
    return sorted((root / "img").glob(pattern))


# ----------------------------------------------------------------------------- latents


def test_disk_latents_are_reused_on_the_second_run(tmp_path):
    make_data(tmp_path)
    ds, vae = dataset(tmp_path), FakeVAE()
    cache_latents(ds, vae, "vae-1", to_disk=True, batch_size=2, processes=QUIET)
    assert vae.images == 3 and vae.batch_sizes == [2, 1]  # one bucket, VAE batches of 2
    assert [p.name for p in cache_files(tmp_path)] == [f"{i}_80x48_lllite.safetensors" for i in range(3)]
    with safe_open(str(cache_files(tmp_path)[0]), framework="pt") as f:
        meta = f.metadata()
    assert meta["vae_id"] == "vae-1" and meta["bucket"] == "80x48" and len(meta["image_sha256"]) == 64

    batch = ds[0]
    assert "images" not in batch and batch["latents"].shape[1:] == (4, 6, 10)
    assert batch["conditioning_images"].shape[1:] == (3, 48, 80)
    index = [str(i.image_path) for i in ds.items].index(batch["image_paths"][0])
    assert torch.allclose(batch["latents"][0], expected_latent(ds, index, False))

    again, vae2 = dataset(tmp_path), FakeVAE()
    cache_latents(again, vae2, "vae-1", to_disk=True, batch_size=2, processes=QUIET)
    assert vae2.calls == 0
    assert torch.equal(again[0]["latents"], ds[0]["latents"])


def test_memory_latents_make_no_files(tmp_path):
    make_data(tmp_path, n=2)
    ds, vae = dataset(tmp_path), FakeVAE()
    cache_latents(ds, vae, "vae-1", batch_size=4, dtype=torch.float16, processes=QUIET)
    assert vae.calls == 1 and cache_files(tmp_path) == []
    batch = ds[0]
    assert batch["latents"].dtype == torch.float16 and "images" not in batch


def test_changed_image_vae_or_bucket_is_reencoded(tmp_path):
    make_data(tmp_path)
    cache_latents(dataset(tmp_path), FakeVAE(), "vae-1", to_disk=True, processes=QUIET)

    draw(tmp_path / "img" / "1.png", (96, 64), 50, 40)  # same size on disk, other content
    vae = FakeVAE()
    ds = dataset(tmp_path)
    cache_latents(ds, vae, "vae-1", to_disk=True, processes=QUIET)
    assert vae.images == 1
    assert torch.allclose(ds.latent_cache.get_latents(1, False), expected_latent(ds, 1, False))

    vae = FakeVAE()
    cache_latents(dataset(tmp_path), vae, "vae-2", to_disk=True, processes=QUIET)
    assert vae.images == 3

    vae = FakeVAE()
    cache_latents(dataset(tmp_path), vae, "vae-2", to_disk=True, dtype=torch.float16, processes=QUIET)
    assert vae.images == 3

    vae = FakeVAE()
    cache_latents(dataset(tmp_path, resolution=(32, 32)), vae, "vae-2", to_disk=True, processes=QUIET)
    assert vae.images == 3 and len(cache_files(tmp_path)) == 6  # another bucket, another file


def test_flip_aug_caches_both_orientations(tmp_path):
    make_data(tmp_path)
    ds, vae = dataset(tmp_path, flip_aug=True, num_repeats=4), FakeVAE()
    cache_latents(ds, vae, "vae-1", to_disk=True, batch_size=8, processes=QUIET)
    assert vae.images == 6
    with safe_open(str(cache_files(tmp_path)[0]), framework="pt") as f:
        assert set(f.keys()) == {"latents", "latents_flipped"}
    paths = [str(i.image_path) for i in ds.items]
    seen = set()
    for b in range(len(ds)):
        batch = ds[b]
        for s, path in enumerate(batch["image_paths"]):
            flipped = bool(batch["flipped"][s])
            seen.add(flipped)
            assert torch.allclose(batch["latents"][s], expected_latent(ds, paths.index(path), flipped))
    assert seen == {False, True}

    vae = FakeVAE()  # a file with both orientations also serves a run without flip_aug
    cache_latents(dataset(tmp_path), vae, "vae-1", to_disk=True, processes=QUIET)
    assert vae.calls == 0


def test_skip_cache_check_trusts_the_images_but_not_the_settings(tmp_path):
    make_data(tmp_path)
    cache_latents(dataset(tmp_path), FakeVAE(), "vae-1", to_disk=True, processes=QUIET)
    draw(tmp_path / "img" / "1.png", (96, 64), 50, 40)  # other content, same settings

    vae = FakeVAE()
    cache_latents(dataset(tmp_path), vae, "vae-1", to_disk=True, processes=QUIET, skip_check=True)
    assert vae.calls == 0  # the changed image is not hashed, so its old latents are used
    vae = FakeVAE()
    cache_latents(dataset(tmp_path, resize_interpolation="bicubic"), vae, "vae-1", to_disk=True, processes=QUIET,
                  skip_check=True)
    assert vae.images == 3  # another resize filter is another setting: checked even when skipping
    vae = FakeVAE()
    ds = dataset(tmp_path, resize_interpolation="bicubic")
    cache_latents(ds, vae, "vae-1", to_disk=True, processes=QUIET)
    assert vae.images == 0  # nothing changed since the last encoding
    draw(tmp_path / "img" / "2.png", (96, 64), 60, 40)
    vae = FakeVAE()
    cache_latents(ds, vae, "vae-1", to_disk=True, processes=QUIET)
    assert vae.images == 1  # without skip_check the image's hash finds the change


@pytest.mark.parametrize("option", ["random_crop", "color_aug", "face_crop_aug_range"])
def test_latent_cache_refuses_per_epoch_pixel_options(tmp_path, option):
    make_data(tmp_path, n=1)
    ds = dataset(tmp_path, **{option: (2.0, 3.0) if option == "face_crop_aug_range" else True})
    with pytest.raises(UserError, match=f"cache_latents cannot be combined with {option}"):
        cache_latents(ds, FakeVAE(), "vae-1", processes=QUIET)


def run_ranks(root: Path, monkeypatch, work) -> dict[str, list[Path]]:
    """Run ``work(dataset, rank, barrier)`` in two threads; return the files each rank wrote."""
    barrier = threading.Barrier(2, timeout=60)
    written: dict[str, list[Path]] = {"rank0": [], "rank1": []}
    real_write = caching._write

    def recording_write(path, tensors, metadata):
        written[threading.current_thread().name].append(Path(path))
        real_write(path, tensors, metadata)

    monkeypatch.setattr(caching, "_write", recording_write)
    datasets = [dataset(root), dataset(root)]
    errors = []

    def target(rank):
        try:
            work(datasets[rank], rank, barrier.wait)
        except Exception as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for ds in datasets:
        assert len(ds[0]["captions"]) > 0
    return written


def test_two_ranks_write_disjoint_latent_files(tmp_path, monkeypatch):
    make_data(tmp_path, n=5)
    vaes = [FakeVAE(), FakeVAE()]

    def work(ds, rank, wait):
        cache_latents(ds, vaes[rank], "vae-1", to_disk=True, processes=Processes(rank, 2, wait, show_progress=False))
        assert "latents" in ds[0]

    written = run_ranks(tmp_path, monkeypatch, work)
    assert written["rank0"] and written["rank1"]
    assert not set(written["rank0"]) & set(written["rank1"])
    assert sorted(written["rank0"] + written["rank1"]) == cache_files(tmp_path)
    assert (vaes[0].images, vaes[1].images) == (3, 2)


# ----------------------------------------------------------------------------- text encoder


def test_text_cache_reuse_and_invalidation(tmp_path):
    make_data(tmp_path)
    ds, te = dataset(tmp_path, caption_prefix="sks"), FakeTE()
    cache_text_encoder_outputs(ds, te, "te-1", to_disk=True, batch_size=2, processes=QUIET)
    assert sorted(te.captions) == ["sks, caption 0", "sks, caption 1", "sks, caption 2"]
    assert len(cache_files(tmp_path, "*_lllite_te.safetensors")) == 3
    batch = ds[0]
    assert batch["text_hidden"].shape[1:] == (5, 6) and batch["text_pooled"].shape[1:] == (3,)
    assert batch["text_hidden"][0, 0, 0].item() == len(batch["captions"][0])

    te = FakeTE()
    cache_text_encoder_outputs(dataset(tmp_path, caption_prefix="sks"), te, "te-1", to_disk=True, processes=QUIET)
    assert te.captions == []

    (tmp_path / "img" / "2.caption").write_text("a new caption", encoding="utf-8")
    te = FakeTE()
    cache_text_encoder_outputs(dataset(tmp_path, caption_prefix="sks"), te, "te-1", to_disk=True, processes=QUIET)
    assert te.captions == ["sks, a new caption"]

    te = FakeTE()
    cache_text_encoder_outputs(dataset(tmp_path, caption_prefix="sks"), te, "te-2", to_disk=True, processes=QUIET)
    assert len(te.captions) == 3


def test_memory_text_cache_encodes_each_caption_once(tmp_path):
    make_data(tmp_path, n=3, caption="same words")
    ds, te = dataset(tmp_path), FakeTE()
    cache_text_encoder_outputs(ds, te, "te-1", processes=QUIET)
    assert te.captions == ["same words"]
    assert cache_files(tmp_path, "*_lllite_te*.safetensors") == []
    assert "text_hidden" in ds[0] and ds[0]["captions"][0] == "same words"


def test_text_cache_id_holds_the_encoding_options(tmp_path):
    make_data(tmp_path)
    encoders = "te-1"
    te = FakeTE()
    cache_text_encoder_outputs(dataset(tmp_path), te, text_cache_id(encoders, TextEncodingOptions()), to_disk=True,
                               processes=QUIET)
    assert len(te.captions) == 3
    for changed in (TextEncodingOptions(max_token_length=225), TextEncodingOptions(clip_skip=1),
                    TextEncodingOptions(weighted_captions=True)):
        te = FakeTE()
        cache_text_encoder_outputs(dataset(tmp_path), te, text_cache_id(encoders, changed), to_disk=True, processes=QUIET)
        assert len(te.captions) == 3, changed
    te = FakeTE()  # clip_skip 2 is the default layer: the same encoding, the cache is reused
    cache_text_encoder_outputs(dataset(tmp_path), te, text_cache_id(encoders, TextEncodingOptions(weighted_captions=True,
                                                                                                  clip_skip=2)),
                               to_disk=True, processes=QUIET)
    assert te.captions == []


@pytest.mark.parametrize(
    "options", [{"shuffle_caption": True}, {"caption_dropout_rate": 0.1}, {"caption_tag_dropout_rate": 0.2},
                {"caption_dropout_every_n_epochs": 3}, {"token_warmup_step": 10}, {"enable_wildcard": True}],
)
def test_text_cache_refuses_changing_captions(tmp_path, options):
    make_data(tmp_path, n=1)
    (name,) = options
    with pytest.raises(UserError, match=f"cache_text_encoder_outputs cannot be combined with {name}"):
        cache_text_encoder_outputs(dataset(tmp_path, **options), FakeTE(), "te-1", processes=QUIET)
    validate_caching_options(dataset(tmp_path, **options).configs, cache_latents=True)  # latents are fine


def test_two_ranks_write_disjoint_text_files(tmp_path, monkeypatch):
    make_data(tmp_path, n=4)

    def work(ds, rank, wait):
        cache_text_encoder_outputs(ds, FakeTE(), "te-1", to_disk=True,
                                   processes=Processes(rank, 2, wait, show_progress=False))

    written = run_ranks(tmp_path, monkeypatch, work)
    assert len(written["rank0"]) == len(written["rank1"]) == 2
    assert not set(written["rank0"]) & set(written["rank1"])
