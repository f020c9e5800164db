"""Reading and validating dataset TOMLs and the no-TOML command-line mode."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from library.data.dataset_config import (
    DatasetConfig,
    build_dataset_configs,
    config_from_args,
    dataset_options_from_args,
    load_dataset_config,
)
from library.errors import UserError


@pytest.fixture()
def dirs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("img_a", "cond_a", "img_b", "cond_b"):
        out[name] = tmp_path / name
        out[name].mkdir()
    return out


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return path


def two_subsets(dirs: dict[str, Path], extra_subset_1: str = "", extra_dataset: str = "", general: str = "") -> str:
    return f"""
[general]
{general}

[[datasets]]
{extra_dataset}

  [[datasets.subsets]]
  image_dir = "{dirs['img_a'].as_posix()}"
  conditioning_data_dir = "{dirs['cond_a'].as_posix()}"

  [[datasets.subsets]]
  image_dir = "{dirs['img_b'].as_posix()}"
  conditioning_data_dir = "{dirs['cond_b'].as_posix()}"
  {extra_subset_1}
"""


def test_precedence_subset_beats_dataset_beats_general(tmp_path, dirs):
    path = write_toml(
        tmp_path,
        two_subsets(
            dirs,
            extra_subset_1='caption_extension = ".cap"\nnum_repeats = 3',
            extra_dataset='caption_extension = ".ds"\nresolution = [96, 64]\nbatch_size = 2',
            general='caption_extension = ".gen"\nshuffle_caption = true\nenable_bucket = true\n'
            "min_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16",
        ),
    )
    (ds,) = load_dataset_config(path)
    assert isinstance(ds, DatasetConfig)
    assert ds.resolution == (96, 64) and ds.batch_size == 2 and ds.enable_bucket and ds.bucket_reso_steps == 16
    a, b = ds.subsets
    assert a.caption_extension == ".ds" and b.caption_extension == ".cap"
    assert a.num_repeats == 1 and b.num_repeats == 3
    assert a.shuffle_caption and b.shuffle_caption
    assert a.image_dir == dirs["img_a"].resolve()


def test_defaults(tmp_path, dirs):
    (ds,) = load_dataset_config(write_toml(tmp_path, two_subsets(dirs)))
    assert ds.resolution == (1024, 1024) and ds.batch_size == 1 and not ds.enable_bucket
    assert (ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps) == (256, 1024, 64)
    sub = ds.subsets[0]
    assert sub.caption_extension == ".caption" and sub.caption_separator == "," and sub.num_repeats == 1


def test_cli_defaults_apply_only_where_toml_is_silent(tmp_path, dirs):
    path = write_toml(tmp_path, two_subsets(dirs, extra_dataset="batch_size = 3"))
    (ds,) = load_dataset_config(path, {"resolution": "512,256", "batch_size": 8, "flip_aug": True})
    assert ds.resolution == (512, 256)
    assert ds.batch_size == 3  # the TOML wins
    assert all(s.flip_aug for s in ds.subsets)


def test_typo_names_key_section_file_and_suggestion(tmp_path, dirs):
    path = write_toml(tmp_path, two_subsets(dirs, extra_subset_1='caption_extention = ".txt"'))
    with pytest.raises(UserError) as e:
        load_dataset_config(path)
    msg = str(e.value)
    assert "caption_extention" in msg and "datasets[0].subsets[1]" in msg and str(path) in msg
    assert 'did you mean "caption_extension"' in msg


def test_typo_in_general_and_unknown_top_level(tmp_path, dirs):
    path = write_toml(tmp_path, "[genral]\n" + two_subsets(dirs, general="batch_sise = 2"))
    with pytest.raises(UserError) as e:
        load_dataset_config(path)
    msg = str(e.value)
    assert '"genral"' in msg and 'did you mean "general"' in msg
    assert "[general]" in msg and 'did you mean "batch_size"' in msg


def test_dataset_key_in_subset_is_explained(tmp_path, dirs):
    path = write_toml(tmp_path, two_subsets(dirs, extra_subset_1="resolution = 512"))
    with pytest.raises(UserError, match=r"datasets\[0\]\.subsets\[1\].*resolution.*dataset key"):
        load_dataset_config(path)


@pytest.mark.parametrize(
    "line, expected",
    [
        ('num_repeats = "3"', 'num_repeats must be an integer, got the string "3"'),
        ('flip_aug = "yes"', "flip_aug must be true or false"),
        ("caption_extension = 5", "caption_extension must be a string"),
        # ranges in cli.Limit's one wording, as for options
        ("caption_dropout_rate = 1.5", "caption_dropout_rate 1.5 is out of range: it must be at least 0 and at most 1"),
        ("num_repeats = 0", "num_repeats 0 is out of range: it must be at least 1"),
    ],
)
def test_wrong_types_and_ranges(tmp_path, dirs, line, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        load_dataset_config(write_toml(tmp_path, two_subsets(dirs, extra_subset_1=line)))


def test_bad_resolution_and_steps(tmp_path, dirs):
    path = write_toml(tmp_path, two_subsets(dirs, extra_dataset='resolution = "1024"\nbucket_reso_steps = 12'))
    with pytest.raises(UserError) as e:
        load_dataset_config(path)
    assert "resolution must be an integer or a list" in str(e.value)
    assert "bucket_reso_steps must be a positive multiple of 8" in str(e.value)


def test_missing_required_keys_and_dirs(tmp_path, dirs):
    text = f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{dirs['img_a'].as_posix()}"
  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'nope').as_posix()}"
  conditioning_data_dir = "{dirs['cond_b'].as_posix()}"
"""
    with pytest.raises(UserError) as e:
        load_dataset_config(write_toml(tmp_path, text))
    msg = str(e.value)
    assert "datasets[0].subsets[0]: conditioning_data_dir is missing" in msg
    assert "datasets[0].subsets[1]" in msg and "nope" in msg and "does not exist" in msg


