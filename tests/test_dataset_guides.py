"""Issue #18: guides made in the data pipeline by a conditioning_preprocessor, cached with the latents."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open

from library.data.caching import Processes, cache_latents
from library.data.conditioning_preprocessors import canny
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.dataset import LLLiteDataset, to_tensor
from library.data.debug_dataset import debug_dataset
from tests.test_caching import FakeVAE
from tests.test_dataset import draw, make_pair
from tests.test_train_script import base_options, run_train, write_config

QUIET = Processes(show_progress=False)


def make_data(root: Path, n: int = 3) -> None:
    for i in range(n):
        left = 6 + 12 * i
        make_pair(root, f"{i}", size=(96, 64), rect=(left, 8, left + 30, 40), caption=f"box {i}")


def dataset(root: Path, with_folder: bool = False, args: dict | None = None, **kw) -> LLLiteDataset:
    sub = SubsetConfig(image_dir=root / "img", conditioning_data_dir=root / "cond" if with_folder else None,
                       conditioning_preprocessor="canny", conditioning_preprocessor_args=tuple(sorted((args or {}).items())), **kw)
    cfg = DatasetConfig(subsets=(sub,), resolution=(64, 64), batch_size=3, enable_bucket=True, min_bucket_reso=32,
                        max_bucket_reso=128, bucket_reso_steps=16)
    return LLLiteDataset([cfg], seed=2)


def expected_guide(path: Path, item, top: int, left_reported: int, flipped: bool, filter_: str = "lanczos",
                   **options) -> torch.Tensor:
    """Canny of the training (or conditioning) image cut where the batch says it was cut."""
    bw, bh = item.bucket
    left = item.resized[0] - left_reported - bw if flipped else left_reported
    img = Image.open(path).convert("RGB")
    if filter_ == "lanczos":
        img = np.asarray(img.resize(item.resized, Image.Resampling.LANCZOS))
    else:
        img = cv2.resize(np.asarray(img), item.resized, interpolation=cv2.INTER_AREA)
    guide = canny(np.ascontiguousarray(img[top : top + bh, left : left + bw]), **options)
    return to_tensor(np.asarray(ImageOps.mirror(Image.fromarray(guide))) if flipped else guide)


def test_guides_are_canny_of_the_cropped_training_image(tmp_path):
    make_data(tmp_path)
    ds = dataset(tmp_path, flip_aug=True, random_crop=True, num_repeats=4)
    by_path = {str(i.image_path): i for i in ds.items}
    flips, crops = set(), set()
    for b in range(len(ds)):
        batch = ds[b]
        for s, path in enumerate(batch["image_paths"]):
            top, left = batch["crop_top_lefts"][s].tolist()
            flipped = bool(batch["flipped"][s])
            flips.add(flipped)
            crops.add((top, left))
            want = expected_guide(Path(path), by_path[path], top, left, flipped)
            assert want.max() == 1  # there are edges to compare
            assert torch.equal(batch["conditioning_images"][s], want)
    assert flips == {False, True} and len(crops) > 2


def test_preprocessor_with_a_conditioning_folder_reads_the_conditioning_images(tmp_path):
    make_data(tmp_path)
    for i in range(3):  # the source images of the guides: a box elsewhere than in the training image
        draw((96, 64), (50, 20, 90, 60), 0).save(tmp_path / "cond" / f"{i}.png")
    ds = dataset(tmp_path, with_folder=True, args={"low_threshold": 50, "high_threshold": 120})
    batch = ds[0]
    for s, path in enumerate(batch["image_paths"]):
        item = next(i for i in ds.items if str(i.image_path) == path)
        top, left = batch["crop_top_lefts"][s].tolist()
        want = expected_guide(item.conditioning_path, item, top, left, False, "area", low_threshold=50, high_threshold=120)
        assert torch.equal(batch["conditioning_images"][s], want)
        assert not torch.equal(want, expected_guide(item.image_path, item, top, left, False, low_threshold=50,
                                                    high_threshold=120))


def test_cached_guides_and_invalidation(tmp_path):
    make_data(tmp_path)
    ds, vae = dataset(tmp_path, flip_aug=True), FakeVAE()
    cache_latents(ds, vae, "vae-1", to_disk=True, processes=QUIET)
    assert vae.images == 6  # 3 images, both orientations
    files = sorted((tmp_path / "img").glob("*_lllite.safetensors"))
    for item, file in zip(sorted(ds.items, key=lambda i: i.image_path.name), files):
        with safe_open(str(file), framework="pt") as f:
            guide, meta = f.get_tensor("guide"), f.metadata()
        assert guide.dtype == torch.uint8 and guide.shape == (1, 48, 80)  # gray guides keep one channel
        top, left = item.center_crop
        want = expected_guide(item.image_path, item, top, left, False)
        assert torch.equal(to_tensor(guide.expand(3, -1, -1).permute(1, 2, 0).numpy()), want)
        assert meta["guide"] == '["canny", {}]'
    uncached = dataset(tmp_path, flip_aug=True)
    for b in range(len(ds)):
        assert torch.equal(ds[b]["conditioning_images"], uncached.get_batch(b)["conditioning_images"])

    vae = FakeVAE()  # nothing changed: nothing is made again
    cache_latents(dataset(tmp_path, flip_aug=True), vae, "vae-1", to_disk=True, processes=QUIET)
    assert vae.calls == 0

    vae = FakeVAE()  # other arguments: the guides are made again, the latents are kept
    changed = dataset(tmp_path, flip_aug=True, args={"low_threshold": 10, "high_threshold": 20})
    cache_latents(changed, vae, "vae-1", to_disk=True, processes=QUIET)
    assert vae.calls == 0
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata()["guide"] == '["canny", {"high_threshold": 20, "low_threshold": 10}]'
    item = changed.items[0]
    want = expected_guide(item.image_path, item, *item.center_crop, False, low_threshold=10, high_threshold=20)
    assert torch.equal(changed.latent_cache.get_guide(0).float() / 127.5 - 1, want)
    assert not torch.equal(want, expected_guide(item.image_path, item, *item.center_crop, False))


def test_debug_dataset_shows_the_guide(tmp_path):
    make_data(tmp_path, n=1)
    ds = dataset(tmp_path)
    (png,) = debug_dataset(ds, tmp_path / "debug", num_batches=1)
    panel = np.asarray(Image.open(png))
    item = ds.items[0]
    want = expected_guide(item.image_path, item, *item.center_crop, False)
    width = item.bucket[0]
    assert np.array_equal(panel[:, width : 2 * width], ((want.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    assert "canny() of the training image" in png.with_suffix(".txt").read_text()


def test_training_script_with_a_preprocessor_and_no_conditioning_folder(tmp_path, tiny_checkpoint):
    """The real script, 2 steps: guides from canny, cached with the latents, alpha masks, longer captions."""
    data = tmp_path / "data"
    make_data(data, n=2)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""
[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{(data / 'img').as_posix()}"
  conditioning_preprocessor = "canny"
  conditioning_preprocessor_args = {{ low = 100, high = 200 }}
  alpha_mask = true
""")
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint, dataset_config=toml,
                                                                max_train_steps=2, cache_latents_to_disk=True,
                                                                max_token_length=150, clip_skip=1,
                                                                weighted_captions=True))
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "tiny.safetensors").is_file()
    files = sorted((data / "img").glob("*_lllite.safetensors"))
    assert len(files) == 2
    with safe_open(str(files[0]), framework="pt") as f:
        assert {"latents", "alpha_mask", "guide"} <= set(f.keys())
