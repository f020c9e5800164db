"""Shared fixtures: a tiny SDXL-structured pipeline written the two ways users have it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The suite owns its environment. Variables a user may have set for these libraries change what
# they do (offline mode, verbosity, caches, tokens, accelerate's and torch's defaults), so they are
# cleared before any library reads them, for this process and every script it starts; the hub's
# home (its cache, token and accelerate's default config) is an empty folder of the session's own.
_LIBRARY_VARIABLES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "ACCELERATE_", "BITSANDBYTES_",
                      "KERNELS_", "LOCAL_KERNELS", "TOKENIZERS_", "SAFETENSORS_", "TORCH_", "TORCHDYNAMO_",
                      "TORCHINDUCTOR_", "PYTORCH_", "WANDB_", "TENSORBOARD_", "PYTHONWARNINGS", "CUDA_VISIBLE_DEVICES")
_HOME_PREFIX = "lllite-tests-hf-home-"
if not Path(os.environ.get("HF_HOME", "")).name.startswith(_HOME_PREFIX):  # once, also when imported twice
    for _name in [n for n in os.environ if n.startswith(_LIBRARY_VARIABLES)]:
        del os.environ[_name]
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix=_HOME_PREFIX)
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from library.sdxl.loading import save_sdxl_single_file  # noqa: E402
from library.sdxl.tiny import build_random_models  # noqa: E402

# One thread per process, also in the scripts the tests start: on a 2-core machine, two OpenMP
# threads per process stall on each other whenever anything else runs (20x slower steps measured).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def perturbed_tiny_models(seed: int = 0):
    """Tiny random models whose zero-initialised layers are nudged, so that mix-ups show."""
    models = build_random_models(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return models


@pytest.fixture(scope="session")
def tiny_models():
    return perturbed_tiny_models()


@pytest.fixture(scope="session")
def full_sdxl_unet():
    """The full-size SDXL U-Net on the meta device: real layer names and shapes, no weights."""
    from accelerate import init_empty_weights

    from library.sdxl.loading import build_unet, bundled_config

    with init_empty_weights():
        return build_unet(bundled_config("unet"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_models) -> Path:
    """The tiny pipeline as a single-file checkpoint in the original (sgm) key layout."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors"
    save_sdxl_single_file(path, *tiny_models)
    return path


@pytest.fixture(scope="session")
def tiny_diffusers_folder(tmp_path_factory, tiny_models) -> Path:
    """The same pipeline as a diffusers folder."""
    from library.sdxl.loading import bundled_config
    from library.sdxl.text_encoding import load_sdxl_tokenizers

    root = tmp_path_factory.mktemp("diffusers") / "tiny_sdxl"
    unet, vae, te1, te2 = tiny_models
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    te1.save_pretrained(root / "text_encoder")
    te2.save_pretrained(root / "text_encoder_2")
    tok1, tok2 = load_sdxl_tokenizers(None)
    tok1.save_pretrained(root / "tokenizer")
    tok2.save_pretrained(root / "tokenizer_2")
    (root / "scheduler").mkdir()
    import json

    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(bundled_config("scheduler")))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return root


def unet_inputs(unet, batch: int = 1, h: int = 8, w: int = 8, seed: int = 0):
    """Random U-Net inputs with SDXL's added conditioning, sized for ``unet``."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    sample = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.full((batch,), 500)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    added = {
        "text_embeds": torch.randn(batch, pooled, generator=g),
        "time_ids": torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * batch, dtype=torch.float32),
    }
    return sample, t, ctx, added


def make_shape_dataset(root: Path, n: int = 4, size: int = 64, seed: int = 0, caption: str = "a red square") -> Path:
    """Training images with a red square, canny-like outlines as conditioning, captions, and a dataset TOML."""
    import numpy as np
    from PIL import Image, ImageDraw

    img_dir, cond_dir = root / "images", root / "conditioning"
    img_dir.mkdir(parents=True, exist_ok=True)
    cond_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = size // 3
    for i in range(n):
        x, y = (int(v) for v in rng.integers(2, size - side - 2, 2))
        image = Image.new("RGB", (size, size), (200, 210, 255))
        ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=(230, 20, 20))
        image.save(img_dir / f"{i:03d}.png")
        cond = Image.new("RGB", (size, size), 0)
        ImageDraw.Draw(cond).rectangle([x, y, x + side, y + side], outline=(255, 255, 255))
        cond.save(cond_dir / f"{i:03d}.png")
        (img_dir / f"{i:03d}.txt").write_text(caption)
    toml_path = root / "dataset.toml"
    toml_path.write_text(
        f"""[general]
caption_extension = ".txt"

[[datasets]]
resolution = {size}
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = {size * 2}
bucket_reso_steps = 8

  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
  conditioning_data_dir = "{cond_dir.as_posix()}"
"""
    )
    return toml_path
