"""Pairing, image checks, bucketing, alignment, captions and batch order of LLLiteDataset."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.buckets import BucketPlan, crop_position, make_buckets, resized_size
from library.data.captions import process_caption
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.dataset import LLLiteDataset, create_dataloader
from library.data.debug_dataset import debug_dataset
from library.errors import UserError

RECT = (10, 8, 40, 30)  # left, top, right, bottom of the white shape in a 96x64 image


def draw(size: tuple[int, int], rect: tuple[int, int, int, int], background: int) -> Image.Image:
    w, h = size
    arr = np.full((h, w, 3), background, dtype=np.uint8)
    left, top, right, bottom = rect
    arr[top:bottom, left:right] = 255
    return Image.fromarray(arr)


def make_pair(
    root: Path,
    name: str,
    size: tuple[int, int] = (96, 64),
    rect: tuple[int, int, int, int] = RECT,
    cond_size: tuple[int, int] | None = None,
    ext: str = ".png",
    cond_ext: str = ".png",
    caption: str | None = "a photo",
) -> None:
    img_dir, cond_dir = root / "img", root / "cond"
    img_dir.mkdir(parents=True, exist_ok=True)
    cond_dir.mkdir(parents=True, exist_ok=True)
    draw(size, rect, 40).save(img_dir / f"{name}{ext}")
    cw, ch = cond_size or size
    sx, sy = cw / size[0], ch / size[1]
    crect = (round(rect[0] * sx), round(rect[1] * sy), round(rect[2] * sx), round(rect[3] * sy))
    draw((cw, ch), crect, 0).save(cond_dir / f"{name}{cond_ext}")
    if caption is not None:
        (img_dir / f"{name}.caption").write_text(caption, encoding="utf-8")


def subset(root: Path, **kw) -> SubsetConfig:
    return SubsetConfig(image_dir=root / "img", conditioning_data_dir=root / "cond", **kw)


def config(root: Path, subset_kw: dict | None = None, **kw) -> DatasetConfig:
    base = dict(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    base.update(kw)
    return DatasetConfig(subsets=(subset(root, **(subset_kw or {})),), **base)


# ----------------------------------------------------------------------------- pairing and checks


def test_pairing_errors_are_listed(tmp_path):
    for i in range(3):
        make_pair(tmp_path, f"{i:04d}", ext=".jpg", cond_ext=".png")  # extensions may differ
    draw((96, 64), RECT, 40).save(tmp_path / "img" / "lonely_image.png")
    draw((96, 64), RECT, 0).save(tmp_path / "cond" / "lonely_cond.webp")
    with pytest.raises(UserError) as e:
        LLLiteDataset([config(tmp_path)])
    msg = str(e.value)
    assert "1 training image(s)" in msg and "lonely_image.png" in msg
    assert "1 conditioning image(s)" in msg and "lonely_cond.webp" in msg
    (tmp_path / "img" / "lonely_image.png").unlink()
    (tmp_path / "cond" / "lonely_cond.webp").unlink()
    assert len(LLLiteDataset([config(tmp_path)]).items) == 3


def test_corrupt_and_truncated_images_are_reported_by_path(tmp_path):
    make_pair(tmp_path, "good")
    make_pair(tmp_path, "trunc")
    make_pair(tmp_path, "garbage")
    (tmp_path / "img" / "garbage.png").write_bytes(b"not an image at all")
    data = (tmp_path / "cond" / "trunc.png").read_bytes()
    (tmp_path / "cond" / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        LLLiteDataset([config(tmp_path)])
    msg = str(e.value)
    assert "2 image(s) cannot be read" in msg
    assert str(tmp_path / "img" / "garbage.png") in msg and str(tmp_path / "cond" / "trunc.png") in msg
    assert "good.png" not in msg


def test_empty_dir_and_ambiguous_basenames(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "cond").mkdir()
    with pytest.raises(UserError, match="contains no images"):
        LLLiteDataset([config(tmp_path)])
    make_pair(tmp_path, "a")
    draw((96, 64), RECT, 40).save(tmp_path / "img" / "a.jpg")
    with pytest.raises(UserError, match="ambiguous"):
        LLLiteDataset([config(tmp_path)])


def test_missing_captions_give_one_warning_with_count(tmp_path, caplog):
    make_pair(tmp_path, "a", caption=None)
    make_pair(tmp_path, "b", caption=None)
    make_pair(tmp_path, "c", caption="with caption")
    with caplog.at_level(logging.WARNING, logger="library.data.dataset"):
        ds = LLLiteDataset([config(tmp_path)])
    warnings = [r for r in caplog.records if "no caption" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("2 image(s)")
    assert sorted(i.caption for i in ds.items) == ["", "", "with caption"]


def test_captions_with_the_other_extension_are_named_in_the_warning(tmp_path, caplog):
    """The default is sd-scripts' .caption; a dataset captioned in .txt is told which key to set."""
    make_pair(tmp_path, "a", caption=None)
    (tmp_path / "img" / "a.txt").write_text("a red box", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="library.data.dataset"):
        LLLiteDataset([config(tmp_path)])
    assert [r.getMessage() for r in caplog.records] == [
        '1 image(s) have no caption and train with an empty caption: a.png (a.txt is there: set caption_extension = '
        '".txt"; the default is ".caption", as in sd-scripts)']


