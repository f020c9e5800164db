"""Prompt lines with per-prompt options, for prompt files, interactive input and the trainer's sample prompts.

A line is the prompt text followed by options, each introduced by `` --`` (space, two dashes)::

    a girl standing in a classroom --n lowres, bad hands --w 1024 --h 1024 --d 42 --s 28 --l 7

The options are sd-scripts' 27 (``n c w h ow oh nw nh ct cl s d l nl t am dsd1 dst1 dsd2 dst2 dsr
glt glr gle gls glsn glus``) plus ``ss`` (sampler) and ``cn`` (guide images); :data:`OPTIONS` lists
them with their meaning. A key that sets what a command-line option sets is declared with that
option (its ``PromptKey`` in library/generation/options.py: key, meaning, range); only ``c`` is
declared here. Names are case-insensitive, as in sd-scripts. An option's value runs to the next
`` --``, so a negative prompt may hold commas and spaces but not `` --``, and a ``--cn`` path
cannot hold a comma.

Unlike sd-scripts, which skips what it cannot parse, an unknown option or a bad value is a
:class:`UserError` that names the line, the option and the value: a prompt file is read whole
before any model loads, so a typo stops the run at once instead of drawing the wrong image.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tomllib

from library.errors import UserError
from library.generation.samplers import normalize_sampler_name
from library.cli import Limit, Option, options_of
from library.generation.requests import Unsharp

# --- value converters: take the text of a line option or a TOML/JSON value; raise ValueError ---


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("not a whole number")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError("not a whole number")
        return int(v)
    if isinstance(v, int):
        return v
    try:
        return int(str(v).strip())
    except ValueError:
        raise ValueError("not a whole number") from None


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("not a number")
    try:
        x = float(v if isinstance(v, (int, float)) else str(v).strip())
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(x):
        raise ValueError("not a finite number")
    return x


def _float_or_none(v: Any) -> float | str:
    """``none`` (any case) switches a default off, as sd-scripts' ``--nl none``."""
    return "none" if isinstance(v, str) and v.strip().lower() == "none" else _float(v)


def _items(v: Any) -> list[Any]:
    """A list value, or a comma list in text; empty items dropped."""
    items = list(v) if isinstance(v, (list, tuple)) else [s.strip() for s in str(v).split(",")]
    items = [x for x in items if not (isinstance(x, str) and x == "")]
    if not items:
        raise ValueError("empty list")
    return items


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("not text")
    return v.strip()


def _nonempty_text(v: Any) -> str:
    s = _text(v)
    if not s:
        raise ValueError("empty")
    return s


def _sampler(v: Any) -> str:
    name = _nonempty_text(v)
    normalize_sampler_name(name)  # a UserError listing the valid names
    return name


@dataclass(frozen=True)
class LineOption:
    """One prompt-line option: ``--name value`` sets ``PromptSpec.<field>``."""

    name: str
    field: str
    convert: Callable[[Any], Any]
    limit: Limit | None = None  # every number must meet it
    meaning: str = ""
    accumulate: bool = False  # a repeated option adds to the earlier values instead of replacing them
    sets: str | None = None  # the request field it fills, where its option declares one ("deep_shrink.depth_1")


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "text": _text, "int": _int, "float": _float, "float/none": _float_or_none, "sampler": _sampler,
    "ints": lambda v: [_int(x) for x in _items(v)], "floats": lambda v: [_float(x) for x in _items(v)],
    "paths": lambda v: [_nonempty_text(x) for x in _items(v)], "unsharp": Unsharp.parse,
}
# Keys that no command-line option shares; the others come from the options' declarations (their PromptKey).
_LINE_ONLY = (
    LineOption("c", "clip_prompt", _text, meaning="CLIP prompt, stored in the PNG only as in sd-scripts' SDXL script"),
)


def _kind(opt: Option) -> str:
    """How a line reads the value of ``opt``'s key: its declared kind, else from the option's type."""
    if opt.prompt_key.kind:
        return opt.prompt_key.kind
    if opt.nargs:
        return "floats" if opt.type is float else "paths"
    return {int: "int", float: "float"}.get(opt.type, "text")


def _line_options() -> tuple[LineOption, ...]:
    from library.generation import options

    declared = []
    for cls in options.ARGS:
        for opt in options_of(cls):
            key = opt.prompt_key
            if key is not None:
                declared.append(LineOption(key.key, key.field or opt.field, _CONVERTERS[_kind(opt)], opt.limit,
                                           key.meaning, key.accumulate, opt.sets))
    return (*declared, *_LINE_ONLY)


OPTIONS: dict[str, LineOption] = {o.name: o for o in _line_options()}


def line_fields(feature: str) -> dict[str, str]:
    """{PromptSpec field: setting} of the keys that set ``feature`` (``deep_shrink``, ``gradual_latent``)."""
    return {o.field: o.sets.split(".", 1)[1] for o in OPTIONS.values() if o.sets and o.sets.startswith(feature + ".")}


def _spec_seed(self) -> int | None:
    """The first seed, for callers that take one."""
    return self.seeds[0] if self.seeds else None


# The fields come from OPTIONS so that the table is the only list of them; None means "not given".
PromptSpec = dataclasses.make_dataclass(
    "PromptSpec",
    [("prompt", str)] + [(o.field, Any, dataclasses.field(default=None)) for o in OPTIONS.values()]
    + [("where", str, dataclasses.field(default="", compare=False, repr=False))],  # names the line in errors
    namespace={"seed": property(_spec_seed),
               "__doc__": "One prompt and its per-prompt options; None means: not given, use the default."},
)
PromptSpec.__module__ = __name__  # make_dataclass would name the dataclasses module (pickling, repr)

