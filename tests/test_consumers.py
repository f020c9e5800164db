"""Where a file trained here works: its module names and tensors against each consumer's loading rule.

Each consumer's rule is written below as a small pure function, from reading its source (facts only,
no code taken over). What they do with a file:

ComfyUI node: kohya-ss/ControlNet-LLLite-ComfyUI, node_control_net_lllite.py @ 103a4457 (2023-09-18).
  Splits every key at its first "." into module name and tensor name and builds one module per name
  from shapes: depth 3 if conditioning1.4.weight exists, else 2 if conditioning1.2.weight has a 4-wide
  kernel, else 1; C = 2 * conditioning1.0.weight rows, R = down.0.weight rows, D = its columns; a
  4-D down weight means a conv module. Each module is loaded strictly (exact tensor names and shapes).
  Nothing is checked against the U-Net at load time. The attn1/attn2 patches of ComfyUI's U-Net
  build, for the block being run, "lllite_unet_input_blocks_{i}_1_transformer_blocks_{j}",
  "lllite_unet_middle_block_1_transformer_blocks_{j}" or "lllite_unet_output_blocks_{i}_1_
  transformer_blocks_{j}", add "_attn1" (query and key widths equal) or "_attn2", then "_to_q/_k/_v",
  and apply the module of that name to the linear's input if the file has it. A module no block asks
  for is loaded and silently never used. No resizing: the embedding's tokens must equal the block's.
  The block ids are ComfyUI's ("input", i) / ("middle", 0) / ("output", i) over the ldm
  input_blocks / output_blocks lists and block_index = transformer index
  (comfyanonymous/ComfyUI, comfy/ldm/modules/diffusionmodules/openaimodel.py @ 01312a55).
Forge: lllyasviel/stable-diffusion-webui-forge @ dfdcbab6, extensions-builtin/sd_forge_controlllite/
  (scripts/forge_controllllite.py: a state dict with "lllite" in any key is an LLLite;
  lib_controllllite/lib_controllllite.py: the same split, shape inference, strict per-module load and
  name building as the ComfyUI node); block ids from backend/nn/unet.py, the same numbering.
sd-webui-controlnet: Mikubill/sd-webui-controlnet @ 56cec5b2, scripts/controlnet_lllite.py
  (scripts/controlnet_model_guess.py: "lllite" in any key). Same split, shape inference and strict
  per-module load. Then every module name (with "middle_block" read as "middle_blocks_0") is parsed
  into root input/middle/output, block index, transformer index, attention name and projection, and
  resolved to model.{input_blocks|middle_block|output_blocks}[i][1].transformer_blocks[j].attnN.to_P
  of the ldm U-Net when the unit is applied; a name that does not parse or resolve stops generation
  (assertion or index error).
  current_h_shape is never set, so the embedding is not resized either.
sd-scripts: kohya-ss/sd-scripts @ 48d368fa, sdxl_gen_img.py (--control_net_lllite_models) and
  networks/control_net_lllite.py. C and R come from the first conditioning1.0 / down.0.weight key; a
  ControlNetLLLite is built on the U-Net with its module constants (SKIP_OUTPUT_BLOCKS = True: input
  and middle blocks only; Linear layers of attn1 and attn2 except to_out and attn2.to_k/to_v; depth
  from the block index: input 0-2 -> 1, 3-5 -> 2, else 3, middle 3) and loaded with torch's strict
  load_state_dict: a missing or unexpected key, or a shape that differs, stops the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from networks.control_net_lllite import ControlNetLLLite, find_targets

KEYS_TSV = Path(__file__).parent / "data" / "lllite_sdxl_c32_d64_keys.tsv"
TRAINING_DOC = Path(__file__).parents[1] / "docs" / "training.md"

Shapes = dict[str, dict[str, tuple[int, ...]]]  # module name -> tensor name -> shape

# The SDXL ldm U-Net's attention blocks (sgm layout, as ComfyUI, Forge, A1111 and sd-scripts build it):
# (kind, block index) -> (transformer blocks, width, conditioning depth whose grid matches the block's).
# Depth 2 embeds at image/16 = latent/2, depth 3 at image/32 = latent/4.
SDXL_ATTENTION: dict[tuple[str, int], tuple[int, int, int]] = {
    ("input", 4): (2, 640, 2), ("input", 5): (2, 640, 2),
    ("input", 7): (10, 1280, 3), ("input", 8): (10, 1280, 3),
    ("middle", 0): (10, 1280, 3),
    ("output", 0): (10, 1280, 3), ("output", 1): (10, 1280, 3), ("output", 2): (10, 1280, 3),
    ("output", 3): (2, 640, 2), ("output", 4): (2, 640, 2), ("output", 5): (2, 640, 2),
}


@dataclass
class Verdict:
    """What a consumer does with a file: whether it loads, and which modules act on a layer."""

    loads: bool
    applied: set[str] = field(default_factory=set)
    error: str = ""

    def accepts_all(self, modules) -> bool:
        return self.loads and self.applied == set(modules)


def block_prefix(kind: str, index: int, j: int) -> str:
    if kind == "middle":
        return f"lllite_unet_middle_block_1_transformer_blocks_{j}"
    return f"lllite_unet_{kind}_blocks_{index}_1_transformer_blocks_{j}"


def split_modules(keys: dict[str, tuple[int, ...]]) -> Shapes:
    """The split all three webui/ComfyUI loaders make: module name before the first ".", tensor name after."""
    out: Shapes = {}
    for key, shape in keys.items():
        module, _, tensor = key.partition(".")
        out.setdefault(module, {})[tensor] = tuple(shape)
    return out


def module_from_shapes(tensors: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], int, int]:
    """(tensors the shape-built module expects, its depth, its in-width D), or KeyError as they would raise."""
    if "conditioning1.4.weight" in tensors:
        depth = 3
    elif tensors["conditioning1.2.weight"][-1] == 4:
        depth = 2
    else:
        depth = 1
    c = tensors["conditioning1.0.weight"][0] * 2
    r, d = tensors["down.0.weight"][:2]
    return expected_module_tensors(depth, c, r, d, conv=len(tensors["down.0.weight"]) == 4), depth, d


def expected_module_tensors(depth: int, c: int, r: int, d: int, conv: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an LLLite module (the published layout, LLLITE_FORMAT)."""
    h = c // 2
    convs = [(h, 3, 4, 4)] + {1: [(c, h, 2, 2)], 2: [(c, h, 4, 4)], 3: [(h, h, 4, 4), (c, h, 2, 2)]}[depth]
    out = {}
    for n, shape in enumerate(convs):
        out[f"conditioning1.{2 * n}.weight"] = shape
        out[f"conditioning1.{2 * n}.bias"] = (shape[0],)
    k = (1, 1) if conv else ()
    for name, (o, i) in {"down": (r, d), "mid": (r, r + c), "up": (d, r)}.items():
        out[f"{name}.0.weight"] = (o, i, *k)
        out[f"{name}.0.bias"] = (o,)
    return out


