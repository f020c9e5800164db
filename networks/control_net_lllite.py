"""ControlNet-LLLite for a diffusers SDXL U-Net, in the published file layout.

A module sits on each of ``attn1.to_q/to_k/to_v`` and ``attn2.to_q`` of the transformer blocks in
the input and middle blocks. It embeds the conditioning image (``conditioning1``), mixes the
embedding with a low-rank projection of the linear's input (``down``, ``mid``) and adds
``multiplier * up(...)`` to that input:

    y = W(x + multiplier * up(relu(mid(concat(e, relu(down(x)))))))

Attaching uses forward pre-hooks on those linears only: no class is patched, and ``detach()``
restores the U-Net exactly. Several networks may share a U-Net; each linear then gets one hook
that adds every network's residual computed from the same original input, so the order in which
networks were attached does not matter. A pre-hook on each attention block (Transformer2DModel)
records its input's height and width, so the guide embedding is resized to the exact token grid
of every call, whatever shrinks the latents on the way (odd sizes, Deep Shrink, Gradual Latent).

When the embedding is computed: without autograd (generation) once per image, in
``set_cond_image``, and reused by every step. Under autograd (training) inside each module's hook,
that is inside the U-Net block that uses it: under gradient checkpointing the block, embedding
included, is recomputed in backward, so the 136 embeddings' activations of the full-size guide are
not held through the step (about 1 GiB per 1024x1024 image, measured with
benchmarks/bench_memory.py). Each linear runs once per U-Net call, so the forward work is the same.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.sdxl.weights_io import (
    KIND_LLLITE,
    read_weights,
    weights_kind,
    write_weights,
)

logger = logging.getLogger(__name__)

PREFIX = "lllite_unet_"
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")
ARCHITECTURE = "stable-diffusion-xl-v1-base/control-net-lllite"
MAX_DEPTH = 3  # the format defines conditioning stacks for depths 1..3


# ----------------------------------------------------------------------------------------------
# Where modules go
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One wrapped linear: its LLLite module name, the linear, and the conditioning depth."""

    name: str
    linear: nn.Linear
    depth: int
    block: nn.Module | None = None  # the attention block (Transformer2DModel) the linear is in


def _ldm_attention_paths(unet: nn.Module, include_output_blocks: bool) -> Iterator[tuple[str, nn.Module, int]]:
    """(ldm path, diffusers Transformer2DModel, depth) for every attention block of the U-Net."""
    lpb = unet.config.layers_per_block
    n_levels = len(unet.down_blocks)
    for i, block in enumerate(unet.down_blocks):
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            yield f"input_blocks.{1 + (lpb + 1) * i + j}.1", attn, i + 1
    mid = getattr(unet, "mid_block", None)
    for attn in (getattr(mid, "attentions", None) or [])[:1]:
        yield "middle_block.1", attn, n_levels
    if include_output_blocks:
        for i, block in enumerate(unet.up_blocks):
            for j, attn in enumerate(getattr(block, "attentions", None) or []):
                yield f"output_blocks.{(lpb + 1) * i + j}.1", attn, n_levels - i


def find_targets(unet: nn.Module, include_output_blocks: bool = False) -> list[Target]:
    """Every linear an LLLite module can wrap, in the published order."""
    targets = []
    for path, attn, depth in _ldm_attention_paths(unet, include_output_blocks):
        for k, tb in enumerate(attn.transformer_blocks):
            for target in TARGETS:
                linear = tb.get_submodule(target)
                name = PREFIX + f"{path}.transformer_blocks.{k}.{target}".replace(".", "_")
                targets.append(Target(name, linear, min(depth, MAX_DEPTH), attn))
    return targets


# ----------------------------------------------------------------------------------------------
# One module
# ----------------------------------------------------------------------------------------------


