"""The docs as tests: every code block of README.md and docs/*.md runs, parses or says why not, and every quoted message
is produced by the code (tests/doc_blocks.py says how the docs mark their blocks and quotes).

Commands run in this process on the tiny model, in a scratch folder per doc where the paths they name are made
from fixtures by the option that names them (FIXTURE_OPTIONS), with sizes and steps cut down (CUTS).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.metadata
import json
import logging
import re
import runpy
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from library.errors import run_cli
from tests.conftest import make_shape_dataset
from tests.doc_blocks import ROOT, Block, DocError, Marker, Quote, collect, commands, doc_files
from tests.gen_helpers import make_gen_files

# What a documented path is made of, by the option (or TOML key, or prompt-line option) that names it.
FIXTURE_OPTIONS = {
    "ckpt": "checkpoint", "pretrained_model_name_or_path": "checkpoint", "checkpoint": "checkpoint",
    "control_net_lllite_models": "lllite", "lllite": "lllite",
    "textual_inversion_embeddings": "embedding",
    "guide_image_path": "image", "image_path": "image", "cn": "image", "mask_path": "mask",
    "train_data_dir": "train_images", "image_dir": "train_images", "conditioning_data_dir": "cond_images",
    "guides": "guide_folder", "fidelity_guides": "guide_folder", "sources": "source_folder",
    "config_file": "file", "dataset_config": "file", "sample_prompts": "file", "from_file": "file",
    "log_tracker_config": "file",
}
# network_weights: a LoRA for the generator, an LLLite to continue for the trainer.
SCRIPT_FIXTURES = {"sdxl_gen_img.py": {"network_weights": "lora"},
                   "sdxl_train_control_net_lllite.py": {"network_weights": "lllite"}}
# Positional paths of the tools: (index, kind); "output" folders are released when the world made them.
POSITIONALS = {"tools/make_conditioning.py": ((0, "train_images"), (1, "output")), "tools/lllite_info.py": ((0, "lllite"),)}


def _size(value: str) -> str:
    """1024 -> 64, 1536 -> 96, 2048 -> 128: the tiny model's scale, multiples of 8, at least 32 (LLLite's floor)."""
    return str(max(32, int(value) // 16 // 8 * 8))


# Sizes and steps cut down, by option, TOML key or prompt-line option.
CUTS: dict[str, Callable[[str], str]] = {
    "max_train_steps": lambda v: "2", "max_train_epochs": lambda v: "1", "steps": lambda v: "2", "s": lambda v: "2",
    "highres_fix_steps": lambda v: "2", "fidelity_steps": lambda v: "2", "max_data_loader_n_workers": lambda v: "0",
    "W": _size, "H": _size, "w": _size, "h": _size, "resolution": _size,
    "min_bucket_reso": _size, "max_bucket_reso": _size, "bucket_reso_steps": lambda v: "8",
}
# Added when a command leaves them to their defaults (1024 px and tens of steps would take minutes on the CPU),
# some only when the option they need is given: {option: (value, needs)}.
IMPLIED: dict[str, dict[str, tuple[str, str | None]]] = {
    "sdxl_gen_img.py": {"W": ("64", None), "H": ("64", None), "steps": ("2", None)},
    "tools/evaluate_control.py": {"W": ("64", None), "H": ("64", None), "steps": ("2", None)},
    # the cut resolution needs buckets to match (a dataset TOML's own values still win); loader processes cost seconds
    "sdxl_train_control_net_lllite.py": {
        "max_train_steps": ("2", None), "min_bucket_reso": ("32", None), "max_bucket_reso": ("128", None),
        "bucket_reso_steps": ("8", None), "max_data_loader_n_workers": ("0", None), "fidelity_steps": ("2", "fidelity_guides")},
}
SCRIPTS = ("sdxl_train_control_net_lllite.py", "sdxl_gen_img.py")


class CannotRun(Exception):
    """A command that cannot run here; its block must be marked parse-only with the reason."""


# ---------------------------------------------------------------------------------------------- classification


def test_every_block_and_quote_has_a_verdict():
    """Each block is run, parsed, loaded, compiled or marked with a reason; each `error: ...` quote names its trigger."""
    blocks, quotes = collect()
    verdicts, problems = Counter(), []
    for block in blocks:
        try:
            verdicts[block.verdict()] += 1
        except DocError as e:
            problems.append(str(e))
    for quote in quotes:
        if quote.marker is None:
            problems.append(f"{quote.where}: the quoted message `{quote.text[:60]}...` needs "
                            "<!-- doc-test: message trigger=NAME --> before it (a trigger of tests/test_docs.py)")
        elif quote.marker.options["trigger"] not in TRIGGERS:
            problems.append(f"{quote.where}: no trigger {quote.marker.options['trigger']!r} in tests/test_docs.py")
    assert not problems, "\n".join(problems)
    assert sum(verdicts.values()) == len(blocks) and verdicts["run"] >= 20, verdicts
    print(f"{len(blocks)} blocks: {dict(verdicts)}; {len(quotes)} quoted messages")


SAMPLE = """A prompt file and a command that uses it:

