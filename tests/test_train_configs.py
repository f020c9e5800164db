"""Configs users bring run end to end: the reference trainer's README config, and a config with many of
the options sd-scripts has that this trainer gained, which must train exactly as the same options on
the command line."""

from __future__ import annotations

from pathlib import Path

import torch

from library.sdxl.weights_io import read_weights
from tests.conftest import make_shape_dataset
from tests.test_train_script import run_train, write_config


def test_reference_readme_config_runs_unchanged(tmp_path, tiny_checkpoint):
    """sd-scripts' README config for LLLite, with only its paths pointed at the tiny model and data."""
    dataset = make_shape_dataset(tmp_path / "data")
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'''pretrained_model_name_or_path = "{tiny_checkpoint.as_posix()}"
max_train_epochs = 12
max_data_loader_n_workers = 4
persistent_data_loader_workers = true
seed = 42
gradient_checkpointing = true
mixed_precision = "bf16"
save_precision = "bf16"
full_bf16 = true
optimizer_type = "adamw8bit"
learning_rate = 2e-4
xformers = true
output_dir = "{(tmp_path / 'out').as_posix()}"
output_name = "output_name"
save_every_n_epochs = 1
save_model_as = "safetensors"
vae_batch_size = 4
cache_latents = true
cache_latents_to_disk = true
cache_text_encoder_outputs = true
cache_text_encoder_outputs_to_disk = true
network_dim = 64
cond_emb_dim = 32
dataset_config = "{dataset.as_posix()}"
''')
    res = run_train("--config_file", str(cfg), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--xformers: xformers needs a CUDA GPU" in res.stderr  # said, then SDPA
    out = tmp_path / "out"
    # 4 images, batch 2: 2 steps an epoch, 12 epochs; a file per epoch but the last, then the final one
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"output_name-{e:06d}.safetensors" for e in range(1, 12)] + [
        "output_name.safetensors"]
    sd, meta = read_weights(out / "output_name.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.bfloat16} and meta["ss_steps"] == "24"


def _new_options(tmp_path: Path) -> dict:
    """Thirty-odd options of sd-scripts' trainer that were unknown here before (issue #13)."""
    return dict(
        caption_prefix="shape", caption_suffix="flat colours", caption_separator=",", keep_tokens_separator="|||",
        secondary_separator=";;;", enable_wildcard=True, caption_dropout_every_n_epochs=3, caption_tag_dropout_rate=0.1,
        token_warmup_min=1, token_warmup_step=2, weighted_captions=True, max_token_length=150, clip_skip=1,
        caption_extention=".txt", random_crop=True, resize_interpolation="area", alpha_mask=True,
        loss_type="huber", huber_schedule="exponential", huber_scale=1.5, multires_noise_iterations=3,
        multires_noise_discount=0.3, ip_noise_gamma=0.05, ip_noise_gamma_random_strength=True, noise_offset=0.02,
        noise_offset_random_strength=True, adaptive_noise_scale=0.01, lr_scheduler="cosine_with_min_lr",
        lr_scheduler_min_lr_ratio=0.1, lr_warmup_steps=0.5, use_8bit_adam=True, save_every_n_steps=1,
        save_last_n_steps=1, save_state_on_train_end=True, metadata_title="Shapes canny", metadata_author="tests",
        metadata_description="trained by the test suite", metadata_license="MIT", metadata_tags="canny,test",
        console_log_level="DEBUG", console_log_simple=True, highvram=True, tokenizer_cache_dir=tmp_path / "tok",
        mem_eff_attn=True, fp8_base=True, ddp_timeout=30, logging_dir=tmp_path / "logs", log_tracker_name="parity",
        log_config=True,
    )


def test_new_options_in_a_config_and_on_the_command_line_train_the_same(tmp_path, tiny_checkpoint):
    dataset = make_shape_dataset(tmp_path / "data")
    common = dict(pretrained_model_name_or_path=tiny_checkpoint, dataset_config=dataset, network_dim=8,
                  cond_emb_dim=8, learning_rate=1e-3, max_train_steps=4, seed=3)
    new = _new_options(tmp_path)
    assert len(new) >= 30
    cfg = write_config(tmp_path / "train.toml", **common, **new, output_dir=tmp_path / "a", output_name="cfg")
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]

    argv = []
    for k, v in {**common, **new, "output_dir": tmp_path / "b", "output_name": "cli"}.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    res_cli = run_train(*argv)
    assert res_cli.returncode == 0, res_cli.stderr[-3000:]

    a, meta = read_weights(tmp_path / "a" / "cfg.safetensors")
    b, _ = read_weights(tmp_path / "b" / "cli.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["modelspec.title"] == "Shapes canny" and meta["modelspec.license"] == "MIT"
    assert (tmp_path / "a" / "cfg-state").is_dir()  # save_state_on_train_end
    # save_every_n_steps 1, save_last_n_steps 1: files at most 1 step old stay (sd-scripts' rule); step 4 is the final file
    assert sorted(p.name for p in (tmp_path / "a").glob("cfg-step*.safetensors")) == [
        "cfg-step00000002.safetensors", "cfg-step00000003.safetensors"]
    assert (tmp_path / "tok" / "tokenizer").is_dir()
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))
