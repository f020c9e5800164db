"""Merge kohya-format SDXL LoRA files into the weights of the diffusers U-Net and text encoders.

A LoRA file names each adapted layer after the original ("sgm"/ldm) SDXL layout with dots turned
into underscores, e.g.::

    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight   [r, in]
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight     [out, r]
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha              []
    lora_te1_text_model_encoder_layers_0_self_attn_q_proj...                     (CLIP ViT-L)
    lora_te2_text_model_encoder_layers_0_mlp_fc1...                              (OpenCLIP bigG, HF names)

Names cannot be split back on ``_`` (the layer names contain underscores themselves), so the map
goes the other way: every Linear/Conv2d of our models gets its kohya name, built from the diffusers
module name with the same diffusers -> sgm prefix table that writes single-file checkpoints.

Merging adds ``multiplier * alpha / rank * up @ down`` to each weight, so sampling costs nothing
extra. :meth:`MergedLoRA.set_multiplier` adds the difference for a new multiplier (per-prompt
``--am``), and :meth:`MergedLoRA.unmerge` takes it out again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from library import sdxl_keys
from library.errors import UserError
from library.weights_io import KIND_LORA, read_weights, weights_kind

logger = logging.getLogger(__name__)

# A few unknown keys are tolerated with a warning (files sometimes carry extras); more is an error.
MAX_UNMATCHED = 3
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _flat(name: str) -> str:
    return name.replace(".", "_")


def unet_lora_names(unet: nn.Module) -> dict[str, nn.Module]:
    """kohya LoRA name (``lora_unet_...``) -> Linear/Conv2d module of a diffusers SDXL U-Net."""
    pairs = sorted(sdxl_keys.unet_prefix_pairs(unet.config), key=lambda p: -len(p[0]))
    renames = sdxl_keys.UNET_RESNET_RENAMES
    out: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        dotted = name + "."
        for d_prefix, s_prefix in pairs:
            if dotted.startswith(d_prefix):
                rest = dotted[len(d_prefix):]
                if ".resnets." in d_prefix:
                    for old, new in renames:
                        if rest.startswith(old):
                            rest = new + rest[len(old):]
                            break
                out["lora_unet_" + _flat((s_prefix + rest).rstrip("."))] = module
                break
    return out


def text_encoder_lora_names(encoder: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """``lora_te1_text_model_...`` / ``lora_te2_...`` -> Linear of a transformers CLIP text encoder."""
    out: dict[str, nn.Module] = {}
    for name, module in encoder.named_modules():
        if not isinstance(module, nn.Linear) or name == "text_projection":
            continue
        # transformers versions differ on whether CLIPTextModel's modules sit under "text_model."
        name = name.removeprefix("text_model.")
        out[f"{prefix}_text_model_" + _flat(name)] = module
    return out


def lora_name_map(unet: nn.Module, text_encoder1: nn.Module | None, text_encoder2: nn.Module | None) -> dict[str, nn.Module]:
    names = unet_lora_names(unet)
    if text_encoder1 is not None:
        names.update(text_encoder_lora_names(text_encoder1, "lora_te1"))
    if text_encoder2 is not None:
        names.update(text_encoder_lora_names(text_encoder2, "lora_te2"))
    return names


@dataclass
class _Layer:
    name: str
    module: nn.Module
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in fp32, shaped like the module's weight."""
        weight = self.module.weight
        up = self.up.float().to(weight.device)
        down = self.down.float().to(weight.device)
        if down.dim() == 4 and down.shape[-2:] != (1, 1):  # a conv LoRA with a spatial kernel (LoCon)
            d = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        else:
            d = up.flatten(1) @ down.flatten(1)
        if d.numel() != weight.numel():
            raise UserError(
                f"LoRA layer {self.name}: up {list(self.up.shape)} x down {list(self.down.shape)} gives "
                f"{list(d.shape)}, but the model's layer has weight {list(weight.shape)}. "
                "Is this LoRA for another base model?"
            )
        return (d * self.scale).reshape(weight.shape)


