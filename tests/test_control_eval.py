"""tools/evaluate_control.py: per-multiplier edge F1/SSIM table and JSON; --debug_dataset output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from library.control_eval import load_eval_set
from library.errors import UserError
from library.tiny_sdxl import build_random_models
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
    out = tmp_path / "results.json"
    evaluate_control.main(["--ckpt", str(tiny_checkpoint), "--lllite", str(lllite), "--guides", str(tmp_path / "guides"),
                           "--W", "64", "--H", "64", "--steps", "2", "--json", str(out),
                           "--save_images", str(tmp_path / "imgs")])
    printed = capsys.readouterr().out
    assert "| multiplier | edge F1 | edge SSIM |" in printed and "| 0 |" in printed and "| 1 |" in printed
    results = json.loads(out.read_text())
    assert set(results["mean"]) == {"0", "1"}
    assert len(results["per_item"]) == 4
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


def test_guides_without_edges_are_refused(tmp_path):
    from library.control_eval import EvalItem, EvalSettings, evaluate_control

    Image.new("RGB", (16, 16), 0).save(tmp_path / "blank.png")
    with pytest.raises(UserError, match="none of the guide images has any edges"):
        evaluate_control(None, None, [EvalItem(tmp_path / "blank.png", "x")], EvalSettings(width=16, height=16))
