"""Files and runners shared by the sdxl_gen_img.py tests (test_gen_*.py, test_bad_inputs.py)."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from library.errors import run_cli
from library.sdxl.loading import save_sdxl_single_file
from library.sdxl.lora import lora_name_map, make_lora_state_dict
from library.sdxl.tiny import build_random_models
from library.sdxl.weights_io import write_weights
from networks.control_net_lllite import ControlNetLLLite

SMALL = ["--W", "64", "--H", "64", "--steps", "3", "--sampler", "euler", "--no_progress"]


def _noise_image(path: Path, rng: np.random.Generator, size: int = 64) -> str:
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def make_gen_files(d: Path) -> dict[str, str]:
    """A tiny checkpoint, two LLLite files with non-zero up layers, guide/init/mask images, a LoRA and an embedding."""
    unet, vae, te1, te2 = build_random_models()
    save_sdxl_single_file(d / "tiny.safetensors", unet, vae, te1, te2)
    out = {"ckpt": str(d / "tiny.safetensors"), "dir": str(d)}
    for i in (1, 2):
        torch.manual_seed(i)
        net = ControlNetLLLite(unet, cond_emb_dim=8, network_dim=8)
        for _, m in net.lllite_modules():
            torch.nn.init.normal_(m.up[0].weight, std=1.0)
        net.save(d / f"lllite{i}.safetensors", metadata={"ss_training_comment": f"test lllite {i}"})
        out[f"lllite{i}"] = str(d / f"lllite{i}.safetensors")
    rng = np.random.default_rng(0)
    for i in range(4):
        out[f"guide{i}"] = _noise_image(d / f"guide{i}.png", rng)
    out["init"] = _noise_image(d / "init.png", rng)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(d / "mask.png")
    out["mask"] = str(d / "mask.png")
    names = lora_name_map(unet, te1, te2)
    chosen = [n for n in names if "attn1_to_q" in n or "self_attn_q_proj" in n or "ff_net_2" in n]
    write_weights(d / "lora.safetensors", make_lora_state_dict(names, rank=2, generator=torch.Generator().manual_seed(0),
                                                                names=chosen), {"ss_network_dim": "2", "ss_note": "test lora"})
    out["lora"] = str(d / "lora.safetensors")
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, str(d / "myemb.safetensors"))
    out["emb"] = str(d / "myemb.safetensors")
    return out


def run_main_outputs(capsys, *args: str) -> tuple[int, str, str]:
    """sdxl_gen_img's main() in this process, wrapped like the script: (exit code, stderr, stdout)."""
    import sdxl_gen_img

    code = 0
    try:
        run_cli(lambda: sdxl_gen_img.main(list(args)))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def run_main(capsys, *args: str) -> tuple[int, str]:
    """sdxl_gen_img's main() in this process: (exit code, stderr)."""
    return run_main_outputs(capsys, *args)[:2]


@contextlib.contextmanager
def stdin_lines(text: str):
    old = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = old


def pngs(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.png"))


def pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