class MergedLoRA:
    """One LoRA file merged into the models; its multiplier can be changed or taken out again."""

    def __init__(self, path: str, layers: list[_Layer]):
        self.path = path
        self.layers = layers
        self.multiplier = 0.0

    @torch.no_grad()
    def set_multiplier(self, multiplier: float) -> None:
        """Add ``(multiplier - current) * delta`` to every adapted weight."""
        change = float(multiplier) - self.multiplier
        if change == 0.0:
            return
        for layer in self.layers:
            w = layer.module.weight
            w.add_((change * layer.delta()).to(w.dtype))
        self.multiplier = float(multiplier)

    def unmerge(self) -> None:
        self.set_multiplier(0.0)


def _group_keys(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    for key, value in sd.items():
        for suffix in _SUFFIXES:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[suffix] = value
                break
        else:
            other.append(key)
    incomplete = [n for n, g in groups.items() if ".lora_down.weight" not in g or ".lora_up.weight" not in g]
    if incomplete:
        raise UserError(f"{source}: LoRA layer {incomplete[0]} lacks its lora_down or lora_up weight; the file is damaged.")
    return groups, other


def merge_lora(
    path: str | os.PathLike,
    unet: nn.Module,
    text_encoder1: nn.Module | None = None,
    text_encoder2: nn.Module | None = None,
    multiplier: float = 1.0,
) -> MergedLoRA:
    """Read a kohya-format SDXL LoRA file and merge it with ``multiplier``.

    Raises UserError for a file that is not a LoRA, or when more than a few of its layers have no
    matching layer in the models (the names and a hint are in the message).
    """
    sd, _ = read_weights(path, "LoRA file")
    kind = weights_kind(sd.keys())
    if kind != KIND_LORA:
        raise UserError(
            f"{path} is not a LoRA file (it looks like: {kind}); --network_weights takes kohya-format "
            "LoRA files with lora_unet_* / lora_te1_* / lora_te2_* keys."
        )
    groups, other = _group_keys(sd, str(path))
    targets = lora_name_map(unet, text_encoder1, text_encoder2)
    layers: list[_Layer] = []
    unmatched = [n for n in groups if n not in targets] + other
    for name, g in groups.items():
        module = targets.get(name)
        if module is None:
            continue
        down, up = g[".lora_down.weight"], g[".lora_up.weight"]
        rank = down.shape[0]
        alpha = float(g[".alpha"].item()) if ".alpha" in g else float(rank)
        layers.append(_Layer(name, module, down, up, alpha / rank))
    if unmatched:
        listing = ", ".join(sorted(unmatched)[:10]) + (" ..." if len(unmatched) > 10 else "")
        if len(unmatched) > MAX_UNMATCHED or not layers:
            raise UserError(
                f"{path}: {len(unmatched)} of {len(groups) + len(other)} LoRA entries match no layer of this "
                f"SDXL model: {listing}. Is it a LoRA for SD1.x/SD2.x or another architecture (LyCORIS "
                "LoHa/LoKr files are not supported)?"
            )
        logger.warning("%s: %d LoRA entries ignored (no matching layer): %s", path, len(unmatched), listing)
    merged = MergedLoRA(str(path), layers)
    for layer in layers:
        layer.delta()  # check every shape before changing any weight
    merged.set_multiplier(multiplier)
    n_te = sum(1 for l in layers if l.name.startswith("lora_te"))
    logger.info("merged LoRA %s (x%g): %d U-Net and %d text encoder layers", path, multiplier, len(layers) - n_te, n_te)
    return merged


def make_lora_state_dict(
    modules: Mapping[str, nn.Module], rank: int = 4, alpha: float | None = None, generator: torch.Generator | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Random kohya-layout LoRA weights for the given name -> module map (for tests and demos)."""
    sd: dict[str, torch.Tensor] = {}
    for name in names if names is not None else modules:
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=generator) * 0.1
            up = torch.randn(m.out_channels, rank, 1, 1, generator=generator) * 0.1
        else:
            down = torch.randn(rank, m.in_features, generator=generator) * 0.1
            up = torch.randn(m.out_features, rank, generator=generator) * 0.1
        sd[name + ".lora_down.weight"] = down
        sd[name + ".lora_up.weight"] = up
        sd[name + ".alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return sd