def strict_module_load(module: str, tensors: dict[str, tuple[int, ...]]) -> tuple[str, int, int]:
    """Build one module from shapes and load it strictly: ("" or the error, depth, D)."""
    try:
        expected, depth, d = module_from_shapes(tensors)
    except KeyError as e:
        return f"{module}: KeyError {e}", 0, 0
    if expected != tensors:
        return f"{module}: load_state_dict: tensors {sorted(set(expected) ^ set(tensors))} or shapes differ", depth, d
    return "", depth, d


def fits_block(kind: str, index: int, depth: int, d: int) -> str:
    """Sampling-time check: no consumer here resizes the embedding, and down() needs the layer's width."""
    _, width, grid_depth = SDXL_ATTENTION[(kind, index)]
    if depth != grid_depth or d != width:
        return f"depth {depth} / width {d} does not fit {kind} block {index} (needs {grid_depth} / {width})"
    return ""


def comfyui_patch_names() -> dict[str, tuple[str, int]]:
    """Every module name the attn1/attn2 patch asks for on SDXL, with its block."""
    names = {}
    for (kind, index), (n, _, _) in SDXL_ATTENTION.items():
        for j in range(n):
            for attn in ("attn1", "attn2"):
                for proj in ("q", "k", "v"):
                    names[f"{block_prefix(kind, index, j)}_{attn}_to_{proj}"] = (kind, index)
    return names


def comfyui_node(keys: dict[str, tuple[int, ...]]) -> Verdict:
    """kohya-ss/ControlNet-LLLite-ComfyUI (Forge's extension follows the same rule)."""
    modules = split_modules(keys)
    asked = comfyui_patch_names()
    applied = set()
    for module, tensors in modules.items():
        error, depth, d = strict_module_load(module, tensors)
        if error:
            return Verdict(False, error=error)
        if module in asked:
            error = fits_block(*asked[module], depth, d)
            if error:
                return Verdict(False, error=f"{module}: while sampling: {error}")
            applied.add(module)
    return Verdict(True, applied)


