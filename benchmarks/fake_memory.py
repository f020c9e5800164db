"""Counting a step's memory and FLOPs on fake tensors: no data, no allocation, any model size on a CPU.

Inside ``FakeTensorMode`` tensors carry shapes, dtypes and strides but no values, so the full SDXL
U-Net runs a training step in seconds to minutes on a CPU. ``LiveBytes`` is a dispatch mode that
adds each new storage's bytes when an op returns it and subtracts them when the storage dies
(``weakref.finalize``); its peak is what a GPU's caching allocator must hold at least: allocator
rounding, cuDNN/cuBLAS workspaces and the CUDA context are not in it.

Used by ``benchmarks/bench_memory.py`` and ``tests/test_memory_counting.py``.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


class LiveBytes(TorchDispatchMode):
    """Live tensor storage bytes and their peak, counted per storage (views and in-place ops add nothing)."""

    def __init__(self, detail: bool = False) -> None:
        super().__init__()
        self.detail = detail  # keep what made each storage, for ``peak_breakdown`` (slower)
        self._made_by: dict[int, str] = {}
        self._at_peak: dict[int, str] = {}
        self._at_peak_bytes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.phase = ""
        self.peak_phase = ""
        self.peak_op = ""  # the op whose output made the peak, and whether it ran in backward
        self._op = ""
        self._seen: dict[int, int] = {}  # id(storage) -> bytes, while the storage lives

    def track(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Count tensors made outside the mode (parameters, buffers, the batch)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def set_phase(self, phase: str) -> None:
        """A label for what runs now; the label in force at the peak is kept in ``peak_phase``."""
        self.phase = phase

    def reset_peak(self) -> None:
        self.peak = self.live
        self.peak_phase = self.phase
        self.peak_op = ""

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        n = storage.nbytes()
        self._seen[key] = n
        if self.detail:
            self._made_by[key] = f"{self._op} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        self.live += n
        weakref.finalize(storage, self._free, key)
        if self.live > self.peak:
            self.peak = self.live
            self.peak_phase = self.phase
            self.peak_op = self._op
            if self.detail:
                self._at_peak = {k: self._made_by.get(k, "outside") for k in self._seen}
                self._at_peak_bytes = dict(self._seen)

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)
        self._made_by.pop(key, None)

    def peak_breakdown(self, top: int = 15) -> list[tuple[str, int, int]]:
        """(what made them, count, bytes) of the storages live at the peak, largest first (``detail`` only)."""
        sizes: dict[str, list[int]] = {}
        for key, what in self._at_peak.items():
            entry = sizes.setdefault(what, [0, 0])
            entry[0] += 1
            entry[1] += self._at_peak_bytes.get(key, 0)
        return sorted(((w, c, b) for w, (c, b) in sizes.items()), key=lambda r: -r[2])[:top]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        in_backward = torch._C._current_autograd_node() is not None
        self._op = f"{func.__name__}{' (backward)' if in_backward else ''}"
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def module_tensors(*modules: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of ``modules`` (shared ones once)."""
    seen: set[int] = set()
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                yield t


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct storages of the modules' parameters and buffers."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in module_tensors(*modules)}
    return sum(storages.values())


@contextlib.contextmanager
def fake_mode(default_dtype: torch.dtype = torch.float32) -> Iterator[FakeTensorMode]:
    """Fake CPU tensors, built in ``default_dtype`` (``module.to(dtype)`` does not work on fake parameters)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        torch.set_default_dtype(saved)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` (forward and backward if it runs both). The counter holds tensors: not during a memory count."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
