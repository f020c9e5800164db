"""The benchmark scripts run end to end on the tiny model and print their tables (figures are meaningless)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --tiny runs on one thread; later tests get theirs back


def test_inference_step(capsys, tmp_path):
    import bench_inference_step

    out = tmp_path / "inf.json"
    res = bench_inference_step.main(["--tiny", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "lllite_x2" in printed and "overhead" in printed
    assert set(res["cases"]) == {"plain", "lllite_x1", "lllite_x2"}
    assert res["cases"]["lllite_x1"]["overhead_ratio_median"] > 0 and out.is_file()


def test_train_step(capsys):
    import bench_train_step

    res = bench_train_step.main(["--tiny", "--gradient_checkpointing", "--optimizer", "adamw8bit"])
    printed = capsys.readouterr().out
    assert "unet+lllite" in printed and "LLLite adds" in printed
    assert [c["model"] for c in res["cases"]] == ["unet", "lllite"]
    assert res["cases"][1]["trainable_parameters"] > 0


def test_startup(capsys):
    import bench_startup

    res = bench_startup.main(["--tiny"])
    assert "lllite_load_attach" in capsys.readouterr().out
    assert res["times"]["load_checkpoint"]["median_s"] > 0


def test_load(capsys, tmp_path):
    import bench_load

    from library.sdxl.tiny import build_random_models

    res = bench_load.main(["--tiny", "--work_dir", str(tmp_path), "--te1_layouts", "no_text_model", "--dtypes", "bf16"])
    assert "peak anon rise GB" in capsys.readouterr().out
    (case,) = res["cases"]
    assert case["parameters"] == sum(p.numel() for m in build_random_models() for p in m.parameters())
    assert case["tensors"] == 535 and case["samples"] > 0 and case["peak_anon_rise_bytes"] > 0
    assert not list(tmp_path.glob("*.safetensors"))  # the written checkpoint is deleted