forge_extension = comfyui_node  # lib_controllllite.py: same split, inference, load and patch names


# Their pattern is looser (any root other than input/output is taken as the middle block); for names
# of the lllite_unet_{input|middle|output}_... kind both parse alike.
WEBUI_NAME = re.compile(r"lllite_unet_(input|middle|output)_blocks_(\d+)_1_transformer_blocks_(\d+)_(attn\d)_to_(\w+)")


def sd_webui_controlnet(keys: dict[str, tuple[int, ...]]) -> Verdict:
    """Mikubill/sd-webui-controlnet, scripts/controlnet_lllite.py: each name resolved to an ldm layer."""
    if not any("lllite" in k for k in keys):
        return Verdict(False, error="not recognised as an LLLite")
    modules = split_modules(keys)
    applied = set()
    for module, tensors in modules.items():
        error, depth, d = strict_module_load(module, tensors)
        if error:
            return Verdict(False, error=error)
        m = WEBUI_NAME.fullmatch(module.replace("middle_block", "middle_blocks_0"))
        if not m:
            return Verdict(False, error=f"{module}: name does not parse ('Failed to load ControlLLLite!')")
        kind, index, j, attn, proj = m[1], int(m[2]), int(m[3]), m[4], m[5]
        if (kind, index) not in SDXL_ATTENTION or j >= SDXL_ATTENTION[(kind, index)][0]:
            return Verdict(False, error=f"{module}: no transformer block {kind} {index}/{j} in the SDXL U-Net")
        if attn not in ("attn1", "attn2") or proj not in ("q", "k", "v"):
            return Verdict(False, error=f"{module}: no layer {attn}.to_{proj} ('Failed to load ControlLLLite!')")
        error = fits_block(kind, index, depth, d)
        if error:
            return Verdict(False, error=f"{module}: while sampling: {error}")
        applied.add(module)
    return Verdict(True, applied)


def sd_scripts_network(c: int, r: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """The modules sd-scripts' ControlNetLLLite builds on SDXL with its shipped constants."""
    out = {}
    for (kind, index), (n, width, _) in SDXL_ATTENTION.items():
        if kind == "output":  # SKIP_OUTPUT_BLOCKS = True
            continue
        depth = 3 if kind == "middle" else (1 if index <= 2 else 2 if index <= 5 else 3)
        for j in range(n):
            for target in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q"):
                out[f"{block_prefix(kind, index, j)}_{target}"] = expected_module_tensors(depth, c, r, width)
    return out


def sd_scripts_gen_img(keys: dict[str, tuple[int, ...]]) -> Verdict:
    """kohya-ss/sd-scripts sdxl_gen_img.py: dims from the first keys, then a strict load_state_dict."""
    r = next((s[0] for k, s in keys.items() if "down.0.weight" in k), None)
    c = next((s[0] * 2 for k, s in keys.items() if "conditioning1.0" in k), None)
    if r is None or c is None:
        return Verdict(False, error="invalid control net")
    own = {f"{m}.{t}": s for m, ts in sd_scripts_network(c, r).items() for t, s in ts.items()}
    missing = sorted(set(own) - set(keys))
    unexpected = sorted(set(keys) - set(own))
    mismatched = sorted(k for k in set(own) & set(keys) if tuple(own[k]) != tuple(keys[k]))
    if missing or unexpected or mismatched:
        parts = [f"{what} key(s) in state_dict: {ks[0]} ... ({len(ks)})"
                 for what, ks in (("Missing", missing), ("Unexpected", unexpected), ("size mismatch", mismatched)) if ks]
        return Verdict(False, error="; ".join(parts))
    return Verdict(True, {k.split(".", 1)[0] for k in keys})


CONSUMERS = {
    "ComfyUI": comfyui_node,
    "sd-webui-controlnet": sd_webui_controlnet,
    "Forge": forge_extension,
    "sd-scripts": sd_scripts_gen_img,
}


# -- files ----------------------------------------------------------------------------------------


def file_keys(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def published_keys() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in KEYS_TSV.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("[]").split(","))
    return out


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory, full_sdxl_unet) -> dict[bool, Path]:
    """Files as training writes them (ControlNetLLLite.save) on the full SDXL U-Net, small dims to stay fast."""
    root = tmp_path_factory.mktemp("consumers")
    out = {}
    for include_output_blocks in (False, True):
        net = ControlNetLLLite(full_sdxl_unet, cond_emb_dim=4, network_dim=2,
                               include_output_blocks=include_output_blocks)
        out[include_output_blocks] = root / f"lllite_output_blocks_{include_output_blocks}.safetensors"
        net.save(out[include_output_blocks], dtype=torch.float16)
    return out


