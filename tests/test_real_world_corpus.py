"""Real users' inputs run here: the corpus of tests/data/real_world (issue #24, item 3).

Every item is a file someone else published (sd-scripts' docs, the kohya_ss GUI, SD-Trainer, GitHub
issues), kept byte for byte. index.toml says where it comes from, how its paths map onto the tiny
fixtures, how it is cut down, and what must happen: it runs, or it stops with exit code 2 and a
message, for a reason written there. The scripts' ``main`` runs in this process.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.errors import run_cli
from tests.conftest import make_shape_dataset
from tests.gen_helpers import make_gen_files, stdin_lines

CORPUS = Path(__file__).resolve().parent / "data" / "real_world"
INDEX = tomllib.loads((CORPUS / "index.toml").read_text(encoding="utf-8"))["item"]
ITEMS = {item["id"]: item for item in INDEX}
KINDS = {"train_config", "dataset_toml", "train_command", "gen_command", "prompt_file", "sample_prompts"}
PLACEHOLDER = re.compile(r"\{(\w+)\}")


# ----------------------------------------------------------------------------------------------
# Fixtures and mapping
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    """The tiny files every item's paths are mapped to."""
    d = tmp_path_factory.mktemp("real_world")
    files = make_gen_files(d)
    dataset = make_shape_dataset(d / "data", n=4, size=64)
    files.update(images=str(d / "data" / "images"), cond=str(d / "data" / "conditioning"), dataset=str(dataset),
                 lllite=files["lllite1"], guide=files["guide0"])
    emb = load_file(files["emb"])
    torch.save(emb, d / "negprompt.pt")
    files["emb_pt"] = str(d / "negprompt.pt")
    meta = {p.stem: {"caption": "a red square"} for p in sorted((d / "data" / "images").glob("*.png"))}
    (d / "metadata.json").write_text(json.dumps(meta))
    files["metadata"] = str(d / "metadata.json")
    return {k: Path(v).as_posix() for k, v in files.items()}


def fill(text: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def replace_all(text: str, table: dict, values: dict[str, str]) -> str:
    for old, new in table.items():
        assert old in text, f"{old!r} is not in the item"
        text = text.replace(old, fill(new, values))
    return text


OPTION_CUTS = {"train_config", "train_command", "gen_command"}  # cut = option values; other kinds: text replacements


def text_cuts(item: dict) -> dict:
    return {} if item["kind"] in OPTION_CUTS else item.get("cut", {})


def option_cuts(item: dict) -> dict:
    return item.get("cut", {}) if item["kind"] in OPTION_CUTS else {}


def set_options(argv: list[str], table: dict, values: dict[str, str]) -> list[str]:
    """Replace each option's values (or add the option) as `table` says."""
    argv = list(argv)
    for option, new in table.items():
        new = [fill(v, values) for v in (new if isinstance(new, list) else [new])]
        hits = [i for i, a in enumerate(argv) if a == option or a.startswith(option + "=")]
        if not hits:
            argv += [option, *new]
            continue
        i = hits[0]
        if argv[i].startswith(option + "="):
            argv[i:i + 1] = [option, *new]
            continue
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        argv[i + 1:j] = new
    return argv


def split_command(text: str) -> list[str]:
    """The arguments after the script (the first .py word), split as a shell does (backslash-newline joins lines)."""
    words = shlex.split(text.replace("\\\n", "").replace("\n", " "))
    return words[next(i for i, w in enumerate(words) if w.endswith(".py")) + 1:]


def item_text(item: dict) -> str:
    return (CORPUS / item["file"]).read_text(encoding="utf-8")


def build_argv(item: dict, files: dict[str, str], tmp: Path) -> tuple[str, list[str]]:
    """The entry script ('train' or 'gen') and its arguments for one mapped, cut-down item."""
    values = {**files, "out": (tmp / "out").as_posix(), "tmp": tmp.as_posix()}
    if "prompts" in item:
        other = ITEMS[item["prompts"]]
        path = tmp / "prompts.txt"
        path.write_text(replace_all(replace_all(item_text(other), other.get("map", {}), values), text_cuts(other), values),
                        encoding="utf-8")
        values["prompts"] = path.as_posix()
    kind = item["kind"]
    text = replace_all(item_text(item), item.get("map", {}), values)
    args = [fill(a, values) for a in item.get("args", [])]
    steps = ["--max_train_steps", str(item["steps"])] if "steps" in item else []
    train_base = ["--pretrained_model_name_or_path", files["ckpt"], "--output_dir", values["out"],
                  "--network_dim", "4", "--cond_emb_dim", "4"]
    if kind in ("train_command", "gen_command"):
        argv = [a for a in split_command(text) if a not in item.get("override", {}).get("drop", [])]
        argv = set_options(argv + args, {**item.get("set", {}), **option_cuts(item)}, values)
        return ("train" if kind == "train_command" else "gen"), argv + steps
    text = replace_all(text, text_cuts(item), values)
    path = tmp / ("item.toml" if item["file"].endswith(".toml") else "item.txt")
    path.write_text(text, encoding="utf-8")
    if kind == "train_config":
        return "train", set_options(["--config_file", path.as_posix()] + args, option_cuts(item), values) + steps
    if kind == "dataset_toml":
        return "train", train_base + ["--dataset_config", path.as_posix()] + args + steps
    if kind == "sample_prompts":
        return "train", train_base + ["--dataset_config", files["dataset"], "--sample_prompts", path.as_posix(),
                                      "--sample_every_n_steps", "1"] + args + steps
    return "gen", ["--ckpt", files["ckpt"], "--outdir", values["out"], "--from_file", path.as_posix()] + args


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def run_entry(script: str, argv: list[str], capsys, stdin: str | None) -> tuple[int, str]:
    """The entry script's main() in this process, wrapped like the script: (exit code, stderr)."""
    if script == "train":
        import sdxl_train_control_net_lllite as module
    else:
        import sdxl_gen_img as module
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each run makes its own Accelerator, as a new process would
    code = 0
    try:
        if stdin is None:
            run_cli(lambda: module.main(argv))
        else:
            with stdin_lines(stdin):
                run_cli(lambda: module.main(argv))
    except SystemExit as e:
        code = e.code or 0
    finally:
        AcceleratorState._reset_state(True)
    return code, capsys.readouterr().err


def _params():
    out = []
    for item in INDEX:
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=item["today"])] if "today" in item else []
        out.append(pytest.param(item["id"], id=f"{item['id']}-{Path(item['file']).stem[3:]}", marks=marks))
    return out