<!-- doc-test: file name=p.txt loader=prompts -->

    a cat --w 1024 --s 30

<!-- doc-test: fails "error: argument --sampler: invalid choice: 'nosuch'" -->
```bash
python sdxl_gen_img.py --ckpt m.safetensors --from_file p.txt --sampler nosuch
```

```toml
[general]
```

It says <!-- doc-test: message trigger=x figures -->`step 600 on 32 guides ... (1.92x)` and `error: boom` and `error: ...`.
"""


def test_markers_verdicts_and_quote_patterns(tmp_path):
    """The doc-test markers on a sample page: verdicts, the block left unclassified, and how a quote matches."""
    from tests.doc_blocks import blocks_and_quotes

    page = tmp_path / "sample.md"
    page.write_text(SAMPLE)
    blocks, quotes = blocks_and_quotes(page)
    assert [b.verdict() for b in blocks[:2]] == ["file", "fails"] and blocks[0].text == "a cat --w 1024 --s 30\n"
    with pytest.raises(DocError, match="neither a command nor a python snippet"):
        blocks[2].verdict()
    assert [q.text for q in quotes] == ["step 600 on 32 guides ... (1.92x)", "error: boom"]
    assert quotes[0].pattern().search("at step 2 on 2 guides: edge F1 0.044 (0.99x); more")
    assert not quotes[0].pattern().search("at step 2 on 2 images: (0.99x)")
    assert quotes[1].marker is None and quotes[1].pattern().search("error: boom") and not quotes[1].pattern().search("error: 1")
    assert map_prompt_lines("a cat --w 1024 --s 30 --d 5") == "a cat --w 64 --s 2 --d 5"
    assert map_toml('resolution = [1216, 832]  # wide\npath = "/models/x.safetensors"') == \
        'resolution = [72, 48]  # wide\npath = "models/x.safetensors"'
    page.write_text("<!-- doc-test: skip \"why\" -->\n\ntext\n")
    with pytest.raises(DocError, match="right above its block"):
        blocks_and_quotes(page)


def test_a_fails_block_must_fail_with_its_message(tmp_path, monkeypatch, capsys, doc_assets):
    """The fails marker: the run must stop with the quoted message (the sample's --sampler is refused before loading)."""
    from tests.doc_blocks import blocks_and_quotes

    page = tmp_path / "sample.md"
    page.write_text(SAMPLE)
    blocks, _ = blocks_and_quotes(page)
    monkeypatch.chdir(tmp_path)
    world = World(tmp_path, page, doc_assets, {"p.txt": [blocks[0]]}, capsys)
    run_block(world, blocks[1], "fails")
    wrong = Block(page, 1, "bash", blocks[1].text, Marker("fails", "error: something else"))
    with pytest.raises(AssertionError, match="expected the message"):
        run_block(world, wrong, "fails")


# ---------------------------------------------------------------------------------------------- the fixtures


@pytest.fixture(scope="session")
def doc_assets(tmp_path_factory) -> dict[str, Path]:
    """One of each thing a documented path can be: tiny model, LLLite, LoRA, embedding, images and folders."""
    d = tmp_path_factory.mktemp("doc_assets")
    files = {k: Path(v) for k, v in make_gen_files(d).items()}
    shapes = make_shape_dataset(d / "shapes").parent
    guides = d / "guides"
    guides.mkdir()
    for cond in sorted((shapes / "conditioning").glob("*.png"))[:2]:
        shutil.copy(cond, guides / cond.name)
        (guides / cond.name).with_suffix(".txt").write_text("a red square")
    return {"checkpoint": files["ckpt"], "lllite": files["lllite1"], "lora": files["lora"], "embedding": files["emb"],
            "image": files["guide0"], "mask": files["mask"], "train_images": shapes / "images",
            "cond_images": shapes / "conditioning", "guide_folder": guides, "source_folder": shapes / "images"}


@pytest.fixture(scope="session")
def doc_files_by_name() -> dict[str, list[Block]]:
    """The example files the docs declare, by name."""
    blocks, _ = collect()
    files: dict[str, list[Block]] = {}
    for b in blocks:
        if b.marker is not None and b.marker.kind == "file":
            files.setdefault(b.marker.options["name"], []).append(b)
    return files


def _map_value(key: str, value: str) -> str:
    value = CUTS[key](value) if key in CUTS else value
    if value.startswith("/") and not Path(value).exists():
        return value.lstrip("/")  # /models/x.safetensors: made in the scratch folder instead
    return value


def map_toml(text: str) -> str:
    """A documented TOML with CUTS applied and absolute paths made relative, comments and layout kept."""
    def line(m: re.Match) -> str:
        key, value = m.group(2), m.group(3)
        if key in CUTS:
            value = re.sub(r"\d+", lambda n: CUTS[key](n.group(0)), value)
        elif value.startswith('"/'):
            value = '"' + value[2:]
        return f"{m.group(1)}{key} = {value}{m.group(4) or ''}"

    return re.sub(r"^(\s*)(\w+)\s*=\s*(.+?)(\s+#.*)?$", line, text, flags=re.M)


def map_prompt_lines(text: str) -> str:
    return re.sub(r"--(\w+) (\S+)", lambda m: f"--{m.group(1)} {_map_value(m.group(1), m.group(2))}", text)


class World:
    """A doc's scratch folder (the current directory of its commands) and what its commands find there."""

    def __init__(self, root: Path, doc: Path, assets: dict[str, Path], files: dict[str, list[Block]], capsys):
        self.root, self.doc, self.assets, self.files, self.capsys = root, doc, assets, files, capsys
        self.made: set[Path] = set()  # paths made from fixtures (a tool's output folder made here is released)

    # -- paths

    def provide(self, kind: str, value: str) -> None:
        if kind == "output":
            path = Path(value)
            if path.resolve() in self.made:
                shutil.rmtree(path)
            return
        if kind == "file":
            self.provide_file(value)
            return
        path = Path(value)
        if path.exists():
            return
        source = self.assets[kind]
        folder = value.endswith("/") or (path.suffix == "" and kind == "image")
        path.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, path)
        elif folder:
            path.mkdir(parents=True)
            for i in range(2):
                shutil.copy(source, path / f"{i:03d}{source.suffix}")
        else:
            shutil.copy(source, path)
        self.made.add(path.resolve())

    def declared(self, name: str) -> Block:
        blocks = self.files.get(name, [])
        same_doc = [b for b in blocks if b.doc == self.doc]
        if len(same_doc) == 1 or len(blocks) == 1:
            return (same_doc or blocks)[0]
        if not blocks:
            raise DocError(f"{name} is used but no block declares it: put <!-- doc-test: file name={name} loader=... --> "
                           "above its example")
        raise DocError(f"{name} is declared in several docs ({', '.join(b.where for b in blocks)}): give them other names")

    def provide_file(self, value: str) -> None:
        path = Path(value)
        if not path.exists():
            block = self.declared(path.name)
            text = map_toml(block.text) if path.suffix == ".toml" else map_prompt_lines(block.text)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.provide_references(path)

    def provide_references(self, path: Path) -> None:
        """What a config, dataset TOML or prompt file names, made like the paths of a command line."""
        if path.suffix == ".toml":
            import tomllib

            def walk(table: dict) -> None:
                for key, value in table.items():
                    if isinstance(value, dict):
                        walk(value)
                    elif isinstance(value, list) and value and isinstance(value[0], dict):
                        for item in value:
                            walk(item)
                    elif isinstance(value, str) and key in FIXTURE_OPTIONS:
                        self.provide(FIXTURE_OPTIONS[key], value)

            walk(tomllib.loads(path.read_text()))
        else:
            for m in re.finditer(r"--cn (\S+)", path.read_text()):
                for value in m.group(1).split(","):
                    self.provide("image", value)

    def check_file(self, block: Block) -> None:
        """An example file, loaded by the product's own loader for its kind."""
        name, loader = block.marker.options["name"], block.marker.options["loader"]
        self.provide_file(name)
        if loader == "train-config":
            from library.cli import load_config_file
            from library.training.options import build_parser

            load_config_file(name, build_parser())
        elif loader == "dataset":
            from library.data.dataset_config import load_dataset_config

            buckets = {k: int(v) for k, (v, _) in IMPLIED["sdxl_train_control_net_lllite.py"].items() if "bucket" in k}
            assert load_dataset_config(name, buckets)
        elif loader == "prompts":
            from library.generation.prompt_lines import load_prompt_file

            assert load_prompt_file(name)
        elif loader == "tracker-config":
            from library.training.tracking import _read_tracker_config

            assert _read_tracker_config(name, ("tensorboard", "wandb"))

    # -- commands

    def prepare(self, script: str, argv: list[str]) -> list[str]:
        """CUTS and absolute paths applied, the named paths made, IMPLIED defaults added."""
        out, key, position = [], None, 0
        options = {**FIXTURE_OPTIONS, **SCRIPT_FIXTURES.get(script, {})}
        positionals = dict(POSITIONALS.get(script, ()))
        for word in argv:
            if word.startswith("--"):
                key = word[2:]
                out.append(word)
                continue
            if key is None:
                if position in positionals:
                    self.provide(positionals[position], word)
                position += 1
                out.append(word)
                continue
            value = _map_value(key, word)
            if key in options:
                self.provide(options[key], value)
            out.append(value)
        given = {w[2:] for w in out if w.startswith("--")}
        config = self.config_values(out)
        for k, (v, needs) in IMPLIED.get(script, {}).items():
            if k in given or k in config or (k == "max_train_steps" and "max_train_epochs" in config):
                continue
            if needs is None or needs in given or needs in config:
                out += [f"--{k}", v]
        if script.startswith("benchmarks/"):
            out.append("--tiny")
        return out

    @staticmethod
    def config_values(argv: list[str]) -> dict:
        import tomllib

        if "--config_file" in argv and "--output_config" not in argv:
            return tomllib.loads(Path(argv[argv.index("--config_file") + 1]).read_text())
        return {}

    def run(self, words: list[str]) -> tuple[int, str]:
        """One command of a block: (exit code, what it printed)."""
        program = words[0]
        if program in ("python", "python3") and words[1:2] == ["-m"]:
            raise CannotRun(f"python -m {words[2]} (an environment or the whole suite)")
        if program in (".", "source"):
            raise CannotRun("activates a venv")
        if program == "pip":
            check_pip(words, run=True)
            return 0, ""
        if program == "echo":
            text, target = words[1:words.index(">")], words[words.index(">") + 1]
            Path(target).write_text(map_prompt_lines(" ".join(text)) + "\n")
            return 0, ""
        if program == "tensorboard":
            logdir = Path(words[words.index("--logdir") + 1])
            assert list(logdir.rglob("events.out.tfevents.*")), f"no TensorBoard events under {logdir}"
            return 0, ""
        script, argv = script_and_args(words)
        if script == "tools/demo.py":
            raise CannotRun("the full demo takes 6 minutes (tests/test_demo.py runs a short one)")
        if script == "tools/lock.py" and argv[:1] == ["refresh"]:
            raise CannotRun("builds a venv with the newest releases and runs the whole suite")
        if "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda") and not torch.cuda.is_available():
            raise CannotRun("needs a CUDA GPU")
        argv = self.prepare(script, argv)
        return call_main(script, argv, self.capsys)

    def parse(self, words: list[str]) -> None:
        """A command that cannot run here: its options parsed by the script's real parser (and checked, where the
        script checks them before loading anything)."""
        program = words[0]
        if program == "pip":
            check_pip(words, run=False)
            return
        if program in ("python", "python3") and words[1:2] == ["-m"] or program in (".", "source", "echo", "tensorboard"):
            return
        script, argv = script_and_args(words, parse=True)
        argv = self.prepare(script, argv)
        if script.startswith("benchmarks/"):
            argv = [a for a in argv if a != "--tiny"]
        parse_command(script, argv)


