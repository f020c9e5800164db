"""Where a torch module lives: the dtype and device of its weights (the first parameter's, as diffusers reads them)."""

from __future__ import annotations

import torch


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
