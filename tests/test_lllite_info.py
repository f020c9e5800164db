"""tools/lllite_info.py: facts for good files, a one-line error and exit code 2 for bad ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from library.sdxl.tiny import build_random_models
from networks.control_net_lllite import ControlNetLLLite

TOOL = Path(__file__).resolve().parents[1] / "tools" / "lllite_info.py"


def run_tool(*files):
    return subprocess.run([sys.executable, str(TOOL), *map(str, files)], capture_output=True, text=True, timeout=120)


def test_info_and_errors(tmp_path, tiny_checkpoint):
    unet = build_random_models()[0]
    net = ControlNetLLLite(unet, cond_emb_dim=8, network_dim=16)
    good = tmp_path / "good.safetensors"
    net.save(good, dtype=torch.float16)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    other = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(2)}, str(other))

    ok = run_tool(good)
    assert ok.returncode == 0, ok.stderr
    n = len(list(net.lllite_modules()))
    assert f"modules:        {n}" in ok.stdout
    assert "cond_emb_dim:   8" in ok.stdout and "network_dim:    16" in ok.stdout
    assert "dtype:          float16" in ok.stdout
    assert f"{sum(p.numel() for p in net.parameters()):,}" in ok.stdout
    assert "modelspec.architecture: stable-diffusion-xl-v1-base/control-net-lllite" in ok.stdout

    res = run_tool(good, bad, other, tiny_checkpoint)
    assert res.returncode == 2
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 3
    assert "bad.safetensors" in errors[0] and "damaged" in errors[0]
    assert "other.safetensors" in errors[1] and "not a ControlNet-LLLite file" in errors[1]
    assert "SDXL checkpoint" in errors[2]
