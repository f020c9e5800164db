"""sdxl_gen_img.py's parser defaults are sd-scripts' ones, or differ for a reason written beside them.

tests/data/sd_scripts_gen_defaults.toml lists every option of sd-scripts' sdxl_gen_img.py with its
default there (written by tools/reference_defaults.py from sd-scripts' source). An option whose
default here differs carries this project's default and the reason; any other difference fails.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from library.generation.options import MAX_EMBEDDINGS_MULTIPLES, SIZE, build_parser, resolve
from tools.reference_defaults import reference_defaults, to_toml

DATA = Path(__file__).resolve().parent / "data"
TABLE = tomllib.loads((DATA / "sd_scripts_gen_defaults.toml").read_text(encoding="utf-8"))["option"]
REFERENCE_OPTIONS = [n.strip().removeprefix("--") for n in (DATA / "sd_scripts_sdxl_gen_img_options.txt").read_text().split()]


def test_the_table_lists_every_reference_option_once():
    assert sorted(o["name"] for o in TABLE) == sorted(REFERENCE_OPTIONS)


@pytest.mark.parametrize("option", TABLE, ids=[o["name"] for o in TABLE])
def test_default_is_the_reference_one_or_explained(option):
    ours = repr(build_parser().get_default(option["name"]))
    if "here" in option:
        assert option["reason"].strip(), option["name"]
        assert option["here"] != option["sd_scripts"], f"{option['name']}: the same default needs no reason"
        assert ours == option["here"], f"--{option['name']}: {ours} here, not the {option['here']} the table explains"
    else:
        assert ours == option["sd_scripts"], (f"--{option['name']}: {ours} here, {option['sd_scripts']} in sd-scripts, "
                                              "and no reason in sd_scripts_gen_defaults.toml")


def test_unset_defaults_resolve_to_what_sd_scripts_uses(tmp_path):
    """--W/--H unset draw at 1024 (txt2img) and --max_embeddings_multiples unset is 1 chunk of 75 tokens, as there."""
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(b"x")
    request = resolve(build_parser().parse_args(["--ckpt", str(ckpt), "--prompt", "x"])).defaults
    assert (request.width, request.height, request.max_embeddings_multiples) == (SIZE, SIZE, MAX_EMBEDDINGS_MULTIPLES)
    assert (SIZE, MAX_EMBEDDINGS_MULTIPLES) == (1024, 1)
    assert (request.sampler, request.steps, request.scale) == ("ddim", 50, 7.5)


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
    table = tomllib.loads(to_toml(found, {"steps": {"here": "30", "reason": "why"}}, "# header"))["option"]
    assert table[-1] == {"name": "steps", "sd_scripts": "50", "here": "30", "reason": "why"}
