"""Memory counted on fake tensors (benchmarks/fake_memory.py) and what it guards: the guide embedding of a
training step lives inside the checkpointed U-Net blocks, not through the whole step (issue 22)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))  # undone afterwards, with what the modules add on import
        import bench_memory
        import fake_memory

        yield types.SimpleNamespace(bench_memory=bench_memory, fake_memory=fake_memory)


def test_live_bytes_counts_each_storage_once_and_subtracts_freed_ones(bench):
    LiveBytes = bench.fake_memory.LiveBytes

    with bench.fake_memory.fake_mode(torch.float32):
        counter = LiveBytes()
        with counter:
            a = torch.empty(1000)  # 4000 bytes
            view = a.view(10, 100)  # same storage: nothing added
            view.mul_(2)  # in place: nothing added
            b = a * 2  # 4000 more
            assert counter.live == 8000
            del b
            assert counter.live == 4000
            c = torch.empty(250, dtype=torch.bfloat16)  # 500
        assert (counter.live, counter.peak) == (4500, 8000)
        assert counter.peak_op.startswith("mul")
        del a, view, c


@pytest.fixture(scope="module")
def tiny_steps(bench):
    """Counted second training steps of the tiny model at 128 px, batch 1 and 2, gradient checkpointing on.

    With output-block modules too: the tiny U-Net is so narrow that its own per-image activations are
    about those of 12 modules' conditioning graphs; 24 modules make the difference plain (embedding
    before the U-Net, as before issue 22, grew 5.9 MB per image here against 3.9 MB of graphs; inside
    the blocks, 2.0 MB).
    """
    from accelerate.state import AcceleratorState

    try:
        return {b: bench.bench_memory.count_training_step("tiny", batch=b, resolution=128, flops=False,
                                                          include_output_blocks=True) for b in (1, 2)}
    finally:
        AcceleratorState._reset_state(True)  # later tests make their own Accelerator


def test_checkpointed_step_grows_with_batch_by_less_than_the_conditioning_graphs(tiny_steps):
    one, two = tiny_steps[1], tiny_steps[2]
    per_image = two["conditioning_graph_bytes"] - one["conditioning_graph_bytes"]
    growth = two["peak_bytes"] - one["peak_bytes"]
    # Embedding every guide before the U-Net (outside the checkpointed blocks) would hold all modules'
    # conditioning graphs through the step: the peak would grow by at least that much per image.
    assert per_image > 0 and 0 < growth < per_image, (growth, per_image)
    assert one["weight_bytes"] == two["weight_bytes"] and one["peak_bytes"] > one["weight_bytes"]
    # the peak is in backward, where activations held through the step count (not in the optimizer step)
    assert one["peak_op"].endswith("(backward)") and two["peak_op"].endswith("(backward)")
    assert one["trainable_parameters"] > 0