def test_cache_info_file_is_written_and_reused(tmp_path):
    make_pair(tmp_path, "a")
    LLLiteDataset([config(tmp_path, subset_kw={"cache_info": True})])
    assert (tmp_path / "img" / ".lllite_image_info.json").is_file()
    ds = LLLiteDataset([config(tmp_path, subset_kw={"cache_info": True})])
    assert ds.items[0].image_size == (96, 64)


# ----------------------------------------------------------------------------- alignment


def masks(batch: dict, key: str) -> np.ndarray:
    return (batch[key].mean(dim=1) > 0).numpy()


def expected_mask(item, top: int, left_reported: int, flipped: bool) -> np.ndarray:
    """The white rectangle cut where the batch says it was cut (left is mirrored when flipped)."""
    mask = draw(item.image_size, RECT, 0).resize(item.resized, Image.Resampling.NEAREST)
    arr = np.asarray(mask)[..., 0] > 127
    if flipped:
        arr = arr[:, ::-1]
    bw, bh = item.bucket
    return arr[top : top + bh, left_reported : left_reported + bw]


@pytest.mark.parametrize("enable_bucket", [True, False])  # without buckets: 96x64 -> 72x48, cropped to 48x48
@pytest.mark.parametrize("random_crop", [False, True])
def test_image_and_conditioning_stay_aligned(tmp_path, random_crop, enable_bucket):
    make_pair(tmp_path, "same")
    make_pair(tmp_path, "smallcond", cond_size=(48, 32))  # conditioning of another size is resized first
    cfg = config(
        tmp_path,
        subset_kw={"flip_aug": True, "random_crop": random_crop, "num_repeats": 6},
        batch_size=4,
        enable_bucket=enable_bucket,
        resolution=(64, 64) if enable_bucket else (48, 48),
    )
    ds = LLLiteDataset([cfg], seed=3)
    by_path = {str(i.image_path): i for i in ds.items}
    seen_flips, seen_crops = set(), set()
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        for b in range(len(ds)):
            batch = ds[b]
            img_m, cond_m = masks(batch, "images"), masks(batch, "conditioning_images")
            for s, path in enumerate(batch["image_paths"]):
                item = by_path[path]
                top, left = batch["crop_top_lefts"][s].tolist()
                flipped = bool(batch["flipped"][s])
                seen_flips.add(flipped)
                seen_crops.add((top, left))
                assert (img_m[s] != cond_m[s]).mean() < 0.03
                assert (img_m[s] != expected_mask(item, top, left, flipped)).mean() < 0.03
                assert batch["original_sizes_hw"][s].tolist() == [64, 96]
                assert batch["target_sizes_hw"][s].tolist() == [item.bucket[1], item.bucket[0]]
    assert seen_flips == {False, True}
    if random_crop:
        assert len(seen_crops) > 2
    elif enable_bucket:
        assert seen_crops == {crop_position((80, 53), (80, 48))}
    else:
        assert seen_crops == {(0, 12)}  # centered; the mirrored left of a centered crop is the same


