"""Dataset options of issue #13: how they are given and checked, and what they do to a batch."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from library.data.dataset_config import (
    DatasetConfig,
    SubsetConfig,
    build_dataset_configs,
    load_dataset_config,
)
from library.data.dataset import LLLiteDataset, to_tensor
from library.errors import UserError
from library.training.options import parse_args
from tests.test_dataset import make_pair


def configs(*argv: str) -> list[DatasetConfig]:
    _, args = parse_args(["--pretrained_model_name_or_path", "x", *argv])
    return build_dataset_configs(args)


def folders(root: Path) -> list[str]:
    make_pair(root, "a")
    return ["--train_data_dir", str(root / "img"), "--conditioning_data_dir", str(root / "cond")]


# ----------------------------------------------------------------------------- options


def test_command_line_options_reach_the_subset(tmp_path):
    (sub,) = configs(*folders(tmp_path), "--caption_extention", ".cap", "--caption_prefix", "sks", "--caption_suffix", "end",
                     "--secondary_separator", ";;;", "--enable_wildcard", "--caption_dropout_every_n_epochs", "3",
                     "--caption_tag_dropout_rate", "0.2", "--token_warmup_min", "2", "--token_warmup_step", "0.5",
                     "--color_aug", "--random_crop", "--face_crop_aug_range", "2,4", "--resize_interpolation", "box",
                     "--alpha_mask", "--cache_info", "--dataset_repeats", "3")[0].subsets
    assert (sub.caption_extension, sub.caption_prefix, sub.caption_suffix, sub.secondary_separator) == (".cap", "sks", "end", ";;;")
    assert sub.enable_wildcard and sub.color_aug and sub.random_crop and sub.alpha_mask and sub.cache_info
    assert (sub.caption_dropout_every_n_epochs, sub.caption_tag_dropout_rate) == (3, 0.2)
    assert (sub.token_warmup_min, sub.token_warmup_step, sub.face_crop_aug_range) == (2, 0.5, (2.0, 4.0))
    assert (sub.resize_interpolation, sub.num_repeats) == ("box", 3)
    with pytest.raises(UserError, match="--caption_extention .cap and --caption_extension .txt set the same thing"):
        configs(*folders(tmp_path), "--caption_extension", ".txt", "--caption_extention", ".cap")


@pytest.mark.parametrize("argv, message", [
    (["--resize_interpolation", "bilinearr"], 'resize_interpolation = "bilinearr" is not one of lanczos, nearest'),
    (["--face_crop_aug_range", "4,2"], "face_crop_aug_range must be [low, high] with 0 < low <= high"),
    (["--face_crop_aug_range", "2"], "face_crop_aug_range must be a list of two numbers"),
    (["--face_crop_aug_range", "2,4", "--enable_bucket"], "face_crop_aug_range applies without bucketing only"),
    (["--token_warmup_step", "-1"], "token_warmup_step -1 is out of range: it must be at least 0"),
    (["--conditioning_preprocessor", "cany"], 'conditioning_preprocessor = "cany" is not one of canny, blur, lineart, gray; did you mean "canny"'),
    (["--conditioning_preprocessor", "canny", "--conditioning_preprocessor_args", "sigma=2"], "'canny' does not take sigma"),
    (["--conditioning_preprocessor", "canny", "--conditioning_preprocessor_args", "low=300", "high=100"], "swap them"),
    (["--conditioning_preprocessor_args", "low=1"], "conditioning_preprocessor_args is set but conditioning_preprocessor is not"),
    (["--in_json", "missing.json"], 'metadata_file = "missing.json": the file does not exist'),
])
def test_bad_values_are_named(tmp_path, argv, message):
    with pytest.raises(UserError) as e:
        configs(*folders(tmp_path), *argv)
    assert message in str(e.value)


def test_dataset_toml_keys(tmp_path):
    make_pair(tmp_path, "a")
    (tmp_path / "meta.json").write_text("{}")
    toml = tmp_path / "ds.toml"
    toml.write_text(f"""
[general]
resize_interpolation = "area"

[[datasets]]
resolution = 64

  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'img').as_posix()}"
  conditioning_preprocessor = "canny"
  conditioning_preprocessor_args = {{ low = 50, high = 150 }}
  face_crop_aug_range = [1.5, 3]
  metadata_file = "meta.json"
  alpha_mask = true
  token_warmup_step = 4
