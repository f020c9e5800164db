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

Three ways to apply a file, as sd-scripts' generation script has them:

* :class:`HookedLoRA` (the default): forward hooks add ``multiplier * alpha / rank * up(down(x))``
  to each adapted layer's output; the weights stay untouched and a multiplier change is free.
* :class:`MergedLoRA` with a backup (``--network_pre_calc``): ``multiplier * alpha / rank * up @ down``
  is added to each weight, so sampling costs nothing extra; a new multiplier (per-prompt ``--am``)
  is merged again from the kept original weights, so no rounding error builds up.
* :class:`MergedLoRA` without a backup (``--network_merge``): merged once for good, with a fixed
  multiplier, and no memory spent on a copy of the weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.sdxl import keys as sdxl_keys
from library.sdxl.weights_io import KIND_LORA, read_weights, weights_kind

logger = logging.getLogger(__name__)

# A few unknown keys are tolerated with a warning (files sometimes carry extras); more is an error.
MAX_UNMATCHED = 3
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _flat(name: str) -> str:
    return name.replace(".", "_")


def unet_lora_names(unet: nn.Module) -> dict[str, nn.Module]:
    """kohya LoRA name (``lora_unet_...``) -> Linear/Conv2d module of a diffusers SDXL U-Net."""
    out: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        try:  # the sgm name of the module's weight, by the table that writes single-file checkpoints
            (key,) = sdxl_keys.unet_diffusers_to_sgm({name + ".weight": module}, unet.config)
        except KeyError:
            continue
        out["lora_unet_" + _flat(key[len(sdxl_keys.UNET_PREFIX): -len(".weight")])] = module
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
    source: str = ""  # the file, for error messages

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.module.weight
        return self.up.to(w.device, torch.float32), self.down.to(w.device, torch.float32)

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in fp32, shaped like the module's weight."""
        weight = self.module.weight
        up, down = self._factors()
        if down.dim() == 4 and down.shape[-2:] != (1, 1):  # a conv LoRA with a spatial kernel (LoCon)
            d = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        else:
            d = up.flatten(1) @ down.flatten(1)
        if d.numel() != weight.numel():
            raise UserError(
                f"{self.source}: LoRA layer {self.name}: up {list(self.up.shape)} x down {list(self.down.shape)} "
                f"gives {list(d.shape)}, but the model's layer has weight {list(weight.shape)}. "
                "Is this LoRA for another base model?"
            )
        return (d * self.scale).reshape(weight.shape)

    def hook_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) shaped for F.linear / F.conv2d on the module, in its dtype and on its device."""
        w = self.module.weight
        down, up = (t.to(w.device, w.dtype) for t in (self.down, self.up))
        if isinstance(self.module, nn.Conv2d):
            return (down if down.dim() == 4 else down[:, :, None, None]), up.reshape(up.shape[0], -1, 1, 1)
        return down.flatten(1), up.flatten(1)


@dataclass
class LoRAFile:
    """One kohya-format LoRA file, its layers matched to the models and their shapes checked."""

    path: str
    layers: list[_Layer]

    @property
    def n_text_encoder_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.name.startswith("lora_te"))


class MergedLoRA:
    """A LoRA merged into the weights.

    With ``keep_backup`` (``--network_pre_calc``, and :func:`merge_lora`) the original weights are
    kept, so every multiplier is merged from them exactly; without it (``--network_merge``) the
    merge is permanent and the multiplier is fixed.
    """

    def __init__(self, lora: LoRAFile, multiplier: float, keep_backup: bool = True):
        self.path = lora.path
        self.layers = lora.layers
        self.backup = [layer.module.weight.detach().clone() for layer in self.layers] if keep_backup else None
        self.multiplier = 0.0
        self._merge(float(multiplier))

    @torch.no_grad()
    def _merge(self, multiplier: float) -> None:
        for i, layer in enumerate(self.layers):
            w = layer.module.weight
            base = self.backup[i] if self.backup is not None else w.float()
            w.copy_((base.float() + multiplier * layer.delta()).to(w.dtype))
        self.multiplier = multiplier

    def set_multiplier(self, multiplier: float) -> None:
        """Merge with another multiplier (from the original weights); fixed once merged permanently."""
        if float(multiplier) == self.multiplier:
            return
        if self.backup is None:
            raise UserError(f"{self.path} is merged into the weights with multiplier {self.multiplier:g} "
                            f"(--network_merge): it cannot change to {multiplier:g}; use --network_pre_calc instead")
        self._merge(float(multiplier))

    def unmerge(self) -> None:
        self.set_multiplier(0.0)


class HookedLoRA:
    """A LoRA applied by forward hooks, ``y = W x + multiplier * scale * up(down(x))``: the weights stay as they are.

    This is sd-scripts' default (neither ``--network_merge`` nor ``--network_pre_calc``): changing the
    multiplier costs nothing, and each step pays for the low-rank products.
    """

    def __init__(self, lora: LoRAFile, multiplier: float):
        self.path = lora.path
        self.layers = lora.layers
        self.multiplier = float(multiplier)
        self.handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers]

    def _hook(self, layer: _Layer):
        down, up = layer.hook_weights()
        conv = isinstance(layer.module, nn.Conv2d)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.multiplier == 0.0:
                return None
            x = args[0]
            if conv:
                h = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
                return output + (self.multiplier * layer.scale) * F.conv2d(h, up)
            return output + (self.multiplier * layer.scale) * F.linear(F.linear(x, down), up)

        return hook

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


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


def read_lora(
    path: str | os.PathLike, unet: nn.Module, text_encoder1: nn.Module | None = None, text_encoder2: nn.Module | None = None,
) -> LoRAFile:
    """Read a kohya-format SDXL LoRA file and match its layers to the models; nothing is changed yet.

    Raises UserError naming the file for a file that is not a LoRA, when more than a few of its
    layers have no matching layer in the models, or when a layer's shape does not fit.
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
        layers.append(_Layer(name, module, down, up, alpha / rank, str(path)))
    if unmatched:
        listing = ", ".join(sorted(unmatched)[:10]) + (" ..." if len(unmatched) > 10 else "")
        if len(unmatched) > MAX_UNMATCHED or not layers:
            raise UserError(
                f"{path}: {len(unmatched)} of {len(groups) + len(other)} LoRA entries match no layer of this "
                f"SDXL model: {listing}. Is it a LoRA for SD1.x/SD2.x or another architecture (LyCORIS "
                "LoHa/LoKr files are not supported)?"
            )
        logger.warning("%s: %d LoRA entries ignored (no matching layer): %s", path, len(unmatched), listing)
    for layer in layers:
        layer.delta()  # check every shape before any weight changes
    return LoRAFile(str(path), layers)


def merge_lora(
    path: str | os.PathLike,
    unet: nn.Module,
    text_encoder1: nn.Module | None = None,
    text_encoder2: nn.Module | None = None,
    multiplier: float = 1.0,
) -> MergedLoRA:
    """Read a LoRA file and merge it with ``multiplier``, keeping the original weights (``--network_pre_calc``)."""
    lora = read_lora(path, unet, text_encoder1, text_encoder2)
    merged = MergedLoRA(lora, multiplier, keep_backup=True)
    logger.info("merged LoRA %s (x%g): %d U-Net and %d text encoder layers", path, multiplier,
                len(lora.layers) - lora.n_text_encoder_layers, lora.n_text_encoder_layers)
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
