"""tools/evaluate_control.py: per-multiplier edge F1/SSIM table and JSON; --debug_dataset output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from library.errors import UserError
from library.evaluation.control_eval import load_eval_set
from library.sdxl.tiny import build_random_models
from networks.control_net_lllite import ControlNetLLLite

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import evaluate_control  # noqa: E402


def make_guides(folder: Path, n: int = 2, size: int = 64) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), 0)
        ImageDraw.Draw(img).ellipse([8 + 4 * i, 8, 40 + 4 * i, 40], outline=(255, 255, 255))
        img.save(folder / f"g{i}.png")
        (folder / f"g{i}.txt").write_text("a circle")


def test_evaluate_control_tool(tmp_path, tiny_checkpoint, capsys):
    make_guides(tmp_path / "guides")
    # a guide without edges says nothing about control: skipped and listed, not averaged in
    Image.new("RGB", (64, 64), 0).save(tmp_path / "guides" / "blank.png")
    (tmp_path / "guides" / "blank.txt").write_text("a circle")
    net = ControlNetLLLite(build_random_models()[0], cond_emb_dim=8, network_dim=8)
    with torch.no_grad():
        for _, m in net.lllite_modules():
            m.up[0].weight.normal_(0, 0.5)
    lllite = tmp_path / "lllite.safetensors"
    net.save(lllite)
    # the images the guides were "made from", for the reference row (any extension, same stem)
    (tmp_path / "sources").mkdir()
    for name in ("g0", "g1", "blank"):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "sources" / f"{name}.jpg")
    out = tmp_path / "results.json"
    evaluate_control.main(["--ckpt", str(tiny_checkpoint), "--lllite", str(lllite), "--guides", str(tmp_path / "guides"),
                           "--W", "64", "--H", "64", "--steps", "2", "--json", str(out),
                           "--save_images", str(tmp_path / "imgs"), "--sources", str(tmp_path / "sources"),
                           "--reference_strength", "0.6"])
    printed = capsys.readouterr().out
    assert "| multiplier | edge F1 | edge SSIM |" in printed and "| 0 |" in printed and "| 1 |" in printed
    assert "| reference: img2img from the source, strength 0.6, no LLLite |" in printed
    results = json.loads(out.read_text())
    assert set(results["mean"]) == {"0", "1"}
    assert len(results["per_item"]) == 6  # 2 guides x (2 multipliers + 1 reference)
    refs = [r for r in results["per_item"] if "reference_strength" in r]
    assert len(refs) == 2 and all(r["reference_strength"] == 0.6 for r in refs)
    assert results["reference"]["strength"] == 0.6
    assert results["reference"]["f1"] == pytest.approx(np.mean([r["f1"] for r in refs]))
    assert (tmp_path / "imgs" / "g0_ref.png").is_file()
    assert [Path(p).name for p in results["skipped_without_edges"]] == ["blank.png"]
    assert all(0.0 <= r["f1"] <= 1.0 and -1.0 <= r["ssim"] <= 1.0 for r in results["per_item"])
    # the LLLite changes the image: its outputs differ from the baseline's
    a = np.asarray(Image.open(tmp_path / "imgs" / "g0_m0.png"))
    b = np.asarray(Image.open(tmp_path / "imgs" / "g0_m1.png"))
    assert not np.array_equal(a, b)


def test_eval_set_needs_prompts(tmp_path):
    folder = tmp_path / "guides"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    with pytest.raises(UserError, match="no prompt file"):
        load_eval_set(folder)
    assert load_eval_set(folder, prompt="p")[0].prompt == "p"


def test_sources_must_cover_every_guide(tmp_path, tiny_checkpoint):
    make_guides(tmp_path / "guides")
    (tmp_path / "sources").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "sources" / "g0.png")
    with pytest.raises(UserError, match=r"no source image for 1 guide\(s\) \(e.g. g1\)"):
        load_eval_set(tmp_path / "guides", sources=tmp_path / "sources")
    with pytest.raises(UserError, match="source image folder not found"):
        load_eval_set(tmp_path / "guides", sources=tmp_path / "nope")
    with pytest.raises(UserError, match="--reference_strength must be in"):
        evaluate_control.main(["--ckpt", str(tiny_checkpoint), "--lllite", "x", "--guides", str(tmp_path / "guides"),
                               "--reference_strength", "1.5"])


def test_guides_without_edges_are_refused(tmp_path):
    from library.evaluation.control_eval import EvalItem, EvalSettings, evaluate_control

    Image.new("RGB", (16, 16), 0).save(tmp_path / "blank.png")
    with pytest.raises(UserError, match="none of the guide images has any edges"):
        evaluate_control(None, None, [EvalItem(tmp_path / "blank.png", "x")], EvalSettings(width=16, height=16))


def test_table_reads_the_lllite_against_the_reference():
    from library.evaluation.control_eval import format_table

    results = {"mean": {"0": {"f1": 0.1, "ssim": 0.3}, "1": {"f1": 0.15, "ssim": 0.35}},
               "reference": {"strength": 0.5, "f1": 0.3, "ssim": 0.5}}
    table = format_table(results)
    assert "| reference: img2img from the source, strength 0.5, no LLLite | 0.300 | 0.500 |" in table
    assert "1.50x" in table
    assert "goes 25% of the way from the baseline's F1 to the reference's" in table  # (0.15-0.1)/(0.3-0.1)
    results["reference"] = None
    assert "reference" not in format_table(results)
