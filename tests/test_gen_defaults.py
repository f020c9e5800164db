"""sdxl_gen_img.py's parser defaults are sd-scripts' ones, or differ for a reason written beside them.

tests/data/sd_scripts_gen_defaults.toml holds every option of sd-scripts' sdxl_gen_img.py with its
default there (written by tools/reference_defaults.py from sd-scripts' source) and, in
[explained], why a default here differs. tests/test_defaults.py compares them all (and keeps
docs/defaults.md current); here: the facts are complete, the defaults the issue named are
sd-scripts' ones, the unset ones resolve as there, and the tool reads source without running it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from library.generation.options import MAX_EMBEDDINGS_MULTIPLES, SIZE, build_parser, resolve
from tools.reference_defaults import reference_defaults, to_toml

DATA = Path(__file__).resolve().parent / "data"
FACTS = tomllib.loads((DATA / "sd_scripts_gen_defaults.toml").read_text(encoding="utf-8"))
REFERENCE_OPTIONS = [n.strip().removeprefix("--") for n in (DATA / "sd_scripts_sdxl_gen_img_options.txt").read_text().split()]


def test_the_facts_list_every_reference_option_once():
    assert sorted(FACTS["options"]) == sorted(REFERENCE_OPTIONS)
    assert set(FACTS["explained"]) <= set(FACTS["options"])


def test_the_defaults_the_issue_named_are_sd_scripts_ones():
    parser = build_parser()
    for name in ("sampler", "scale", "steps", "max_embeddings_multiples", "W", "H"):
        assert repr(parser.get_default(name)) == FACTS["options"][name] and name not in FACTS["explained"], name


def test_unset_defaults_resolve_to_what_sd_scripts_uses(tmp_path):
    """--W/--H unset draw at 1024 (txt2img) and --max_embeddings_multiples unset is 1 chunk of 75 tokens, as there."""
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(b"x")
    request = resolve(build_parser().parse_args(["--ckpt", str(ckpt), "--prompt", "x"])).defaults
    assert (request.width, request.height, request.max_embeddings_multiples) == (SIZE, SIZE, MAX_EMBEDDINGS_MULTIPLES)
    assert (SIZE, MAX_EMBEDDINGS_MULTIPLES) == (1024, 1)
    assert (request.sampler, request.steps, request.scale) == ("ddim", 50, 7.5)


def test_the_resolved_default_request_is_read_only(tmp_path):
    """Every prompt line starts from the options' request: a line's values make a new request, never change it."""
    from library.generation.prompt_lines import parse_prompt_line
    from library.generation.requests import request_from_prompt_spec

    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(b"x")
    opts = resolve(build_parser().parse_args(["--ckpt", str(ckpt), "--prompt", "x", "--steps", "20"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.defaults.steps = 30
    line = request_from_prompt_spec(parse_prompt_line("a cat --s 12 --dsd1 2"), opts.defaults)
    assert (line.steps, line.deep_shrink.depth_1, line.deep_shrink.timesteps_1) == (12, 2, 650)
    assert (opts.defaults.steps, opts.defaults.deep_shrink.enabled) == (20, False)


def test_the_tool_reads_defaults_from_source_without_running_it(tmp_path):
    source = tmp_path / "ref.py"
    source.write_text(
        "import nothing_here\n"
        "def setup_parser():\n"
        "    p.add_argument('--steps', type=int, default=50)\n"
        "    p.add_argument('--fp16', action='store_true')\n"
        "    p.add_argument('--names', nargs='*')\n"
        "    p.add_argument('--sampler', default=SAMPLERS[0])\n"
    )
    found = reference_defaults(source, "setup_parser")
    assert found == {"steps": "50", "fp16": "False", "names": "None", "sampler": "SAMPLERS[0]"}
    facts = tomllib.loads(to_toml(found, {"steps": "why", "gone": "an option sd-scripts no longer has"}, "# header"))
    assert facts == {"options": found, "explained": {"steps": "why"}}