def test_no_bucket_mode_resizes_and_crops_to_resolution(tmp_path):
    make_pair(tmp_path, "a")
    ds = LLLiteDataset([config(tmp_path, enable_bucket=False, resolution=(48, 48))])
    batch = ds[0]
    assert batch["images"].shape == (1, 3, 48, 48) and batch["conditioning_images"].shape == (1, 3, 48, 48)
    assert batch["crop_top_lefts"][0].tolist() == [0, (72 - 48) // 2]  # 96x64 -> 72x48, centered
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert (masks(batch, "images") != masks(batch, "conditioning_images")).mean() < 0.03


# ----------------------------------------------------------------------------- buckets


def test_bucket_assignment():
    plan = BucketPlan((64, 64), True, 32, 128, 16)
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 for w, h in plan.buckets)
    wide = plan.select((200, 100))
    assert wide[0] > wide[1]
    tall = plan.select((100, 200))
    assert tall == (wide[1], wide[0])
    assert plan.select((50, 50)) == (64, 64)
    assert (64, 64) in make_buckets((64, 64), 32, 128, 16)


def test_bucket_no_upscale():
    plan = BucketPlan((64, 64), True, 32, 128, 16, no_upscale=True)
    assert plan.select((40, 24)) == (32, 16)  # rounded down, never enlarged
    big = plan.select((256, 128))
    assert big[0] * big[1] <= 64 * 64 and big[0] > big[1]
    assert resized_size((40, 24), (32, 16)) == (32, 19)


def test_batches_come_from_one_bucket_and_datasets_combine(tmp_path):
    for i in range(3):
        make_pair(tmp_path / "wide", f"w{i}", size=(96, 48), rect=(4, 4, 20, 20))
        make_pair(tmp_path / "tall", f"t{i}", size=(48, 96), rect=(4, 4, 20, 20))
    ds_a = DatasetConfig(
        subsets=(subset(tmp_path / "wide", num_repeats=2), subset(tmp_path / "tall")),
        resolution=(64, 64), batch_size=2, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
    )
    ds_b = DatasetConfig(subsets=(subset(tmp_path / "tall"),), resolution=(32, 32), batch_size=3, network_multiplier=0.5)
    ds = LLLiteDataset([ds_a, ds_b])
    # dataset a: 6 wide samples -> 3 batches, 3 tall -> 2 batches; dataset b: 3 samples -> 1 batch
    assert len(ds) == 6 and ds.num_samples == 12
    total = 0
    for b in range(len(ds)):
        batch = ds[b]
        assert len(set(map(tuple, batch["target_sizes_hw"].tolist()))) == 1
        assert batch["images"].shape[2:] == tuple(batch["target_sizes_hw"][0].tolist())
        mult = batch["network_multipliers"]
        assert mult.shape == (len(batch["captions"]),) and len(set(mult.tolist())) == 1
        if mult[0] == 0.5:
            assert batch["images"].shape[2:] == (32, 32)
        total += len(batch["captions"])
    assert total == 12


# ----------------------------------------------------------------------------- captions


class Opts:
    caption_extension = ".txt"
    shuffle_caption = False
    caption_separator = ","
    keep_tokens = 0
    keep_tokens_separator = ""
    secondary_separator = ""
    enable_wildcard = False
    token_warmup_min = 1
    token_warmup_step = 0.0
    caption_prefix = ""
    caption_suffix = ""
    caption_dropout_rate = 0.0
    caption_dropout_every_n_epochs = 0
    caption_tag_dropout_rate = 0.0

    def __init__(self, **kw):
        self.__dict__.update(kw)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_keep_tokens_and_shuffle():
    caption = "sks, girl, red hair, smile, outdoors, hat"
    opts = Opts(shuffle_caption=True, keep_tokens=2)
    results = {process_caption(caption, opts, rng(s)) for s in range(20)}
    assert len(results) > 1
    for r in results:
        tags = r.split(", ")
        assert tags[:2] == ["sks", "girl"] and sorted(tags[2:]) == sorted(["red hair", "smile", "outdoors", "hat"])
    assert process_caption(caption, opts, rng(5)) == process_caption(caption, opts, rng(5))


