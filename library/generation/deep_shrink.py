"""Deep Shrink on a diffusers SDXL U-Net, with forward hooks that live for one generation call.

What it does (sd-scripts' ``--ds_*``, see :class:`library.generation.requests.DeepShrink`): at the
timesteps it covers, the hidden state is resized by ``ratio`` just before one input block of the
original SDXL layout, so the deeper blocks work on a smaller grid (fewer repeated objects in large
images); the decoder brings it back to each skip connection's size before that skip is joined.

The original layout's input blocks map onto diffusers modules in order: ``conv_in``, then for each
down block its resnets and its downsampler. Hooks:

* a pre-hook on the U-Net reads the timestep and the sample size of each call;
* a pre-hook on input block ``depth`` shrinks its input while the timestep is in the window;
* a pre-hook on every up block, and a hook on the last module of every resnet(/attention) pair
  inside it, resize the hidden state to the skip connection it is joined with next;
* a pre-hook on ``conv_norm_out`` restores the sample's size (needed when ``conv_in`` was shrunk).

No class is patched and nothing is left behind: :func:`deep_shrink` removes every hook on exit.
LLLite modules inside the shrunk blocks see a smaller token grid; they resize their guide embedding
to it (``networks/control_net_lllite.py``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.generation.requests import DeepShrink

logger = logging.getLogger(__name__)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (b, c, h, w) tensor; bf16 goes through fp32, which bicubic needs on some devices."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = F.interpolate(x.float() if x.dtype == torch.bfloat16 else x, size=size, mode="bicubic", align_corners=False)
    return y.to(x.dtype)


def input_blocks(unet: nn.Module) -> list[nn.Module]:
    """The diffusers modules that are the original layout's input blocks, in order."""
    modules: list[nn.Module] = [unet.conv_in]
    for block in unet.down_blocks:
        modules += list(block.resnets)
        modules += list(getattr(block, "downsamplers", None) or [])
    return modules


@dataclass
class _State:
    settings: DeepShrink
    timestep: float = 0.0
    sample_size: tuple[int, int] = (0, 0)
    skips: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)


_HIDDEN_NAMES = ("hidden_states", "input_tensor", "sample")  # the first argument's name in diffusers' modules


def _hidden_name(kwargs: dict) -> str:
    return next(n for n in _HIDDEN_NAMES if n in kwargs)


def _with_first(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """(args, kwargs) with the hidden-state argument (first positional, or by keyword) replaced by fn(it)."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    name = _hidden_name(kwargs)
    return args, {**kwargs, name: fn(kwargs[name])}


def _first(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs[_hidden_name(kwargs)]


def _replace_output(output: Any, fn) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    output.sample = fn(output.sample)  # a diffusers output dataclass
    return output


class _Hooks:
    """The hook functions, bound to one :class:`_State`."""

    def __init__(self, state: _State):
        self.state = state

    def read_call(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.state.timestep = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        self.state.sample_size = tuple(_first(args, kwargs).shape[-2:])
        self.state.skips.clear()

    def shrink_before(self, depth: int):
        def hook(module, args, kwargs):
            s = self.state
            if s.settings.depth_at(s.timestep) != depth:
                return None

            def shrink(x: torch.Tensor) -> torch.Tensor:
                h, w = x.shape[-2:]
                return resize(x, (max(1, int(h * s.settings.ratio)), max(1, int(w * s.settings.ratio))))

            return _with_first(args, kwargs, shrink)

        return hook

    def enter_up_block(self, module, args, kwargs):
        skips = args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]
        self.state.skips[id(module)] = skips
        return _with_first(args, kwargs, lambda x: resize(x, skips[-1].shape[-2:]))

    def after_pair(self, block: nn.Module, j: int):
        def hook(module, args, output):
            skips = self.state.skips.get(id(block))
            if not skips or len(skips) < j + 2:
                return None
            return _replace_output(output, lambda x: resize(x, skips[-(j + 2)].shape[-2:]))

        return hook

    def restore_size(self, module, args):
        return (resize(args[0], self.state.sample_size),) + tuple(args[1:])


def _pair_ends(block: nn.Module) -> list[nn.Module]:
    """The module that ends each resnet(/attention) pair of an up block, in order."""
    attentions = getattr(block, "attentions", None)
    return list(attentions) if attentions else list(block.resnets)


@contextlib.contextmanager
def deep_shrink(unet: nn.Module, settings: DeepShrink) -> Iterator[_State]:
    """Apply ``settings`` to every call of ``unet`` inside the block; a no-op context when it is off."""
    state = _State(settings)
    if not settings.enabled:
        yield state
        return
    blocks = input_blocks(unet)
    for depth in (settings.depth_1, settings.depth_2):
        if depth is not None and depth >= len(blocks):
            raise UserError(f"Deep Shrink depth {depth} does not exist in this U-Net: it has {len(blocks)} input "
                            f"blocks, so use 0 to {len(blocks) - 1} (SDXL: 0 to 8)")
    hooks = _Hooks(state)
    handles = [unet.register_forward_pre_hook(hooks.read_call, with_kwargs=True)]
    for depth in {settings.depth_1, settings.depth_2} - {None}:
        handles.append(blocks[depth].register_forward_pre_hook(hooks.shrink_before(depth), with_kwargs=True))
    for block in unet.up_blocks:
        handles.append(block.register_forward_pre_hook(hooks.enter_up_block, with_kwargs=True))
        for j, end in enumerate(_pair_ends(block)[:-1]):
            handles.append(end.register_forward_hook(hooks.after_pair(block, j)))
    last = unet.conv_norm_out if getattr(unet, "conv_norm_out", None) is not None else unet.conv_out
    handles.append(last.register_forward_pre_hook(hooks.restore_size))
    second = "" if settings.depth_2 is None else f", block {settings.depth_2} down to timestep {settings.timesteps_2}"
    logger.info("Deep Shrink: input block %d shrunk by %g while the timestep is at least %d%s", settings.depth_1,
                settings.ratio, settings.timesteps_1, second)
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
