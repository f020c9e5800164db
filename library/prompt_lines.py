"""Prompt lines with per-prompt options, for ``--from_file``, ``--interactive`` and ``--sample_prompts``.

A line is the prompt text followed by options, each introduced by `` --`` (space, two dashes)::

    a girl standing in a classroom --n lowres, bad hands --w 1024 --h 1024 --d 42 --s 28 --l 7

Options (names are case-sensitive, as written):

    n   negative prompt          w / h    width / height       s   steps
    d   seed, or a comma list    l        CFG scale            nl  negative scale
    t   img2img strength         ow / oh  original size        ct / cl  crop top / left
    am  network multipliers (comma list)
    ss  sampler (sample prompts) cn       guide image path(s): comma list, or repeat --cn

An option's value runs to the next `` --``, so a negative prompt may hold commas and spaces but
not `` --``, and a ``--cn`` path cannot hold a comma. An unknown option or a bad value is logged
as a warning and ignored, so one typo does not stop a long generation run. Every option is
parsed in every context; a caller ignores those it has no use for (``ss`` outside training).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class PromptSpec:
    """One prompt and its per-prompt options; None means "not given, use the command-line default"."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seeds: list[int] | None = None
    scale: float | None = None
    negative_scale: float | None = None
    strength: float | None = None
    original_width: int | None = None
    original_height: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    network_multipliers: list[float] | None = None
    sampler: str | None = None
    guide_images: list[str] | None = None

    @property
    def seed(self) -> int | None:
        """The first seed, for callers that take one."""
        return self.seeds[0] if self.seeds else None


# --- value converters: take the text of a line option or a TOML/JSON value; raise ValueError ---


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("not an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError("not an integer")
        return int(v)
    return int(str(v).strip())


def _positive_int(v: Any) -> int:
    n = _int(v)
    if n <= 0:
        raise ValueError("must be > 0")
    return n


def _non_negative_int(v: Any) -> int:
    n = _int(v)
    if n < 0:
        raise ValueError("must be >= 0")
    return n


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("not a number")
    x = float(v if isinstance(v, (int, float)) else str(v).strip())
    if not math.isfinite(x):
        raise ValueError("not a finite number")
    return x


def _strength(v: Any) -> float:
    x = _float(v)
    if not 0.0 <= x <= 1.0:
        raise ValueError("must be between 0 and 1")
    return x


def _items(v: Any) -> list[Any]:
    """A list value, or a comma list in text; empty items dropped."""
    if isinstance(v, (list, tuple)):
        items = list(v)
    else:
        items = [s.strip() for s in str(v).split(",")]
    items = [x for x in items if not (isinstance(x, str) and x == "")]
    if not items:
        raise ValueError("empty list")
    return items


def _seed_list(v: Any) -> list[int]:
    return [_int(x) for x in _items(v)]


def _float_list(v: Any) -> list[float]:
    return [_float(x) for x in _items(v)]


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("not a string")
    return v.strip()


def _nonempty_text(v: Any) -> str:
    s = _text(v)
    if not s:
        raise ValueError("empty")
    return s


def _path_list(v: Any) -> list[str]:
    return [_nonempty_text(x) for x in _items(v)]


# short option -> (PromptSpec field, converter)
OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "n": ("negative_prompt", _text),
    "w": ("width", _positive_int),
    "h": ("height", _positive_int),
    "s": ("steps", _positive_int),
    "d": ("seeds", _seed_list),
    "l": ("scale", _float),
    "nl": ("negative_scale", _float),
    "t": ("strength", _strength),
    "ow": ("original_width", _positive_int),
    "oh": ("original_height", _positive_int),
    "ct": ("crop_top", _non_negative_int),
    "cl": ("crop_left", _non_negative_int),
    "am": ("network_multipliers", _float_list),
    "ss": ("sampler", _nonempty_text),
    "cn": ("guide_images", _path_list),
}

# Options that add to what an earlier occurrence gave instead of replacing it.
_ACCUMULATE = {"cn"}

