"""The README demo on the bundled tiny SDXL: a trained LLLite must follow held-out guides better."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import demo  # noqa: E402


def test_bundled_model_is_small_and_loads():
    from library.sdxl.loading import load_sdxl
    from library.sdxl.weights_io import read_metadata

    path = ROOT / "models" / "tiny_sdxl" / "tiny_sdxl.safetensors"
    assert path.stat().st_size <= 30 * 1024 * 1024
    models = load_sdxl(str(path))
    assert models.unet.config.addition_embed_type == "text_time"
    assert models.text_encoder1.config.hidden_size != models.text_encoder2.config.hidden_size
    assert read_metadata(path)  # it records how it was made


def test_short_demo_trains_an_lllite_that_follows_the_guides(tmp_path):
    """Every stage on a small scale (drawn dataset, canny guides made in the training pipeline, real
    training script measuring fidelity as it trains, evaluation, grid, curve), and the trained LLLite
    must already raise edge F1 on held-out guides clearly above the base model's (measured here:
    0.106 -> 0.205, 1.93x; with input and middle blocks only it was 1.41x, and 6 guides with 200
    steps once gave only 1.01x)."""
    out = tmp_path / "demo"
    results = demo.main(["--out", str(out), "--train_images", "48", "--eval_images", "12",
                         "--train_steps", "300", "--gen_steps", "12", "--fidelity_every", "150"])
    images = sorted(p.name for p in (out / "dataset" / "images").glob("*.png"))
    assert 40 <= len(images) <= 48  # drawings without clear edges are dropped
    assert sorted(p.name for p in (out / "dataset" / "images").glob("*.txt")) == [i[:-4] + ".txt" for i in images]
    assert 'conditioning_preprocessor = "canny"' in (out / "dataset.toml").read_text()
    assert not (out / "dataset" / "canny").exists()  # the guides are made in the pipeline, not on disk
    from library.sdxl.weights_io import read_weights

    sd, _ = read_weights(out / "lllite" / "demo_canny.safetensors")
    assert any(k.startswith("lllite_unet_output_blocks_") for k in sd)  # the demo trains the decoder side too
    assert set(results["mean"]) == {"0", "1"} and len(results["per_item"]) == 36  # 12 x (2 multipliers + reference)
    # img2img from the guide's own source keeps its layout, so the metric must score it above the baseline
    assert results["reference"]["f1"] > results["mean"]["0"]["f1"]
    assert all(0.0 <= r["f1"] <= 1.0 for r in results["per_item"])
    fid = results["prompt_fidelity"]
    assert set(fid) == {"0", "1"} and all(0.0 <= v <= 1.0 for f in fid.values() for v in f.values())
    assert fid["0"]["shape"] > 0.5  # the base model alone draws the asked-for shape most of the time
    assert results["mean"]["1"]["f1"] >= 1.5 * results["mean"]["0"]["f1"], results["mean"]
    # The curve the training script logged to TensorBoard: the same guides, seeds and settings, so it starts at the
    # baseline and ends at the final evaluation's figures.
    curve = results["fidelity_curve"]
    assert [c["step"] for c in curve] == [0, 150, 300]
    assert all(c["edge_f1_base"] == pytest.approx(results["mean"]["0"]["f1"], abs=1e-6) for c in curve)
    assert curve[0]["edge_f1"] == pytest.approx(results["mean"]["0"]["f1"], abs=1e-6)
    assert curve[-1]["edge_f1"] == pytest.approx(results["mean"]["1"]["f1"], abs=1e-6)
    assert curve[-1]["edge_ssim"] == pytest.approx(results["mean"]["1"]["ssim"], abs=1e-6)
    assert Image.open(out / "fidelity_curve.png").size == (640, 360)
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 3 * 128 and grid.height > 8 * 128  # 12 guides: two groups of up to 8 rows
    assert (out / "fidelity.json").is_file()
    # eval/guides holds exactly the evaluated guides with their prompts, ready for tools/evaluate_control.py
    from library.evaluation.control_eval import load_eval_set

    again = load_eval_set(out / "eval" / "guides", sources=out / "eval" / "drawn")
    assert sorted(str(i.guide) for i in again) == sorted({r["guide"] for r in results["per_item"]})
    assert all(i.source.parent == out / "eval" / "drawn" for i in again)


@pytest.mark.slow
def test_full_demo_raises_edge_f1(tmp_path):
    """The README's command. The issue aims at 2x the baseline; the README's run measured 1.92x (1.99x
    before the guides were made in the training pipeline), and runs with other image counts, timesteps
    and seeds 1.85-2.04x, so this asserts a margin below all."""
    results = demo.main(["--out", str(tmp_path / "demo")])
    assert results["mean"]["1"]["f1"] >= 1.6 * results["mean"]["0"]["f1"], results["mean"]


def test_grid_puts_rows_in_side_by_side_groups(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    items = []
    for i in range(10):
        guide = tmp_path / f"g{i}.png"
        Image.new("RGB", (16, 16), (i, 0, 0)).save(guide)
        for m in (0, 1):
            Image.new("RGB", (16, 16), (i, 100 * (m + 1), 0)).save(tmp_path / f"g{i}_m{m}.png")
        items.append(SimpleNamespace(guide=guide))
    demo.make_grid(items, tmp_path, tmp_path / "grid.png", size=32, rows_per_column=8)
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    group_w = 3 * 32 + 4 * 4
    assert grid.size == (2 * group_w, 14 + 8 * 36 + 4)
    # The ninth guide opens the second group: its "with" tile is there, in the first row.
    assert grid.getpixel((group_w + 4 + 2 * 36 + 5, 14 + 4 + 5)) == (8, 200, 0)
    assert grid.getpixel((4 + 5, 14 + 4 + 7 * 36 + 5)) == (7, 0, 0)