@pytest.mark.parametrize("item_id", _params())
def test_real_world_item(item_id, fixtures, tmp_path, capsys):
    item = ITEMS[item_id]
    script, argv = build_argv(item, fixtures, tmp_path)
    code, err = run_entry(script, argv, capsys, item.get("stdin"))
    if item["expect"] == "runs":
        assert code == 0 and "Traceback" not in err, f"exit code {code}; argv {argv}\n{err[-3000:]}"
        pattern = "*.safetensors" if script == "train" else "*.png"
        written = list((tmp_path / "out").rglob(pattern))
        assert written, f"no {pattern} written\n{err[-3000:]}"
        if "size" in item:
            assert {"%dx%d" % Image.open(p).size for p in written} == {item["size"]}
    else:
        assert code == 2, f"exit code {code}; argv {argv}\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        assert fill(item["message"], {**fixtures, "tmp": tmp_path.as_posix()}) in err, err[-3000:]


def test_index_is_complete():
    """At least 25 items, each with its file, a source, a known kind and a decided outcome; no copies of one file."""
    assert len(INDEX) >= 25
    assert len(ITEMS) == len(INDEX), "duplicate ids"
    files = {p.name for p in CORPUS.iterdir()} - {"index.toml"}
    texts = [(CORPUS / item["file"]).read_bytes() for item in INDEX]
    assert len(set(texts)) == len(texts), "two items hold the same text"
    assert files == {item["file"] for item in INDEX}, "every file in the corpus has an index entry, and back"
    for item in INDEX:
        assert item["kind"] in KINDS, item["id"]
        src = item["source"]
        assert ("repo" in src and "path" in src and re.fullmatch(r"[0-9a-f]{40}", src["commit"])) or \
            src.get("url", "").startswith("https://"), item["id"]
        assert item["expect"] in ("runs", "fails"), item["id"]
        if item["expect"] == "fails":
            assert item.get("message") and item.get("reason"), item["id"]
        if "today" in item:
            assert item["today"].startswith("issue 24: ") and item.get("today_error"), item["id"]
        assert item.get("what"), item["id"]
