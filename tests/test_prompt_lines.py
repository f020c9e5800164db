"""Prompt lines (--from_file, --interactive, --sample_prompts) and prompt files."""

from __future__ import annotations

import json
import logging

import pytest

from library.errors import UserError
from library.prompt_lines import PromptSpec, load_prompt_file, parse_prompt_line


def test_reference_example():
    spec = parse_prompt_line("a girl standing in a classroom --n lowres, bad hands --w 1024 --h 1024 --d 42 --s 28 --l 7")
    assert spec == PromptSpec(
        prompt="a girl standing in a classroom",
        negative_prompt="lowres, bad hands",
        width=1024, height=1024, seeds=[42], steps=28, scale=7.0,
    )
    assert spec.seed == 42


def test_every_option():
    line = ("a cat (sitting:1.2) --n blurry, ugly --w 832 --h 1216 --s 30 --d 1,2, 3 --l 6.5 --nl 1.5"
            " --t 0.6 --ow 2048 --oh 2048 --ct 16 --cl 32 --am 0.8, 1.0 --ss euler_a --cn guide.png")
    s = parse_prompt_line(line)
    assert s.prompt == "a cat (sitting:1.2)"
    assert s.negative_prompt == "blurry, ugly"
    assert (s.width, s.height, s.steps) == (832, 1216, 30)
    assert s.seeds == [1, 2, 3] and s.seed == 1
    assert (s.scale, s.negative_scale, s.strength) == (6.5, 1.5, 0.6)
    assert (s.original_width, s.original_height, s.crop_top, s.crop_left) == (2048, 2048, 16, 32)
    assert s.network_multipliers == [0.8, 1.0]
    assert s.sampler == "euler_a"
    assert s.guide_images == ["guide.png"]
    assert isinstance(s.width, int) and isinstance(s.scale, float)


def test_defaults_are_none():
    s = parse_prompt_line("  just a prompt  ")
    assert s.prompt == "just a prompt"
    assert all(getattr(s, f) is None for f in PromptSpec.__dataclass_fields__ if f != "prompt")
    assert s.seed is None


def test_guide_images_comma_and_repeated():
    s = parse_prompt_line("x --cn a.png, b.png --cn dir/c d.png")
    assert s.guide_images == ["a.png", "b.png", "dir/c d.png"]


def test_later_option_wins_and_leading_options():
    assert parse_prompt_line("x --w 512 --w 768").width == 768
    s = parse_prompt_line("--n bad --w 512")
    assert s.prompt == "" and s.negative_prompt == "bad" and s.width == 512
    assert parse_prompt_line("a--b c --w 64").prompt == "a--b c"  # '--' without a space before is text


def test_unknown_option_warns_and_is_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="library.prompt_lines"):
        s = parse_prompt_line("a dog --zz 3 --W 512 --h 640")
    assert s.prompt == "a dog" and s.height == 640 and s.width is None
    text = caplog.text
    assert "--zz" in text
    assert "--W" in text and "did you mean --w" in text  # names are case-sensitive


def test_bad_values_warn_and_are_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="library.prompt_lines"):
        s = parse_prompt_line("a --w abc --h -5 --d 1,x --l nan --t 1.5 --s 20 --am")
    assert (s.width, s.height, s.seeds, s.scale, s.strength, s.network_multipliers) == (None,) * 6
    assert s.steps == 20
    for piece in ("--w", "'abc'", "--h", "'-5'", "--d", "'1,x'", "--l", "--t", "--am"):
        assert piece in caplog.text, piece


def test_txt_file(tmp_path, caplog):
    f = tmp_path / "prompts.txt"
    f.write_text("# a comment\n\nfirst prompt --w 512\n   \n  # indented comment\nsecond --d 7 --bogus 1\n",
                 encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        specs = load_prompt_file(f)
    assert [s.prompt for s in specs] == ["first prompt", "second"]
    assert specs[0].width == 512 and specs[1].seeds == [7]
    assert "prompts.txt line 6" in caplog.text and "--bogus" in caplog.text


def test_toml_file_list_and_subset(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(
        'prompt = [\n'
        '  { prompt = "a cat", negative_prompt = "bad", width = 1024, height = 768, sample_steps = 20,'
        ' scale = 7, seed = 42, sampler = "euler", guide_image = "g.png" },\n'
        '  { prompt = "a dog", w = 512, h = 512, steps = 10, d = [1, 2], controlnet_image = ["a.png", "b.png"] },\n'
        ']\n', encoding="utf-8")
    a, b = load_prompt_file(f)
    assert a == PromptSpec(prompt="a cat", negative_prompt="bad", width=1024, height=768, steps=20,
                           scale=7.0, seeds=[42], sampler="euler", guide_images=["g.png"])
    assert (b.prompt, b.width, b.height, b.steps, b.seeds, b.guide_images) == (
        "a dog", 512, 512, 10, [1, 2], ["a.png", "b.png"])

    g = tmp_path / "tables.toml"
    g.write_text('[[prompt]]\nprompt = "one"\nwidth = 640\n\n[[prompt]]\nprompt = "two"\n', encoding="utf-8")
    assert [(s.prompt, s.width) for s in load_prompt_file(g)] == [("one", 640), ("two", None)]

    h = tmp_path / "subset.toml"
    h.write_text('[prompt]\nwidth = 1024\nscale = 5\n\n[[prompt.subset]]\nprompt = "x"\n\n'
                 '[[prompt.subset]]\nprompt = "y"\nwidth = 512\n', encoding="utf-8")
    x, y = load_prompt_file(h)
    assert (x.prompt, x.width, x.scale, y.prompt, y.width, y.scale) == ("x", 1024, 5.0, "y", 512, 5.0)


def test_json_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([
        {"prompt": "a cat", "negative_prompt": "bad", "width": 1024, "height": 1024, "steps": 25,
         "scale": 6.5, "seed": 3, "sampler": "ddim", "controlnet_image": "c.png"},
        {"prompt": "short names", "n": "x", "s": 12, "l": 4, "d": "5,6", "cn": "a.png,b.png"},
        "a line --w 256",
    ]), encoding="utf-8")
    a, b, c = load_prompt_file(f)
    assert a == PromptSpec(prompt="a cat", negative_prompt="bad", width=1024, height=1024, steps=25,
                           scale=6.5, seeds=[3], sampler="ddim", guide_images=["c.png"])
    assert (b.negative_prompt, b.steps, b.scale, b.seeds, b.guide_images) == ("x", 12, 4.0, [5, 6], ["a.png", "b.png"])
    assert (c.prompt, c.width) == ("a line", 256)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.txt")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('prompt = [ { prompt = "x" ', encoding="utf-8")
    with pytest.raises(UserError, match="syntax error.*bad.toml"):
        load_prompt_file(bad_toml)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"prompt": "x",}]', encoding="utf-8")
    with pytest.raises(UserError, match="syntax error.*bad.json"):
        load_prompt_file(bad_json)
    no_prompt = tmp_path / "np.json"
    no_prompt.write_text('[{"width": 512}]', encoding="utf-8")
    with pytest.raises(UserError, match="'prompt'"):
        load_prompt_file(no_prompt)
    wrong_shape = tmp_path / "shape.json"
    wrong_shape.write_text('{"prompts": []}', encoding="utf-8")
    with pytest.raises(UserError, match="shape.json"):
        load_prompt_file(wrong_shape)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only comments\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="no prompts"):
        load_prompt_file(empty)
