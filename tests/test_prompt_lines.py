"""Prompt lines (--from_file, --interactive, --sample_prompts) and prompt files."""

from __future__ import annotations

import json

import pytest

from library.errors import UserError
from library.generation.prompt_lines import (
    PromptSpec,
    load_prompt_file,
    parse_prompt_line,
)
from library.generation.requests import Unsharp


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
    assert all(getattr(s, f) is None for f in PromptSpec.__dataclass_fields__ if f not in ("prompt", "where"))
    assert s.seed is None


def test_guide_images_comma_and_repeated():
    s = parse_prompt_line("x --cn a.png, b.png --cn dir/c d.png")
    assert s.guide_images == ["a.png", "b.png", "dir/c d.png"]


def test_later_option_wins_and_leading_options():
    assert parse_prompt_line("x --w 512 --w 768").width == 768
    s = parse_prompt_line("--n bad --w 512")
    assert s.prompt == "" and s.negative_prompt == "bad" and s.width == 512
    assert parse_prompt_line("a--b c --w 64").prompt == "a--b c"  # '--' without a space before is text


def test_option_names_are_case_insensitive_as_in_sd_scripts():
    s = parse_prompt_line("a dog --W 512 --H 640 --N ugly --DSD1 3")
    assert (s.prompt, s.width, s.height, s.negative_prompt, s.ds_depth_1) == ("a dog", 512, 640, "ugly", 3)


def test_unknown_option_is_an_error_naming_the_line_and_a_close_name():
    with pytest.raises(UserError, match=r"^p.txt line 2: unknown prompt option --ww \(did you mean --w\?\)"):
        parse_prompt_line("a dog --ww 3", "p.txt line 2")
    with pytest.raises(UserError, match="unknown prompt option --zz;"):
        parse_prompt_line("a dog --zz 3")
    with pytest.raises(UserError, match="an empty option"):
        parse_prompt_line("a dog --  --w 3")


@pytest.mark.parametrize("line, message", [
    ("a --w abc", "--w 'abc' is not valid (not a whole number); it is the width"),
    ("a --h 1.5", "--h '1.5' is not valid (not a whole number)"),
    ("a --d 1,x", "--d '1,x' is not valid (not a whole number)"),
    ("a --d -3", "--d -3 is out of range: it must be at least 0"),
    ("a --l nan", "--l 'nan' is not valid (not a finite number)"),
    ("a --t 1.5", "--t 1.5 is out of range: it must be above 0 and at most 1"),
    ("a --s 0", "--s 0 is out of range: it must be at least 1"),
    ("a --am", "--am '' is not valid (empty list)"),
    ("a --ct -1", "--ct -1 is out of range: it must be at least 0"),
    ("a --ow 0", "--ow 0 is out of range: it must be at least 1"),
    ("a --dsd1 9", "--dsd1 9 is out of range: it must be at least 0 and at most 8"),
    ("a --dst1 1001", "--dst1 1001 is out of range: it must be at least 0 and at most 1000"),
    ("a --dsr 1", "--dsr 1 is out of range: it must be above 0 and below 1"),
    ("a --glr 0", "--glr 0 is out of range: it must be above 0 and below 1"),
    ("a --gls 1.5", "--gls 1.5 is out of range: it must be above 0 and at most 1"),
    ("a --gle 0", "--gle 0 is out of range: it must be at least 1"),
    ("a --glsn -1", "--glsn -1 is out of range: it must be at least 0"),
    ("a --glus 4,1,1", "--glus '4,1,1' is not valid (give ksize,sigma,strength[,target_x] with an odd ksize"),
    ("a --ss warp", "--ss 'warp': unknown sampler 'warp'"),
    ("a --cn ,", "--cn ',' is not valid (empty list)"),
])
def test_bad_values_are_errors_naming_line_option_and_value(line, message):
    with pytest.raises(UserError) as e:
        parse_prompt_line(line, "f.txt line 4")
    assert str(e.value).startswith("f.txt line 4: ") and message in str(e.value), str(e.value)


def test_new_reference_options_parse():
    s = parse_prompt_line("x --c a photo --nw 512 --nh 768 --dsd1 2 --dst1 700 --dsd2 4 --dst2 300 --dsr 0.6 "
                          "--glt 800 --glr 0.25 --gle 2 --gls 0.25 --glsn 0.9 --glus 3,0.5,0.5,0 --nl none")
    assert (s.clip_prompt, s.original_width_negative, s.original_height_negative) == ("a photo", 512, 768)
    assert (s.ds_depth_1, s.ds_timesteps_1, s.ds_depth_2, s.ds_timesteps_2, s.ds_ratio) == (2, 700, 4, 300, 0.6)
    assert (s.gl_timesteps, s.gl_ratio, s.gl_every_n_steps, s.gl_ratio_step, s.gl_s_noise) == (800, 0.25, 2, 0.25, 0.9)
    assert s.gl_unsharp == Unsharp(3, 0.5, 0.5, False) and s.negative_scale == "none"


def test_txt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# a comment\n\nfirst prompt --w 512\n   \n  # indented comment\nsecond --d 7\n", encoding="utf-8")
    specs = load_prompt_file(f)
    assert [s.prompt for s in specs] == ["first prompt", "second"]
    assert specs[0].width == 512 and specs[1].seeds == [7]
    assert specs[1].where == f"{f} line 6"
    f.write_text("first\nsecond --bogus 1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"prompts.txt line 2: unknown prompt option --bogus"):
        load_prompt_file(f)


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