def script_and_args(words: list[str], parse: bool = False) -> tuple[str, list[str]]:
    if words[0] == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        assert words[1] == "launch", words
        launch = launch_command_parser().parse_args(words[2:])
        if not parse and (launch.multi_gpu or (launch.num_processes or 1) > 1 or (launch.num_machines or 1) > 1):
            raise CannotRun("several GPUs or machines")
        return launch.training_script, list(launch.training_script_args)
    assert words[0] in ("python", "python3"), f"not a command this test knows: {' '.join(words)}"
    return words[1], words[2:]


def check_pip(words: list[str], run: bool) -> None:
    """The files a pip line names exist, its pins are the lock's, and (to run) what it names is installed."""
    lock = dict(line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    lock = {k.lower(): v for k, v in lock.items()}
    i, packages = 2, []
    while i < len(words):
        w = words[i]
        if w in ("-r", "-c") and words[i + 1] == "<(":  # -c <(grep -v '^torch==' requirements.lock)
            end = words.index(")", i)
            assert (ROOT / words[end - 1]).is_file(), words[end - 1]
            i = end + 1
        elif w in ("-r", "-c"):
            assert (ROOT / words[i + 1]).is_file(), f"{words[i + 1]} does not exist"
            i += 2
        elif w == "--index-url":
            i += 2
        else:
            packages.append(w)
            i += 1
    for spec in packages:
        name, _, pin = spec.partition("==")
        if pin:
            assert lock.get(name.lower(), "").split("+")[0] == pin, f"pip pins {spec}, requirements.lock has {lock.get(name.lower())}"
        if run:
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                raise CannotRun(f"installs {name}, which this environment does not have") from None
            assert not pin or installed.split("+")[0] == pin, f"{name} {installed} is installed, the doc pins {pin}"


@functools.lru_cache(maxsize=None)
def script_module(script: str) -> dict:
    """A script's globals (its main and build_parser), loaded once; the entry scripts are imported as modules."""
    if script in SCRIPTS:
        return vars(importlib.import_module(script[:-3]))
    return runpy.run_path(str(ROOT / script), run_name=f"doc_test_{Path(script).stem}")


def call_main(script: str, argv: list[str], capsys) -> tuple[int, str]:
    from accelerate.state import AcceleratorState

    main = script_module(script)["main"]
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(True)  # each run makes its own Accelerator, as a new process would
    code = 0
    try:
        result = run_cli(lambda: main(argv))
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)  # a benchmark's --threads must not slow down the rest of the suite
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def parse_command(script: str, argv: list[str]) -> None:
    if script == "sdxl_train_control_net_lllite.py":
        from library.training.options import parse_training_options

        parse_training_options(argv)
    elif script == "sdxl_gen_img.py":
        import sdxl_gen_img
        from library.generation.options import build_parser, resolve

        sdxl_gen_img.plan(resolve(build_parser("").parse_args(argv)))
    else:
        module = script_module(script)
        assert "build_parser" in module, f"{script} has no build_parser() to parse its documented options with"
        module["build_parser"]().parse_args(argv)


