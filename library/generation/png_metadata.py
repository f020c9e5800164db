"""Generation parameters inside PNG files, so a later run or another tool can read them back.

Two text chunks are written:

* ``parameters``: the human-readable text that image viewers and web UIs show
  (prompt line, ``Negative prompt: ...`` line, then ``Key: value, Key: value, ...``);
* ``lllite_generation``: the same parameters as one JSON object, exact and typed. This is what
  :func:`read_png_parameters` returns; files from other tools that only have the text chunk are
  parsed from the text instead (values then stay strings).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.atomic_io import atomic_path
from library.errors import UserError

JSON_KEY = "lllite_generation"
TEXT_KEY = "parameters"

# JSON key -> label in the text chunk, in the order they are written.
_LABELS = [
    ("steps", "Steps"),
    ("sampler", "Sampler"),
    ("scale", "CFG scale"),
    ("negative_scale", "Negative scale"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model", "Model"),
    ("vae", "VAE"),
    ("clip_prompt", "CLIP prompt"),
    ("clip_skip", "Clip skip"),
    ("strength", "Denoising strength"),
    ("init_image", "Init image"),
    ("mask", "Mask"),
    ("original_size", "Original size"),
    ("original_size_negative", "Original size negative"),
    ("crop", "Crop"),
    ("highres_fix_scale", "Hires scale"),
    ("highres_fix_steps", "Hires first pass steps"),
    ("highres_fix_strength", "Hires first pass strength"),
    ("highres_fix_upscaler", "Hires upscaler"),
    ("highres_fix_pass", "Hires pass"),
    ("deep_shrink", "Deep Shrink"),
    ("gradual_latent", "Gradual Latent"),
    ("lllite_models", "LLLite models"),
    ("lllite_multipliers", "LLLite multipliers"),
    ("lllite_starts", "LLLite starts"),
    ("lllite_ratios", "LLLite ratios"),
    ("guide_images", "Guide images"),
    ("networks", "Networks"),
    ("network_multipliers", "Network multipliers"),
]


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " | ".join(_plain(v) for v in value)
    if isinstance(value, dict):  # Deep Shrink / Gradual Latent settings
        return " ".join(f"{k}={_plain(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("\n", " ")


def _text_value(value: Any) -> str:
    text = _plain(value)
    # A comma or colon would split the value when the text is parsed back: quote it.
    if any(c in text for c in ',:"'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def format_parameters_text(params: Mapping[str, Any]) -> str:
    """The A1111-style text: prompt, ``Negative prompt: ...``, then ``Key: value`` pairs."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = []
    for key, label in _LABELS:
        value = params.get(key)
        if value is None or value == [] or value == "":
            continue
        pairs.append(f"{label}: {_text_value(value)}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_parameters_text(text: str) -> dict[str, Any]:
    """Parse the text chunk back into a dict (the JSON keys where a label is known, values as strings)."""
    lines = text.strip("\n").split("\n")
    result: dict[str, Any] = {}
    last = lines[-1] if len(lines) > 1 or ": " in lines[0] else ""
    if last and re.match(r"^\s*[\w .-]+: ", last):
        body = lines[:-1]
    else:
        body, last = lines, ""
    negative = [i for i, line in enumerate(body) if line.startswith("Negative prompt: ")]
    if negative:
        i = negative[0]
        result["prompt"] = "\n".join(body[:i])
        result["negative_prompt"] = "\n".join(body[i:])[len("Negative prompt: "):]
    else:
        result["prompt"] = "\n".join(body)
    by_label = {label: key for key, label in _LABELS}
    for m in re.finditer(r'\s*([\w .-]+?): ("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', last):
        label, value = m.group(1).strip(), m.group(2).strip()
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        result[by_label.get(label, label)] = value
    return result


def png_info(params: Mapping[str, Any]) -> PngInfo:
    info = PngInfo()
    info.add_itxt(TEXT_KEY, format_parameters_text(params))
    info.add_itxt(JSON_KEY, json.dumps(dict(params), ensure_ascii=False, default=str))
    return info


def save_png(image: Image.Image, path: str | os.PathLike, params: Mapping[str, Any], what: str = "the image") -> None:
    """Write ``image`` to ``path`` (atomically) with the generation parameters in its text chunks."""
    with atomic_path(path, what) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(params))


def read_png_parameters(path_or_image: str | os.PathLike | Image.Image) -> dict[str, Any]:
    """The generation parameters stored in a PNG: the JSON chunk if present, else the parsed text chunk.

    Returns an empty dict for a PNG without parameters; raises UserError for an unreadable file.
    """
    if isinstance(path_or_image, Image.Image):
        text = dict(getattr(path_or_image, "text", {}) or {})
    else:
        try:
            with Image.open(Path(path_or_image)) as im:
                im.load()
                text = dict(getattr(im, "text", {}) or {})
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image {path_or_image}: {e}") from None
    if JSON_KEY in text:
        try:
            return json.loads(text[JSON_KEY])
        except json.JSONDecodeError:
            pass
    if TEXT_KEY in text:
        return parse_parameters_text(text[TEXT_KEY])
    return {}