def _conditioning_stack(cond_emb_dim: int, depth: int) -> nn.Sequential:
    half = cond_emb_dim // 2
    # In-place ReLUs: a convolution's backward needs its input, not its output, so the ReLU may overwrite
    # the output and the graph keeps one tensor per layer instead of two.
    layers: list[nn.Module] = [nn.Conv2d(3, half, 4, 4), nn.ReLU(inplace=True)]
    if depth == 1:
        layers += [nn.Conv2d(half, cond_emb_dim, 2, 2)]
    elif depth == 2:
        layers += [nn.Conv2d(half, cond_emb_dim, 4, 4)]
    else:
        layers += [nn.Conv2d(half, half, 4, 4), nn.ReLU(inplace=True), nn.Conv2d(half, cond_emb_dim, 2, 2)]
    return nn.Sequential(*layers)


def _grid_for(tokens: int, aspect_hw: float) -> tuple[int, int]:
    """The (h, w) factorisation of ``tokens`` closest to the embedding's aspect ratio."""
    best = None
    for h in range(1, int(math.isqrt(tokens)) + 1):
        if tokens % h:
            continue
        for gh in (h, tokens // h):
            gw = tokens // gh
            score = abs(math.log(gh / gw) - math.log(aspect_hw))
            if best is None or score < best[0]:
                best = (score, gh, gw)
    return best[1], best[2]


class LLLiteModule(nn.Module):
    """The conditioning embedding and low-rank residual for one wrapped linear."""

    def __init__(self, in_dim: int, cond_emb_dim: int, network_dim: int, depth: int, dropout: float = 0.0):
        super().__init__()
        self.depth = depth
        self.dropout = dropout
        self.conditioning1 = _conditioning_stack(cond_emb_dim, depth)
        self.down = nn.Sequential(nn.Linear(in_dim, network_dim), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(network_dim + cond_emb_dim, network_dim), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(network_dim, in_dim))
        # A fresh module must not change the U-Net's output, so the whole last layer starts at zero.
        nn.init.zeros_(self.up[0].weight)
        nn.init.zeros_(self.up[0].bias)
        self.cond_emb: torch.Tensor | None = None  # (b, C, h, w), set once per image (generation)
        self.cond_image: torch.Tensor | None = None  # (b, 3, H, W), embedded at each use (training)
        self._emb_tokens: dict[int, torch.Tensor] = {}

    def set_cond_emb(self, emb: torch.Tensor | None) -> None:
        """An embedding computed once and reused by every call (generation)."""
        self.cond_emb = emb
        self.cond_image = None
        self._emb_tokens = {}

    def set_cond_source(self, image: torch.Tensor | None) -> None:
        """A guide image embedded at each use, inside the caller's block (training; nothing is cached)."""
        self.cond_emb = None
        self.cond_image = image
        self._emb_tokens = {}

    @property
    def has_cond(self) -> bool:
        return self.cond_emb is not None or self.cond_image is not None

    def _embedding(self) -> torch.Tensor:
        return self.cond_emb if self.cond_emb is not None else self.conditioning1(self.cond_image)

    def _grid(self, n: int, grid: tuple[int, int] | None, emb: torch.Tensor | None = None) -> tuple[int, int]:
        """The (h, w) of ``n`` tokens: the block's recorded grid, else the embedding's, else a guess."""
        if grid is not None and grid[0] * grid[1] == n:
            return tuple(grid)
        h, w = (self.cond_emb if emb is None else emb).shape[-2:]
        return (h, w) if h * w == n else _grid_for(n, h / w)

    def tokens_for(self, n: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The embedding as (b, n, C) tokens, resized when the block's (h, w) grid differs from it.

        Cached per grid when the embedding is stored (generation); computed afresh from the guide
        when it is not (training), so nothing outlives the block that uses it.
        """
        cache = self.cond_emb is not None
        if cache:
            grid = self._grid(n, grid)
            cached = self._emb_tokens.get(grid)
            if cached is not None:
                return cached
        emb = self._embedding()
        grid = self._grid(n, grid, emb)
        if tuple(emb.shape[-2:]) != grid:
            # odd latent sides round differently per level; Deep Shrink and Gradual Latent shrink the grid
            emb = F.interpolate(emb, size=grid, mode="bilinear", align_corners=False)
        tokens = emb.flatten(2).transpose(1, 2)
        if cache:
            self._emb_tokens[grid] = tokens
        return tokens

    def _cond_part(self, n: int, dtype: torch.dtype | None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The conditioning half of ``mid`` plus its bias, ``e @ W_e.T + b``: (b, n, network_dim).

        ``mid(concat(e, h)) == h @ W_h.T + (e @ W_e.T + b)``, and the second term depends on the
        image only, so inference computes it once per image and grid size (not per step) and
        never materialises the concatenation or the CFG repeat of ``e``. Under autograd it is
        computed per call so that gradients reach ``conditioning1`` and ``mid``.
        """
        lin = self.mid[0]
        c = lin.in_features - self.down[0].out_features
        key = None
        if not torch.is_grad_enabled() and self.cond_emb is not None:
            # a changed weight (in-place load or update) or dtype never reuses a stale entry
            key = ("cond_part", self._grid(n, grid), dtype, lin.weight.data_ptr(), lin.weight._version,
                   lin.bias._version)
            cached = self._emb_tokens.get(key)
            if cached is not None:
                return cached
        e = self.tokens_for(n, grid)
        w, b = lin.weight[:, :c], lin.bias
        if dtype is not None:
            e = e.to(dtype)
        part = F.linear(e, w, b)
        if key is not None:
            self._emb_tokens[key] = part
        return part

    def residual(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``up(mid(concat(e, down(x))))`` for input ``x`` of shape (batch, tokens, D) on an (h, w) ``grid``."""
        n = x.shape[1]
        down, up = self.down[0], self.up[0]
        # Under autocast (mixed-precision training) compute in its dtype, with explicit casts: autocast's
        # own casts of leaf weights are cached until the forward pass ends, so every module's bf16
        # copy of ``down`` and ``up`` would be held at once (45 MiB for SDXL at the end of the forward).
        # These casts belong to the graph, and under gradient checkpointing are recomputed in backward.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else down.weight.dtype
        h = F.relu(F.linear(x.to(dtype), down.weight.to(dtype), down.bias.to(dtype)))
        part = self._cond_part(n, dtype, grid)
        bx, be = x.shape[0], part.shape[0]
        if bx != be and bx % be:
            raise ValueError(f"LLLite: batch of x ({bx}) is not a multiple of the conditioning batch ({be})")
        lin = self.mid[0]
        h = F.linear(h, lin.weight[:, lin.in_features - h.shape[-1]:])
        if bx == be:
            h = h + part
        else:
            # classifier-free guidance: the same embedding serves the uncond and cond halves,
            # which are stacked along the batch ([uncond images..., cond images...])
            h = (h.view(bx // be, be, n, -1) + part).view(bx, n, -1)
        h = F.relu(h)
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout)
        return F.linear(h, up.weight.to(h.dtype), up.bias.to(h.dtype)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Hooks shared by every network attached to one U-Net
# ----------------------------------------------------------------------------------------------


class _GridProbe:
    """A pre-hook on one attention block that records the (h, w) of its input, shared by its slots."""

    def __init__(self, block: nn.Module):
        self.grid: tuple[int, int] | None = None
        self.users = 0
        self.handle = block.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        self.grid = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None


class _Slot:
    """The single pre-hook of one linear, summing the residuals of every attached network."""

    def __init__(self, linear: nn.Linear, probe: _GridProbe | None = None):
        self.entries: list[tuple["ControlNetLLLite", LLLiteModule]] = []
        self.probe = probe
        self.handle = linear.register_forward_pre_hook(self)

    def __call__(self, linear: nn.Module, args: tuple):
        x = args[0]
        out = x
        grid = self.probe.grid if self.probe is not None else None
        for network, module in self.entries:
            # While training a 0 multiplier still joins the graph, so a batch of a network_multiplier = 0
            # dataset backpropagates (zero gradients) like any other; DDP needs every gradient too.
            if network.active and (network.multiplier != 0.0 or network.training) and module.has_cond:
                out = torch.add(out, module.residual(x, grid), alpha=network.multiplier)  # one pass, no temporary
        if out is x:
            return None
        return (out,) + tuple(args[1:])


_SLOT_ATTR = "_lllite_slot"  # set on the wrapped linear instances only, removed on detach
_PROBE_ATTR = "_lllite_grid_probe"  # set on the attention blocks only, removed with their last slot


def _new_slot(target: Target) -> _Slot:
    probe = None
    if target.block is not None:
        probe = getattr(target.block, _PROBE_ATTR, None)
        if probe is None:
            probe = _GridProbe(target.block)
            setattr(target.block, _PROBE_ATTR, probe)
        probe.users += 1
    return _Slot(target.linear, probe)


def _drop_slot(target: Target, slot: _Slot) -> None:
    slot.handle.remove()
    delattr(target.linear, _SLOT_ATTR)
    if slot.probe is not None:
        slot.probe.users -= 1
        if not slot.probe.users:
            slot.probe.handle.remove()
            delattr(target.block, _PROBE_ATTR)


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


class ControlNetLLLite(nn.Module):
    """All LLLite modules of one model; ``state_dict()`` has the published keys."""

    def __init__(
        self,
        unet: nn.Module,
        cond_emb_dim: int = 32,
        network_dim: int = 64,
        dropout: float = 0.0,
        multiplier: float = 1.0,
        include_output_blocks: bool = False,
        names: set[str] | None = None,
    ):
        super().__init__()
        if cond_emb_dim < 2 or cond_emb_dim % 2:
            raise UserError(f"cond_emb_dim must be an even number >= 2, got {cond_emb_dim}")
        if network_dim < 1:
            raise UserError(f"network_dim must be >= 1, got {network_dim}")
        self.cond_emb_dim = cond_emb_dim
        self.network_dim = network_dim
        self.multiplier = multiplier
        self.active = True
        targets = find_targets(unet, include_output_blocks or bool(names and any("output_blocks" in n for n in names)))
        if names is not None:
            targets = [t for t in targets if t.name in names]
        if not targets:
            raise UserError("this U-Net has no attention blocks where LLLite modules could go")
        self._targets = targets
        for t in targets:
            self.add_module(t.name, LLLiteModule(t.linear.in_features, cond_emb_dim, network_dim, t.depth, dropout))
        self._attached = False
        logger.info("created %d LLLite modules (cond_emb_dim=%d, network_dim=%d)", len(targets), cond_emb_dim, network_dim)

    # -- modules -------------------------------------------------------------------------------

    def lllite_modules(self) -> Iterator[tuple[Target, LLLiteModule]]:
        for t in self._targets:
            yield t, getattr(self, t.name)

    @property
    def has_output_blocks(self) -> bool:
        return any("output_blocks" in t.name for t in self._targets)

    @property
    def depth_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for t in self._targets:
            counts[t.depth] = counts.get(t.depth, 0) + 1
        return counts

    # -- attaching -----------------------------------------------------------------------------

    def attach(self) -> "ControlNetLLLite":
        """Hook the modules into their linears (idempotent)."""
        if self._attached:
            return self
        for t, module in self.lllite_modules():
            slot = getattr(t.linear, _SLOT_ATTR, None)
            if slot is None:
                slot = _new_slot(t)
                setattr(t.linear, _SLOT_ATTR, slot)
            slot.entries.append((self, module))
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove this network's hooks; the U-Net computes exactly what it did before."""
        if not self._attached:
            return
        for t, module in self.lllite_modules():
            slot = getattr(t.linear, _SLOT_ATTR)
            slot.entries = [(n, m) for n, m in slot.entries if m is not module]
            if not slot.entries:
                _drop_slot(t, slot)
        self._attached = False

    # -- conditioning --------------------------------------------------------------------------

    def set_cond_image(self, cond_image: torch.Tensor | None) -> None:
        """Set the conditioning image (b, 3, H, W) in [-1, 1] for the following U-Net calls.

        Without autograd (generation) each module embeds it here, once per image, and every call
        (every denoising step) reuses the embedding. Under autograd (training) each module embeds it
        in its hook, inside the U-Net block that uses it, so ``conditioning1`` trains and, under
        gradient checkpointing, the embedding is recomputed in backward instead of being held.
        """
        if cond_image is None:
            for _, m in self.lllite_modules():
                m.set_cond_emb(None)
            return
        w = next(m for _, m in self.lllite_modules()).conditioning1[0].weight
        image = cond_image.to(device=w.device, dtype=w.dtype)
        if not torch.is_grad_enabled():
            # Modules of the same depth have different weights, so each embeds the image itself;
            # the work is small next to one U-Net step and happens once per image, not per step.
            for _, m in self.lllite_modules():
                m.set_cond_emb(m.conditioning1(image))
            return
        device_type = image.device.type
        if torch.is_autocast_enabled(device_type) and image.is_floating_point():
            # Autocast would cast the image for each module's first convolution, and without
            # checkpointing every module's graph would keep its own copy: one shared cast instead.
            image = image.to(torch.get_autocast_dtype(device_type))
        for _, m in self.lllite_modules():
            m.set_cond_source(image)

    def forward(self, cond_image: torch.Tensor, unet: nn.Module, *unet_args, **unet_kwargs):
        """Training step: embed ``cond_image``, then run ``unet`` (attached, not owned by this module).

        Going through ``forward`` lets DistributedDataParallel wrap the network alone: it syncs
        only LLLite gradients, and saved states hold only LLLite weights.
        """
        self.set_cond_image(cond_image)
        return unet(*unet_args, **unet_kwargs)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)

    def set_active(self, active: bool) -> None:
        self.active = bool(active)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> None:
        """Write the published layout (safetensors with modelspec metadata, or .pt/.ckpt)."""
        sd = self.state_dict()
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        meta = default_metadata(self, Path(path).stem)
        meta.update(metadata or {})
        write_weights(path, sd, meta)

    @classmethod
    def from_file(cls, unet: nn.Module, path: str | Path, multiplier: float = 1.0, dropout: float = 0.0,
                  dtype: torch.dtype | None = None) -> "ControlNetLLLite":
        """Build a network that fits ``path`` (dims inferred from shapes) on ``unet`` and load it."""
        sd, _ = read_weights(path, "LLLite file")
        return cls.from_state_dict(unet, sd, source=str(path), multiplier=multiplier, dropout=dropout, dtype=dtype)

    @classmethod
    def from_state_dict(cls, unet: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "state dict",
                        multiplier: float = 1.0, dropout: float = 0.0, dtype: torch.dtype | None = None):
        dims = infer_dims(sd, source)
        names = {k.split(".", 1)[0] for k in sd}
        available = {t.name: t for t in find_targets(unet, include_output_blocks=True)}
        unknown = sorted(n for n in names if n not in available)
        if unknown:
            raise UserError(
                f"{source} does not fit this U-Net: module {unknown[0]} has no matching attention layer "
                f"({len(unknown)} of {len(names)} modules). Is it an LLLite for another base model (e.g. SD1.5)?"
            )
        net = cls(unet, dims.cond_emb_dim, dims.network_dim, dropout=dropout, multiplier=multiplier, names=names)
        net.load_weights(sd, source)
        if dtype is not None:
            net.to(dtype)
        return net

    def load_weights(self, sd: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load published-layout weights, naming the first key that does not fit."""
        own = self.state_dict()
        for key, value in sd.items():
            if key not in own:
                raise UserError(f"{source}: unexpected key {key}; this file does not fit the network.")
            if tuple(own[key].shape) != tuple(value.shape):
                raise UserError(
                    f"{source} does not fit this U-Net: {key} has shape {list(value.shape)} in the file but "
                    f"{list(own[key].shape)} here. Is it an LLLite for another base model (e.g. SD1.5)?"
                )
        missing = [k for k in own if k not in sd]
        if missing:
            raise UserError(f"{source}: missing key {missing[0]} ({len(missing)} missing); the file is incomplete.")
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


# ----------------------------------------------------------------------------------------------
# File facts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLLiteDims:
    cond_emb_dim: int
    network_dim: int


def infer_dims(sd: Mapping[str, torch.Tensor], source: str = "file") -> LLLiteDims:
    """cond_emb_dim and network_dim from tensor shapes, as the format defines them."""
    kind = weights_kind(sd.keys())
    if kind != KIND_LLLITE:
        hint = {
            "SDXL checkpoint": " It is an SDXL base checkpoint: give it with --ckpt / --pretrained_model_name_or_path.",
        }.get(kind, "")
        raise UserError(f"{source} is not a ControlNet-LLLite file (it looks like: {kind}).{hint}")
    first = next(k for k in sd if k.endswith(".conditioning1.0.weight"))
    name = first.split(".", 1)[0]
    try:
        return LLLiteDims(int(sd[first].shape[0]) * 2, int(sd[f"{name}.down.0.weight"].shape[0]))
    except KeyError as e:
        raise UserError(f"{source}: LLLite module {name} is missing {e}; the file is damaged.") from None


def module_depth(sd: Mapping[str, torch.Tensor], name: str) -> int:
    if f"{name}.conditioning1.4.weight" in sd:
        return 3
    return 2 if sd[f"{name}.conditioning1.2.weight"].shape[-1] == 4 else 1


@functools.cache
def implementation_version() -> str:
    """``sdxl-lllite/<commit>`` of this checkout, as sd-scripts writes ``sd-scripts/<commit>``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1])
    except (OSError, subprocess.SubprocessError):
        return "sdxl-lllite/unknown"
    commit = out.stdout.strip()
    return f"sdxl-lllite/{commit}" if out.returncode == 0 and commit else "sdxl-lllite/unknown"


def default_metadata(network: ControlNetLLLite, title: str) -> dict[str, str]:
    """The modelspec fields sd-scripts writes into an SDXL LLLite file (ModelSpec 1.0.1), and the network's shape."""
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",  # sd-scripts' value for SDXL adapters
        "modelspec.implementation_version": implementation_version(),
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "ss_network_module": "networks.control_net_lllite",
        "ss_network_dim": str(network.network_dim),
        "ss_cond_emb_dim": str(network.cond_emb_dim),
    }


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """What a user wants to know about an LLLite file (used by tools/lllite_info.py)."""
    dims = infer_dims(sd)
    names = sorted({k.split(".", 1)[0] for k in sd})
    per_depth: dict[int, int] = {}
    for n in names:
        d = module_depth(sd, n)
        per_depth[d] = per_depth.get(d, 0) + 1
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    return {
        "modules": len(names),
        "cond_emb_dim": dims.cond_emb_dim,
        "network_dim": dims.network_dim,
        "modules_per_depth": dict(sorted(per_depth.items())),
        "dtype": ",".join(dtypes),
        "parameters": sum(v.numel() for v in sd.values()),
        "output_blocks": any("output_blocks" in n for n in names),
        "blocks": sorted({re.sub(r"_transformer_blocks_.*", "", n[len(PREFIX):]) for n in names}),
    }