def test_no_datasets_and_single_bracket_datasets(tmp_path, dirs):
    with pytest.raises(UserError, match=r"no \[\[datasets\]\]"):
        load_dataset_config(write_toml(tmp_path, "[general]\nflip_aug = true\n"))
    with pytest.raises(UserError, match=r"write \[\[datasets\]\], not \[datasets\]"):
        load_dataset_config(write_toml(tmp_path, "[datasets]\nbatch_size = 1\n"))


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write_toml(tmp_path, "[general]\nflip_aug = true\nbatch_size = = 2\n")
    with pytest.raises(UserError) as e:
        load_dataset_config(path)
    assert str(path) in str(e.value) and "line 3" in str(e.value)


def test_relative_paths_resolve_from_toml_folder(tmp_path, dirs, monkeypatch):
    monkeypatch.chdir(dirs["img_b"])  # somewhere the relative paths do not exist
    path = write_toml(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img_a"\nconditioning_data_dir = "cond_a"\n')
    (ds,) = load_dataset_config(path)
    assert ds.subsets[0].conditioning_data_dir == dirs["cond_a"].resolve()


def cli_args(**kw) -> argparse.Namespace:
    base = dict(
        dataset_config=None, train_data_dir=None, conditioning_data_dir=None, resolution=None, train_batch_size=None,
        caption_extension=None, enable_bucket=False, flip_aug=False, keep_tokens=None,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_no_toml_mode(dirs):
    args = cli_args(
        train_data_dir=str(dirs["img_a"]), conditioning_data_dir=str(dirs["cond_a"]), resolution="96,64",
        train_batch_size=4, caption_extension=".caption", enable_bucket=True, keep_tokens=2,
        min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
    )
    (ds,) = config_from_args(args)
    assert ds.resolution == (96, 64) and ds.batch_size == 4 and ds.enable_bucket
    (sub,) = ds.subsets
    assert sub.caption_extension == ".caption" and sub.keep_tokens == 2 and sub.image_dir == dirs["img_a"].resolve()
    assert build_dataset_configs(args) == [ds]


def test_no_toml_mode_errors(dirs, tmp_path):
    with pytest.raises(UserError, match="--conditioning_data_dir is required"):
        config_from_args(cli_args(train_data_dir=str(dirs["img_a"])))
    with pytest.raises(UserError, match="--num_repeats"):
        config_from_args(cli_args(train_data_dir=str(dirs["img_a"]), conditioning_data_dir=str(dirs["cond_a"]), num_repeats="x"))
    toml = write_toml(tmp_path, two_subsets(dirs))
    with pytest.raises(UserError, match="cannot be combined with --dataset_config"):
        build_dataset_configs(cli_args(dataset_config=str(toml), train_data_dir=str(dirs["img_a"])))
    assert len(build_dataset_configs(cli_args(dataset_config=str(toml)))) == 1


def test_dataset_options_from_args_skips_none():
    opts = dataset_options_from_args(cli_args(train_batch_size=2, resolution="512"))
    assert opts == {"batch_size": 2, "resolution": "512", "enable_bucket": False, "flip_aug": False}