""")
    (ds,) = load_dataset_config(toml, {"secondary_separator": "|"})
    sub = ds.subsets[0]
    assert sub.conditioning_data_dir is None and sub.conditioning_preprocessor == "canny"
    assert sub.preprocessor_options == {"low_threshold": 50, "high_threshold": 150}  # the short names
    assert sub.face_crop_aug_range == (1.5, 3.0) and sub.metadata_file == (tmp_path / "meta.json").resolve()
    assert (sub.resize_interpolation, sub.secondary_separator, sub.alpha_mask, sub.token_warmup_step) == ("area", "|", True, 4.0)
    toml.write_text(toml.read_text().replace('  conditioning_preprocessor = "canny"\n', ""))
    with pytest.raises(UserError, match="conditioning_data_dir is missing.*conditioning_preprocessor"):
        load_dataset_config(toml)


# ----------------------------------------------------------------------------- in_json


def test_in_json_captions_with_conditioning_images(tmp_path):
    for name in ("a", "b", "c"):
        make_pair(tmp_path, name, caption=f"file caption {name}")
    meta = {"a": {"caption": "json a", "tags": "red"}, str(tmp_path / "img" / "b.png"): {"tags": "blue"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfgs = configs("--train_data_dir", str(tmp_path / "img"), "--conditioning_data_dir", str(tmp_path / "cond"),
                   "--in_json", str(tmp_path / "meta.json"), "--dataset_repeats", "2", "--resolution", "64")
    ds = LLLiteDataset(cfgs)
    assert sorted((i.image_path.name, i.conditioning_path.name, i.caption) for i in ds.items) == [
        ("a.png", "a.png", "json a,red"), ("b.png", "b.png", "blue")]  # c is not listed, caption files unused
    assert ds.num_samples == 4
    meta["d"] = {"caption": "no such image"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="1 image\\(s\\) listed in metadata_file .* are not found.*: d"):
        LLLiteDataset(cfgs)


# ----------------------------------------------------------------------------- resize filters


def test_resize_interpolation_for_images_and_conditioning(tmp_path):
    make_pair(tmp_path, "a")  # 96x64 -> 72x48, centre crop 48x48 at left 12
    img = np.asarray(Image.open(tmp_path / "img" / "a.png"))
    cond = np.asarray(Image.open(tmp_path / "cond" / "a.png"))

    def batch(interpolation):
        sub = SubsetConfig(image_dir=tmp_path / "img", conditioning_data_dir=tmp_path / "cond",
                           resize_interpolation=interpolation)
        return LLLiteDataset([DatasetConfig(subsets=(sub,), resolution=(48, 48))])[0]

    def cut(arr):
        return to_tensor(arr[:, 12:60])

    default, nearest = batch(None), batch("nearest")
    lanczos = np.asarray(Image.fromarray(img).resize((72, 48), Image.Resampling.LANCZOS))
    assert torch.equal(default["images"][0], cut(lanczos))
    # conditioning images default to area averaging: edges shrink without ringing
    assert torch.equal(default["conditioning_images"][0], cut(cv2.resize(cond, (72, 48), interpolation=cv2.INTER_AREA)))
    exact = cv2.resize(img, (72, 48), interpolation=cv2.INTER_NEAREST_EXACT)
    assert torch.equal(nearest["images"][0], cut(exact))
    assert torch.equal(nearest["conditioning_images"][0], cut(cv2.resize(cond, (72, 48), interpolation=cv2.INTER_NEAREST_EXACT)))


# ----------------------------------------------------------------------------- face crop


def test_face_crop_keeps_the_face_and_the_guide_aligned(tmp_path):
    # a 200x160 image whose "face" is a white 24x24 square centred at (150, 40)
    rect = (138, 28, 162, 52)
    for root in (tmp_path,):
        make_pair(root, "p_150_40_24_24", size=(200, 160), rect=rect, caption=None)
    (tmp_path / "img" / "p.caption").write_text("a face", encoding="utf-8")
    sub = SubsetConfig(image_dir=tmp_path / "img", conditioning_data_dir=tmp_path / "cond",
                       face_crop_aug_range=(2.0, 3.0), flip_aug=True, num_repeats=8)
    ds = LLLiteDataset([DatasetConfig(subsets=(sub,), resolution=(64, 64), batch_size=8)], seed=1)
    crops = set()
    for epoch in (1, 2):
        batch = ds.get_batch(0, epoch=epoch)
        assert batch["captions"] == ["a face"] * 8  # name.caption serves name_cx_cy_w_h.png
        img_m = (batch["images"].mean(1) > 0).numpy()
        cond_m = (batch["conditioning_images"].mean(1) > 0).numpy()
        for s in range(8):
            face_side = np.sqrt(img_m[s].sum())
            assert 64 / 3 - 2 <= face_side <= 64 / 2 + 2  # the crop's side is 2..3 face sizes
            ys, xs = np.nonzero(img_m[s])
            assert abs(ys.mean() - 32) < 4 and abs(xs.mean() - 32) < 4  # centred on the face (small jitter)
            assert (img_m[s] != cond_m[s]).mean() < 0.02
            crops.add(tuple(batch["crop_top_lefts"][s].tolist()))
    assert len(crops) > 2  # the scale is drawn per sample and epoch


# ----------------------------------------------------------------------------- token warmup steps


def test_token_warmup_follows_the_training_step(tmp_path):
    for i in range(8):
        make_pair(tmp_path, f"{i}", caption="a, b, c, d, e, f, g, h, i")
    sub = SubsetConfig(image_dir=tmp_path / "img", conditioning_data_dir=tmp_path / "cond", token_warmup_step=0.5)
    ds = LLLiteDataset([DatasetConfig(subsets=(sub,), resolution=(32, 32), batch_size=2)])
    assert len(ds) == 4
    ds.set_step_schedule(batches_per_step=2, max_train_steps=8)  # 2 steps per epoch, warmup over 4 steps
    assert [ds.step_of(e, i) for e in (1, 2, 3) for i in range(4)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    counts = [len(ds.get_batch(i, epoch=e)["captions"][0].split(", ")) for e in (1, 2, 3) for i in (0, 2)]
    assert counts == [1, 3, 5, 7, 9, 9]  # floor(step * (9 - 1) / 4) + 1, then all