def check_python(block: Block) -> None:
    """A python snippet compiles and every name it imports exists."""
    tree = ast.parse(block.text)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{node.module} has no {', '.join(missing)}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                importlib.import_module(a.name)


def run_block(world: World, block: Block, verdict: str) -> None:
    words_list = commands(block.text)
    if verdict == "parse-only":
        for words in words_list:
            world.parse(words)
        return
    for n, words in enumerate(words_list):
        try:
            code, printed = world.run(words)
        except CannotRun as e:
            raise DocError(f"`{' '.join(words)[:80]}` cannot run here ({e}): mark the block "
                           '<!-- doc-test: parse-only "why" -->') from None
        last = n == len(words_list) - 1
        if verdict == "fails" and last:
            assert code != 0, f"`{' '.join(words)[:80]}` was documented to fail but exited 0"
            assert " ".join(block.marker.text.split()) in " ".join(printed.split()), \
                f"expected the message {block.marker.text!r}, got:\n{printed[-2000:]}"
        else:
            assert code == 0, f"`{' '.join(words)[:100]}` exited {code}:\n{printed[-3000:]}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_doc_blocks(doc, tmp_path, monkeypatch, capsys, doc_assets, doc_files_by_name):
    """Every block of one doc, in order, in one scratch folder: a later command finds what an earlier one wrote."""
    blocks = [b for b in collect()[0] if b.doc == doc]
    world = World(tmp_path, doc, doc_assets, doc_files_by_name, capsys)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmark scripts import their common module
    problems, seconds = [], {}
    for block in blocks:
        start = time.perf_counter()
        try:
            verdict = block.verdict()
            if verdict == "file":
                world.check_file(block)
            elif verdict == "python":
                check_python(block)
            elif verdict in ("run", "fails", "parse-only"):
                run_block(world, block, verdict)
        except Exception as e:  # every block is reported, not only the first that fails
            problems.append(f"{block.where}: {type(e).__name__}: {e}")
        seconds[block.where] = time.perf_counter() - start
    print("seconds per block:", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    assert not problems, "\n\n".join(problems)


# ---------------------------------------------------------------------------------------------- quoted messages


TRIGGERS: dict[str, Callable] = {}


def trigger(fn: Callable) -> Callable:
    TRIGGERS[fn.__name__] = fn
    return fn


def _train_options(tmp: Path, ckpt: Path, **extra) -> list[str]:
    dataset = make_shape_dataset(tmp / "data")
    opts = {"pretrained_model_name_or_path": ckpt, "dataset_config": dataset, "output_dir": "out", "output_name": "lllite",
            "network_dim": 8, "cond_emb_dim": 8, "learning_rate": 1e-3, "max_train_steps": 2, "seed": 42, **extra}
    argv = []
    for k, v in opts.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


@trigger
def unknown_config_key(tmp, assets, capsys, monkeypatch) -> str:
    Path("train.toml").write_text('learning_rte = 1e-4\n')
    return call_main("sdxl_train_control_net_lllite.py", ["--config_file", "train.toml"], capsys)[1]


@trigger
def unknown_dataset_key(tmp, assets, capsys, monkeypatch) -> str:
    argv = _train_options(tmp, assets["checkpoint"])
    dataset = Path(argv[argv.index("--dataset_config") + 1])
    dataset.write_text(dataset.read_text().replace("conditioning_data_dir", 'caption_extention = ".txt"\n  conditioning_data_dir'))
    return call_main("sdxl_train_control_net_lllite.py", argv, capsys)[1]


@trigger
def resume_cut_short(tmp, assets, capsys, monkeypatch) -> str:
    """A state copied short, with a complete older state of the same run beside it."""
    from library.training.states import write_state_record

    for step in (200, 400):
        state = Path(f"out/lllite-step{step:08d}-state")
        state.mkdir(parents=True)
        torch.save({"x": torch.arange(20000)}, state / "optimizer.bin")
        (state / "scheduler.bin").write_bytes(b"s" * 100)
        write_state_record(state, {"global_step": step, "epoch": 1, "batches_in_epoch": step})
    cut = Path("out/lllite-step00000400-state/optimizer.bin")
    cut.write_bytes(cut.read_bytes()[:20000])
    return call_main("sdxl_train_control_net_lllite.py", _train_options(tmp, assets["checkpoint"]) +
                     ["--resume", "out/lllite-step00000400-state"], capsys)[1]


@trigger
def state_disk_full(tmp, assets, capsys, monkeypatch) -> str:
    """The disk fills up while the second state is written (the setting of tests/test_faults.py)."""
    from tests.faults import small_disk

    with small_disk(tmp / "out", 1000 * 1024) as disk:
        disk.install(monkeypatch)
        return call_main("sdxl_train_control_net_lllite.py", _train_options(
            tmp, assets["checkpoint"], save_every_n_steps=1, max_train_steps=3, save_state=True, cache_latents=True,
            cache_text_encoder_outputs=True), capsys)[1]


@trigger
def image_disk_full(tmp, assets, capsys, monkeypatch) -> str:
    from tests.faults import small_disk

    with small_disk(tmp / "out", 16 * 1024) as disk:
        disk.install(monkeypatch)
        return call_main("sdxl_gen_img.py", ["--ckpt", str(assets["checkpoint"]), "--prompt", "a red square", "--W", "64",
                                             "--H", "64", "--steps", "2", "--images_per_prompt", "2", "--seed", "1",
                                             "--sequential_file_name", "--outdir", "out"], capsys)[1]


@trigger
def training_log(tmp, assets, capsys, monkeypatch) -> str:
    """A run that measures control fidelity and ends with the processes' fingerprint check."""
    return call_main("sdxl_train_control_net_lllite.py", _train_options(
        tmp, assets["checkpoint"], fidelity_guides=assets["guide_folder"], fidelity_steps=2,
        sample_every_n_steps=2), capsys)[1]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _logged_lines(name: str) -> Iterator[list[str]]:
    """The messages logger ``name`` emits at INFO and above inside the block."""
    handler, logger = _Lines(), logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@trigger
def fingerprint_log(tmp, assets, capsys, monkeypatch) -> str:
    """The end-of-run comparison of the processes' weights, on one process (tests/test_train_script.py runs it on two;
    the line differs only in the count)."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from library.sdxl.loading import load_sdxl
    from library.training.loop import Trainer
    from networks.control_net_lllite import ControlNetLLLite

    net = ControlNetLLLite(load_sdxl(str(assets["checkpoint"])).unet, 8, 8)
    AcceleratorState._reset_state(True)
    try:
        with _logged_lines("library.training.loop") as lines:
            Trainer.check_in_sync(SimpleNamespace(raw_network=net, accelerator=Accelerator(cpu=True)))
    finally:
        AcceleratorState._reset_state(True)
    return "\n".join(lines)


@trigger
def switched_off_warning(tmp, assets, capsys, monkeypatch) -> str:
    from library.training.options import parse_training_options

    with _logged_lines("library.cli") as lines:
        parse_training_options(_train_options(tmp, assets["checkpoint"], save_last_n_steps=1))
    return "\n".join(lines)


@trigger
def gen_switched_off_warnings(tmp, assets, capsys, monkeypatch) -> str:
    from library.generation.options import build_parser, resolve

    with _logged_lines("library.cli") as lines:
        resolve(build_parser("").parse_args(["--ckpt", str(assets["checkpoint"]), "--prompt", "a cat", "--no_preview",
                                             "--strength", "0.5"]))
    return "\n".join(lines)


@trigger
def png_parameters(tmp, assets, capsys, monkeypatch) -> str:
    from PIL import Image

    code, printed = call_main("sdxl_gen_img.py", [
        "--ckpt", str(assets["checkpoint"]), "--control_net_lllite_models", str(assets["lllite"]),
        "--guide_image_path", str(assets["image"]), "--prompt", "a castle", "--W", "64", "--H", "64", "--steps", "2",
        "--sampler", "ddim", "--scale", "7.5", "--seed", "42", "--outdir", "out"], capsys)
    assert code == 0, printed
    (png,) = Path("out").glob("*.png")
    return Image.open(png).text["parameters"]


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_quoted_messages(name, tmp_path, monkeypatch, capsys, doc_assets):
    """Each message the docs quote is what the code prints: `...` stands for any text, and with `figures` a number
    for any number."""
    quotes: list[Quote] = [q for q in collect()[1] if q.marker and q.marker.options["trigger"] == name]
    assert quotes, f"trigger {name} is not used by any quote in the docs"
    monkeypatch.chdir(tmp_path)
    printed = " ".join(TRIGGERS[name](tmp_path, doc_assets, capsys, monkeypatch).split())
    missing = [f"{q.where}: `{q.text}`" for q in quotes if not q.pattern().search(printed)]
    assert not missing, "not printed:\n" + "\n".join(missing) + f"\n\nprinted:\n{printed[-3000:]}"


# ---------------------------------------------------------------------------------------------- the README's figures


RECORDED = ROOT / "tests" / "data" / "recorded"  # what was measured, and how (tests/data/recorded/README.md)


def _duration(seconds: int) -> str:
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds} s"


def test_readme_demo_figures_are_the_recorded_runs():
    """The demo figures in README.md and docs/training.md are those of the recorded `python tools/demo.py` run."""
    fid = json.loads((RECORDED / "demo_fidelity.json").read_text())
    run, (m0, m1), ref = fid["run"], (fid["mean"]["0"], fid["mean"]["1"]), fid["reference"]
    guides = sum(1 for r in fid["per_item"] if r.get("multiplier") == 0.0)
    curve = {c["step"]: c["edge_f1"] for c in fid["fidelity_curve"]}
    expected = [
        f"with LLLite, {guides} held-out guides",
        f"default options, {_duration(run['seconds'])}, {run['peak_memory_gb']:.1f} GB of memory",
        f"| 0 (base model alone) | {m0['f1']:.3f} | {m0['ssim']:.3f} |",
        f"| 1 (with the trained LLLite) | {m1['f1']:.3f} | {m1['ssim']:.3f} |",
        f"at strength {ref['strength']:g}, no LLLite | {ref['f1']:.3f} | {ref['ssim']:.3f} |",
        f"Edge F1 rises {m1['f1'] / m0['f1']:.2f}x after {run['train_steps']} training steps on {run['train_images']} images",
        f"The LLLite covers {(m1['f1'] - m0['f1']) / (ref['f1'] - m0['f1']):.0%} of the gap",
        f"edge F1 was {curve[100]:.3f} at step 100, {curve[200]:.3f} at 200, {curve[300]:.3f} at 300",
        f"{curve[run['train_steps']]:.3f} at {run['train_steps']}, the figure above",
        *(f"| {m} | {f['colour']:.0%} | {f['shape']:.0%} | {f['both']:.0%} |" for m, f in fid["prompt_fidelity"].items()),
    ]
    readme = " ".join((ROOT / "README.md").read_text().split())
    missing = [e for e in expected if e not in readme]
    assert not missing, "README.md does not say (tests/data/recorded/demo_fidelity.json):\n" + "\n".join(missing)
    # docs/training.md quotes the log line of the run's last fidelity measurement
    training = " ".join((ROOT / "docs" / "training.md").read_text().split())
    last = fid["fidelity_curve"][-1]
    assert (f"control fidelity at step {last['step']} on {guides} guides: edge F1 {last['edge_f1']:.3f} with the LLLite, "
            f"{last['edge_f1_base']:.3f} without ({last['edge_f1'] / last['edge_f1_base']:.2f}x)") in training


def test_readme_suite_figures_are_the_recorded_runs():
    """The test count and times in README.md are those of the recorded `.ci/run`."""
    ci = json.loads((RECORDED / "ci_run.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (f"({ci['passed']} passed in {_duration(ci['suite_seconds'])} on this 2-core machine in a fresh clone via "
            f"`.ci/run`, {_duration(ci['total_seconds'])} with the set-up") in readme
