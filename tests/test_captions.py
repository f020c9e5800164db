"""Caption options of issue #13: separators, wildcards, token warmup, metadata JSON, and what reaches the encoder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import library.training.loop as training
from library.data.captions import (
    face_info_from_name,
    metadata_caption,
    process_caption,
    read_caption,
    read_metadata_file,
)
from library.data.dataset_config import SubsetConfig
from library.errors import UserError
from library.sdxl.text_encoding import TextEncodingOptions
from library.training import loss as dl


def opts(**kw) -> SubsetConfig:
    return SubsetConfig(image_dir=Path("."), **kw)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_secondary_separator_keeps_joined_tags_together():
    o = opts(shuffle_caption=True, secondary_separator=";;;")
    results = {process_caption("a, red hair;;;long hair, b, c", o, rng(s)) for s in range(30)}
    assert len(results) > 3
    for r in results:
        tags = r.split(", ")
        assert sorted(tags) == ["a", "b", "c", "long hair", "red hair"]
        assert tags.index("long hair") == tags.index("red hair") + 1  # moved as one tag
    assert process_caption("x;;;y", opts(secondary_separator=";;;"), rng()) == "x, y"  # replaced without shuffle too


def test_wildcards_and_lines():
    o = opts(enable_wildcard=True)
    got = {process_caption("a {red|blue|green} {{box}}", o, rng(s)) for s in range(40)}
    assert got == {"a red {box}", "a blue {box}", "a green {box}"}
    lines = {process_caption("first line\nsecond line", o, rng(s)) for s in range(20)}
    assert lines == {"first line", "second line"}
    # without the option braces are text and the lines of a file are joined
    assert process_caption("a {red|blue}\nmore", opts(), rng()) == "a {red|blue} more"


def test_token_warmup_grows_with_the_step():
    o = opts(token_warmup_step=10, token_warmup_min=1, keep_tokens=1)
    caption = "sks, a, b, c, d, e"  # one fixed tag, five others

    def tags(step, total=None):
        return process_caption(caption, o, rng(), step=step, max_train_steps=total).split(", ")

    assert tags(0) == ["sks", "a"]
    assert tags(5) == ["sks", "a", "b", "c"]  # floor(5 * (5 - 1) / 10) + 1 = 3 of the five
    assert tags(10) == tags(None) == ["sks", "a", "b", "c", "d", "e"]
    frac = opts(token_warmup_step=0.5, token_warmup_min=2)  # half of a 20-step run
    assert len(process_caption(caption, frac, rng(), step=0, max_train_steps=20).split(", ")) == 2
    assert len(process_caption(caption, frac, rng(), step=10, max_train_steps=20).split(", ")) == 6
    # the run's length unknown (debug_dataset): no warmup rather than a guess
    assert len(process_caption(caption, frac, rng(), step=0).split(", ")) == 6


def test_face_names_and_caption_fallback(tmp_path):
    assert face_info_from_name(Path("girl_40_30_20_24.png")) == (40, 30, 20, 24)
    assert face_info_from_name(Path("a_b_c_d_e.png")) is None and face_info_from_name(Path("x_0_1_2_3.png")) is None
    image = tmp_path / "girl_40_30_20_24.png"
    (tmp_path / "girl.txt").write_text("one girl\nsmiling", encoding="utf-8")
    assert read_caption(image, ".txt") is None
    assert read_caption(image, ".txt", face_name_fallback=True) == "one girl\nsmiling"


def test_metadata_files(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"a": {"caption": "a photo", "tags": "red, box"}, "b": {"tags": "blue"}}))
    data = read_metadata_file(path)
    assert metadata_caption(data["a"], ",", False) == "a photo,red, box"
    assert metadata_caption(data["b"], ",", False) == "blue"
    assert metadata_caption({"caption": "one\ntwo", "tags": "t"}, ",", True) == "one,t\ntwo,t"
    lines = tmp_path / "meta.jsonl"
    lines.write_text('{"image_path": "a.png", "caption": "x"}\n\n{"image_path": "b.png", "tags": "y"}\n')
    assert {k: metadata_caption(v, ",", False) for k, v in read_metadata_file(lines).items()} == {"a.png": "x", "b.png": "y"}
    path.write_text('{"a": {"caption": 3}}')
    with pytest.raises(UserError, match='"caption" of a must be a string'):
        read_metadata_file(path)
    path.write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        read_metadata_file(path)


def test_text_encoding_options_checked():
    def resolve(**kw):
        ns = argparse.Namespace(max_token_length=None, clip_skip=None, weighted_captions=False)
        ns.__dict__.update(kw)
        return TextEncodingOptions.from_args(ns)

    assert resolve() == TextEncodingOptions(75, None, False)
    assert resolve(max_token_length=225).encode_kwargs()["max_embeddings_multiples"] == 3
    with pytest.raises(UserError, match="--max_token_length 100 is not one of 75, 150, 225"):
        resolve(max_token_length=100)
    with pytest.raises(UserError, match="--clip_skip 0 is out of range"):
        resolve(clip_skip=0)
    ids = {resolve().cache_id(), resolve(clip_skip=2).cache_id(), resolve(clip_skip=1).cache_id(),
           resolve(max_token_length=150).cache_id(), resolve(weighted_captions=True).cache_id()}
    assert len(ids) == 4  # clip_skip 2 is the default layer: the same encoding, the same id


class _Encoded(Exception):
    pass


def test_compute_loss_encodes_captions_with_the_options(monkeypatch):
    """What the trainer hands the text encoders: the processed caption and the three encoding options."""
    seen = {}

    def fake_encode(te1, te2, tok1, tok2, prompts, **kwargs):
        seen.update(prompts=prompts, **kwargs)
        raise _Encoded

    monkeypatch.setattr(training, "encode_prompts", fake_encode)
    caption = process_caption("(red:1.3) square", opts(caption_prefix="sks"), rng())
    batch = {"latents": torch.zeros(1, 4, 8, 8), "captions": [caption]}
    models = SimpleNamespace(text_encoder1=None, text_encoder2=None, tokenizer1=None, tokenizer2=None)
    encoding = TextEncodingOptions(max_token_length=150, clip_skip=1, weighted_captions=True)
    with pytest.raises(_Encoded):
        training.compute_loss(batch, models, None, None, None, dl.LossOptions(), torch.Generator(), "cpu",
                              torch.float32, encoding)
    assert seen == {"prompts": ["sks, (red:1.3) square"], "max_embeddings_multiples": 2, "clip_skip": 1,
                    "use_weighting": True}