def test_rules_accept_a_published_file():
    """The rules themselves: a published controllllite_v01032064e file works in all four (as users report)."""
    keys = published_keys()
    modules = split_modules(keys)
    assert len(modules) == 136
    for name, consumer in CONSUMERS.items():
        verdict = consumer(keys)
        assert verdict.accepts_all(modules), (name, verdict.error)


@pytest.mark.parametrize("name", list(CONSUMERS))
def test_default_file_works_in_every_consumer(saved_files, name):
    keys = file_keys(saved_files[False])
    modules = split_modules(keys)
    assert len(modules) == 136 and not any("output_blocks" in m for m in modules)
    verdict = CONSUMERS[name](keys)
    assert verdict.accepts_all(modules), verdict.error


@pytest.mark.parametrize("name", ["ComfyUI", "sd-webui-controlnet", "Forge"])
def test_output_block_file_is_mapped_by_comfyui_webui_and_forge(saved_files, name):
    keys = file_keys(saved_files[True])
    modules = split_modules(keys)
    assert len(modules) == 280
    out = {m for m in modules if "_output_blocks_" in m}
    assert len(out) == 4 * (3 * 10 + 3 * 2)
    verdict = CONSUMERS[name](keys)
    assert verdict.accepts_all(modules), verdict.error
    assert out <= verdict.applied


def test_output_block_file_stops_sd_scripts_gen_img(saved_files):
    keys = file_keys(saved_files[True])
    verdict = sd_scripts_gen_img(keys)
    assert not verdict.loads
    # nothing is missing: the 144 output-block modules (1,680 tensors) are unexpected
    first = "lllite_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k.conditioning1.0.bias"
    assert verdict.error == f"Unexpected key(s) in state_dict: {first} ... (1680)"


def test_this_projects_loader_places_both(saved_files, full_sdxl_unet):
    """ControlNetLLLite.from_state_dict places modules by find_targets' names, output blocks included."""
    places = {t.name for t in find_targets(full_sdxl_unet, include_output_blocks=True)}
    for path in saved_files.values():
        assert set(split_modules(file_keys(path))) <= places


@pytest.mark.parametrize(
    "module, tensors, verdicts",
    [
        # diffusers-style names: ComfyUI/Forge load but never apply it; the webui cannot parse it
        ("lllite_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", (2, 640),
         {"ComfyUI": "unused", "Forge": "unused", "sd-webui-controlnet": "refused", "sd-scripts": "refused"}),
        # output block 6 has no attention in SDXL
        ("lllite_unet_output_blocks_6_1_transformer_blocks_0_attn1_to_q", (1, 320),
         {"ComfyUI": "unused", "Forge": "unused", "sd-webui-controlnet": "refused", "sd-scripts": "refused"}),
        # a depth-3 embedding in a 64x64 block: tokens do not match while sampling
        ("lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (3, 640),
         {"ComfyUI": "refused", "Forge": "refused", "sd-webui-controlnet": "refused", "sd-scripts": "refused"}),
    ],
)
def test_rules_catch_names_and_depths_that_do_not_fit(module, tensors, verdicts):
    keys = dict(published_keys())
    depth, width = tensors
    keys.update({f"{module}.{t}": s for t, s in expected_module_tensors(depth, 32, 64, width).items()})
    modules = split_modules(keys)
    for name, consumer in CONSUMERS.items():
        verdict = consumer(keys)
        got = "refused" if not verdict.loads else ("unused" if module not in verdict.applied else "applied")
        assert got == verdicts[name], (name, verdict.error)
        if verdict.loads:
            assert verdict.applied == set(modules) - {module}


def test_training_doc_states_what_the_rules_say(saved_files):
    """docs/training.md's table of consumers says 'loads' or 'refused' as the rules find."""
    text = TRAINING_DOC.read_text()
    section = text.split("## Where a trained file loads", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and not set(cells[0]) <= set("-: "):
            rows[cells[0]] = cells[1:]
    for name, consumer in CONSUMERS.items():
        row = next((cells for label, cells in rows.items() if name in label), None)
        assert row is not None, f"docs/training.md: no row for {name}"
        for include_output_blocks, cell in zip((False, True), row):
            keys = file_keys(saved_files[include_output_blocks])
            works = consumer(keys).accepts_all(split_modules(keys))
            assert cell.lower().startswith("loads" if works else "refused"), (name, include_output_blocks, cell)