# Long names accepted in .toml / .json prompt files, beside the short ones and the field names.
LONG_NAMES: dict[str, str] = {
    "sample_steps": "s", "seed": "d", "cfg_scale": "l", "network_mul": "am", "sample_sampler": "ss",
    "guide_image": "cn", "controlnet_image": "cn",
    **{o.field: o.name for o in OPTIONS.values()},
}


def _unknown(name: str, where: str) -> UserError:
    close = difflib.get_close_matches(name, OPTIONS, n=1, cutoff=0.5)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return UserError(f"{where}: unknown prompt option --{name}{hint}; the options are "
                     f"{' '.join('--' + n for n in OPTIONS)} (see docs/generation.md)")


def _set_option(spec: PromptSpec, name: str, value: Any, where: str) -> None:
    """Convert, check and store one option; a UserError for an unknown name or a bad value."""
    option = OPTIONS.get(name.lower())
    if option is None:
        raise _unknown(name, where)
    label = f"--{option.name}"
    try:
        converted = option.convert(value)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {label} {value!r} is not valid ({e}); it is the {option.meaning}") from None
    except UserError as e:  # a converter that explains the value itself (sampler names)
        raise UserError(f"{where}: {label} {value!r}: {e}") from None
    if option.limit is not None:
        for number in converted if isinstance(converted, list) else [converted]:
            if not isinstance(number, str):
                option.limit.check(f"{where}: {label}", number)
    if option.accumulate and getattr(spec, option.field) is not None:
        converted = getattr(spec, option.field) + converted
    setattr(spec, option.field, converted)


def parse_prompt_line(line: str, where: str = "prompt") -> PromptSpec:
    """Parse one prompt line into a PromptSpec; ``where`` names it in errors (e.g. "prompts.txt line 3")."""
    # A leading space lets a line that starts with "--n ..." parse as an empty prompt plus options.
    prompt, *chunks = (" " + line.strip()).split(" --")
    spec = PromptSpec(prompt=prompt.strip(), where=where)
    for chunk in chunks:
        name, _, value = chunk.strip().partition(" ")
        if not name:
            raise UserError(f"{where}: an empty option '--'; write each option as --name value")
        _set_option(spec, name, value.strip(), where)
    return spec


def prompt_from_dict(entry: dict[str, Any], where: str = "prompt") -> PromptSpec:
    """A PromptSpec from a TOML/JSON table; keys are the long names or the short option names."""
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise UserError(f"{where}: needs a text 'prompt' key (got keys: {', '.join(map(str, entry)) or 'none'})")
    spec = PromptSpec(prompt=prompt.strip(), where=where)
    for key, value in entry.items():
        if key != "prompt":
            _set_option(spec, LONG_NAMES.get(key, key), value, where)
    return spec


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise UserError(f"cannot read prompt file {path}: {e}") from e


def _table_entries(data: Any, path: Path) -> list[Any]:
    """The list of prompt entries in a parsed TOML/JSON document."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and "prompt" in data:
        block = data["prompt"]
        if isinstance(block, list):  # prompt = [...] / [[prompt]]
            return block
        if isinstance(block, dict) and isinstance(block.get("subset"), list):
            # [prompt] holds defaults, [[prompt.subset]] the prompts (the sd-scripts sample layout).
            defaults = {k: v for k, v in block.items() if k != "subset"}
            return [{**defaults, **s} if isinstance(s, dict) else s for s in block["subset"]]
    raise UserError(
        f"prompt file {path}: expected a list of prompt objects (JSON), or `prompt = [...]` / "
        "[[prompt]] tables (TOML), each with a 'prompt' key"
    )


def _table_specs(path: Path, text: str) -> list[PromptSpec]:
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"syntax error in prompt file {path}: {e}") from e
    specs = []
    for i, entry in enumerate(_table_entries(data, path), start=1):
        where = f"{path} prompt #{i}"
        if isinstance(entry, str):
            specs.append(parse_prompt_line(entry, where))
        elif isinstance(entry, dict):
            specs.append(prompt_from_dict(entry, where))
        else:
            raise UserError(f"{where}: expected an object with a 'prompt' key, got {entry!r}")
    return specs


def load_prompt_file(path: str | os.PathLike) -> list[PromptSpec]:
    """Load prompts from a .toml, a .json, or a text file (any other extension).

    Text: one prompt line per line; blank lines and lines starting with ``#`` are skipped.
    TOML/JSON: a list of objects (``prompt = [...]`` or ``[[prompt]]`` in TOML) with keys
    prompt, negative_prompt, width, height, sample_steps/steps, scale, seed, sampler,
    guide_image/controlnet_image, ... or the short option names; a plain string in the list is
    read as a prompt line. Raises ``UserError`` for a missing file, a syntax error, a bad option or
    no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    text = _read_text(path)
    if path.suffix.lower() in (".toml", ".json"):
        specs = _table_specs(path, text)
    else:
        specs = [parse_prompt_line(line, f"{path} line {n}") for n, line in enumerate(text.splitlines(), start=1)
                 if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise UserError(f"prompt file {path} contains no prompts")
    return specs