# Long names accepted in .toml / .json prompt files, beside the short ones.
LONG_NAMES: dict[str, str] = {
    "negative_prompt": "n",
    "width": "w",
    "height": "h",
    "sample_steps": "s",
    "steps": "s",
    "seed": "d",
    "seeds": "d",
    "scale": "l",
    "cfg_scale": "l",
    "negative_scale": "nl",
    "strength": "t",
    "original_width": "ow",
    "original_height": "oh",
    "crop_top": "ct",
    "crop_left": "cl",
    "network_multipliers": "am",
    "network_mul": "am",
    "sampler": "ss",
    "sample_sampler": "ss",
    "guide_image": "cn",
    "guide_images": "cn",
    "controlnet_image": "cn",
}


def _set_option(spec: PromptSpec, name: str, value: Any, where: str) -> None:
    """Convert and store one option; warn about and ignore an unknown name or a bad value."""
    if name not in OPTIONS:
        hint = ""
        if name.lower() in OPTIONS:
            hint = f" (option names are case-sensitive: did you mean --{name.lower()}?)"
        logger.warning("%s: unknown prompt option --%s ignored%s", where, name, hint)
        return
    field, convert = OPTIONS[name]
    try:
        converted = convert(value)
    except (ValueError, TypeError) as e:
        logger.warning("%s: bad value %r for prompt option --%s ignored (%s)", where, value, name, e)
        return
    if name in _ACCUMULATE and getattr(spec, field) is not None:
        converted = getattr(spec, field) + converted
    setattr(spec, field, converted)


def parse_prompt_line(line: str, where: str = "prompt") -> PromptSpec:
    """Parse one prompt line; ``where`` names it in warnings (e.g. "prompts.txt line 3")."""
    # A leading space lets a line that starts with "--n ..." parse as an empty prompt plus options.
    prompt, *chunks = (" " + line.strip()).split(" --")
    spec = PromptSpec(prompt=prompt.strip())
    for chunk in chunks:
        name, _, value = chunk.strip().partition(" ")
        if not name:
            logger.warning("%s: empty option '--' ignored", where)
            continue
        _set_option(spec, name, value.strip(), where)
    return spec


def prompt_from_dict(entry: dict[str, Any], where: str = "prompt") -> PromptSpec:
    """A PromptSpec from a TOML/JSON table; keys are the long names or the short option names."""
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise UserError(f"{where}: needs a text 'prompt' key (got keys: {', '.join(map(str, entry)) or 'none'})")
    spec = PromptSpec(prompt=prompt.strip())
    for key, value in entry.items():
        if key == "prompt":
            continue
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


def load_prompt_file(path: str | os.PathLike) -> list[PromptSpec]:
    """Load prompts from a .toml, a .json, or a text file (any other extension).

    Text: one prompt line per line; blank lines and lines starting with ``#`` are skipped.
    TOML/JSON: a list of objects (``prompt = [...]`` or ``[[prompt]]`` in TOML) with keys
    prompt, negative_prompt, width, height, sample_steps/steps, scale, seed, sampler,
    guide_image/controlnet_image, ... or the short option names; a plain string in the list is
    read as a prompt line. Raises ``UserError`` for a missing file, a syntax error, or no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    text = _read_text(path)
    suffix = path.suffix.lower()
    specs: list[PromptSpec] = []
    if suffix in (".toml", ".json"):
        try:
            data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"syntax error in prompt file {path}: {e}") from e
        for i, entry in enumerate(_table_entries(data, path), start=1):
            where = f"{path} prompt #{i}"
            if isinstance(entry, str):
                specs.append(parse_prompt_line(entry, where))
            elif isinstance(entry, dict):
                specs.append(prompt_from_dict(entry, where))
            else:
                raise UserError(f"{where}: expected an object with a 'prompt' key, got {entry!r}")
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            specs.append(parse_prompt_line(line, f"{path} line {n}"))
    if not specs:
        raise UserError(f"prompt file {path} contains no prompts")
    return specs