def test_keep_tokens_separator():
    opts = Opts(shuffle_caption=True, keep_tokens_separator="|||")
    for s in range(10):
        tags = process_caption("sks, style ||| a, b, c ||| end", opts, rng(s)).split(", ")
        assert tags[:2] == ["sks", "style"] and tags[-1] == "end" and sorted(tags[2:5]) == ["a", "b", "c"]
    assert process_caption("x ||| y", Opts(keep_tokens_separator="|||"), rng()) == "x, y"


def test_prefix_suffix_and_dropout():
    opts = Opts(caption_prefix="masterpiece, ", caption_suffix="high quality")
    assert process_caption("a cat", opts, rng()) == "masterpiece, a cat, high quality"
    assert process_caption("a cat", Opts(caption_dropout_rate=1.0), rng()) == ""
    assert process_caption("a, b, c", Opts(caption_tag_dropout_rate=1.0, keep_tokens=1), rng()) == "a"
    every = Opts(caption_dropout_every_n_epochs=2)
    assert process_caption("a cat", every, rng(), epoch=1) == "a cat"
    assert process_caption("a cat", every, rng(), epoch=2) == ""


def test_caption_options_in_batches(tmp_path):
    make_pair(tmp_path, "a", caption="one, two, three")
    ds = LLLiteDataset([config(tmp_path, subset_kw={"caption_prefix": "sks", "caption_dropout_rate": 1.0})])
    assert ds[0]["captions"] == [""]
    ds = LLLiteDataset([config(tmp_path, subset_kw={"caption_prefix": "sks", "caption_suffix": "end"})])
    assert ds[0]["captions"] == ["sks, one, two, three, end"]


# ----------------------------------------------------------------------------- order


def order(ds: LLLiteDataset, epoch: int) -> list:
    return [s.samples for s in ds.batches_for_epoch(epoch)]


def test_order_is_deterministic_per_seed(tmp_path):
    for i in range(8):
        make_pair(tmp_path, f"{i}")
    cfg = [config(tmp_path, batch_size=2, subset_kw={"num_repeats": 2})]
    a, b, c = LLLiteDataset(cfg, seed=1), LLLiteDataset(cfg, seed=1), LLLiteDataset(cfg, seed=2)
    assert order(a, 1) == order(b, 1)
    assert order(a, 1) != order(c, 1)
    assert order(a, 1) != order(a, 2)
    a.set_epoch(2)
    b.set_epoch(2)
    assert a[0]["image_paths"] == b[0]["image_paths"]
    assert torch.equal(a[0]["flipped"], b[0]["flipped"])
    loaded = [batch["image_paths"] for batch in create_dataloader(a)]
    assert loaded == [a.get_batch(i)["image_paths"] for i in range(len(a))]
    assert len(loaded) == len(a) == 8


# ----------------------------------------------------------------------------- debug tool


def test_debug_dataset_writes_panels(tmp_path):
    make_pair(tmp_path, "a", caption="a red box")
    out = debug_dataset(LLLiteDataset([config(tmp_path)]), tmp_path / "debug", num_batches=2)
    assert len(out) == 1
    panel = Image.open(out[0])
    assert panel.size == (3 * 80, 48)
    sidecar = out[0].with_suffix(".txt").read_text()
    assert "a red box" in sidecar and "80x48" in sidecar


def test_persistent_workers_follow_set_epoch(tmp_path):
    for i in range(4):
        make_pair(tmp_path, f"{i}")
    ds = LLLiteDataset([config(tmp_path, batch_size=2)], seed=1)
    loader = create_dataloader(ds, num_workers=1, persistent_workers=True)
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        got = [batch["image_paths"] for batch in loader]
        assert got == [ds.get_batch(i, epoch=epoch)["image_paths"] for i in range(len(ds))]
