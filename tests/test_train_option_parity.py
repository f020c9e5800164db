"""Every option of sd-scripts' LLLite trainer works here, on the command line and in a config file.

``tests/data/sd_scripts_train_options.txt`` is the reference trainer's option list. For each
option the test sets a value other than the default (with the options it needs beside it) and
checks that the resolved ``TrainingOptions`` differ from those without it: since the run reads only
the resolved options, an option that changes nothing there would be a silent no-op. The other
outcome allowed is a clear refusal, for the options listed in ``REFUSED``. The same values given as
config-file keys must resolve to the same options as on the command line. What each option then
does is tested by the behaviour tests of its concern.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from library.cli import check_refused
from library.errors import UserError
from library.training import accelerator as accelerator_setup
from library.training import tracking
from library.training.options import build_parser, parse_args, resolve
from tests.conftest import make_shape_dataset

DATA = Path(__file__).resolve().parent / "data"
REFERENCE = [line.strip().removeprefix("--") for line in (DATA / "sd_scripts_train_options.txt").read_text().splitlines() if line.strip()]

# The options that cannot apply to SDXL LLLite training; each stops with its reason.
REFUSED = {"v2": "SDXL", "dataset_class": "dataset", "reg_data_dir": "regularization", "prior_loss_weight": "regularization",
           "fused_backward_pass": "Adafactor",
           # ZeRO stage 3 cannot train an LLLite; these options exist for stage 3 only
           "zero3_init_flag": "ZeRO stage 3", "zero3_save_16bit_model": "ZeRO stage 3", "offload_param_device": "ZeRO stage 3",
           "offload_param_nvme_path": "ZeRO stage 3"}

HF = {"huggingface_repo_id": "me/lllite"}
DS = {"deepspeed": True}
# option -> (value, the options it needs beside it). Paths starting with "@" are made by the fixture.
VALUES: dict[str, tuple] = {
    "adaptive_noise_scale": (0.01, {"noise_offset": 0.05}),
    "alpha_mask": (True, {}),
    "async_upload": (True, HF),
    "bucket_no_upscale": (True, {}),
    "bucket_reso_steps": (32, {}),
    "cache_info": (True, {}),
    "cache_latents": (True, {}),
    "cache_latents_to_disk": (True, {}),
    "cache_text_encoder_outputs": (True, {}),
    "cache_text_encoder_outputs_to_disk": (True, {}),
    "caption_dropout_every_n_epochs": (2, {}),
    "caption_dropout_rate": (0.1, {}),
    "caption_extension": (".txt", {}),
    "caption_extention": (".txt", {}),
    "caption_prefix": ("pre", {}),
    "caption_separator": (";", {}),
    "caption_suffix": ("suf", {}),
    "caption_tag_dropout_rate": (0.1, {}),
    "clip_skip": (1, {}),
    "color_aug": (True, {}),
    "cond_emb_dim": (16, {}),
    "conditioning_data_dir": ("@cond2", {}),
    "config_file": (None, {}),  # the whole test runs every option through a config file too
    "console_log_file": ("@log.txt", {}),
    "console_log_level": ("DEBUG", {}),
    "console_log_simple": (True, {}),
    "dataset_class": ("my.Dataset", {}),
    "dataset_config": ("@dataset.toml", {}),
    "dataset_repeats": (3, {"in_json": "@meta.json"}),
    "ddp_gradient_as_bucket_view": (True, {}),
    "ddp_static_graph": (True, {}),
    "ddp_timeout": (10, {}),
    "debiased_estimation_loss": (True, {}),
    "debug_dataset": (True, {}),
    "deepspeed": (True, {}),
    "disable_mmap_load_safetensors": (True, {}),
    "dynamo_backend": ("eager", {"torch_compile": True}),
    "enable_bucket": (True, {"min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32}),
    "enable_wildcard": (True, {}),
    "face_crop_aug_range": ("2.0,4.0", {}),
    "flip_aug": (True, {}),
    "fp16_master_weights_and_gradients": (True, {**DS, "zero_stage": 2, "offload_optimizer_device": "cpu",
                                                  "mixed_precision": "fp16"}),
    "fp8_base": (True, {}),
    "full_bf16": (True, {"mixed_precision": "bf16"}),
    "full_fp16": (True, {"mixed_precision": "fp16"}),
    "fused_backward_pass": (True, {"optimizer_type": "Adafactor"}),
    "gradient_accumulation_steps": (2, {}),
    "gradient_checkpointing": (True, {}),
    "highvram": (True, {}),
    "huber_c": (0.2, {}),
    "huber_scale": (2.0, {"loss_type": "huber"}),
    "huber_schedule": ("exponential", {"loss_type": "huber"}),
    "huggingface_path_in_repo": ("sub", HF),
    "huggingface_repo_id": ("me/lllite", {}),
    "huggingface_repo_type": ("dataset", HF),
    "huggingface_repo_visibility": ("private", HF),
    "huggingface_token": ("hf_secret", HF),
    "in_json": ("@meta.json", {}),
    "ip_noise_gamma": (0.1, {}),
    "ip_noise_gamma_random_strength": (True, {"ip_noise_gamma": 0.1}),
    "keep_tokens": (1, {}),
    "keep_tokens_separator": ("|||", {}),
    "learning_rate": (1e-3, {}),
    "log_config": (True, {"logging_dir": "@logs"}),
    "log_prefix": ("run", {"logging_dir": "@logs"}),
    "log_tracker_config": ("@trackers.toml", {"logging_dir": "@logs"}),
    "log_tracker_name": ("proj", {"logging_dir": "@logs"}),
    "log_with": ("all", {"logging_dir": "@logs"}),
    "logging_dir": ("@logs", {}),
    "loss_type": ("huber", {}),
    "lowram": (True, {}),
    "lr_decay_steps": (2, {"lr_scheduler": "warmup_stable_decay"}),
    "lr_scheduler": ("cosine", {}),
    "lr_scheduler_args": (["num_cycles=3"], {"lr_scheduler": "cosine_with_restarts"}),
    "lr_scheduler_min_lr_ratio": (0.1, {"lr_scheduler": "warmup_stable_decay", "lr_decay_steps": 2}),
    "lr_scheduler_num_cycles": (2, {}),
    "lr_scheduler_power": (2.0, {}),
    "lr_scheduler_timescale": (10, {"lr_scheduler": "inverse_sqrt"}),
    "lr_scheduler_type": ("torch.optim.lr_scheduler.StepLR", {}),
    "lr_warmup_steps": (2, {"lr_scheduler": "constant_with_warmup"}),
    "max_bucket_reso": (2048, {}),
    "max_data_loader_n_workers": (1, {}),
    "max_grad_norm": (0.5, {}),
    "max_timestep": (900, {}),
    "max_token_length": (150, {}),
    "max_train_epochs": (3, {}),
    "max_train_steps": (10, {}),
    "mem_eff_attn": (True, {}),
    "metadata_author": ("me", {}),
    "metadata_description": ("canny", {}),
    "metadata_is_negative_embedding": ("false", {}),
    "metadata_license": ("MIT", {}),
    "metadata_merged_from": ("a, b", {}),
    "metadata_preprocessor": ("canny", {}),
    "metadata_tags": ("canny,sdxl", {}),
    "metadata_thumbnail": ("@thumb.png", {}),
    "metadata_title": ("My LLLite", {}),
    "metadata_trigger_phrase": ("sks", {}),
    "metadata_usage_hint": ("use a canny map", {}),
    "min_bucket_reso": (128, {}),
    "min_snr_gamma": (5.0, {}),
    "min_timestep": (100, {}),
    "mixed_precision": ("bf16", {}),
    "multires_noise_discount": (0.5, {"multires_noise_iterations": 6}),
    "multires_noise_iterations": (6, {}),
    "network_dim": (16, {}),
    "network_dropout": (0.1, {}),
    "network_weights": ("@net.safetensors", {}),
    "no_half_vae": (True, {}),
    "noise_offset": (0.05, {}),
    "noise_offset_random_strength": (True, {"noise_offset": 0.05}),
    "offload_optimizer_device": ("cpu", DS),
    "offload_optimizer_nvme_path": ("/nvme", DS),
    "offload_param_device": ("cpu", {**DS, "zero_stage": 3}),
    "offload_param_nvme_path": ("/nvme", {**DS, "zero_stage": 3}),
    "optimizer_args": (["weight_decay=0.1"], {}),
    "optimizer_type": ("SGDNesterov", {}),
    "output_config": (None, {}),  # writes the config and exits: tests/test_train_script.py
    "output_dir": ("@out2", {}),
    "output_name": ("other", {}),
    "persistent_data_loader_workers": (True, {"max_data_loader_n_workers": 1}),
    "pretrained_model_name_or_path": ("@vae.safetensors", {}),  # a copy of the checkpoint
    "prior_loss_weight": (0.5, {}),
    "random_crop": (True, {}),
    "reg_data_dir": ("@reg", {}),
    "resize_interpolation": ("lanczos", {}),
    "resolution": ("512", {}),
    "resume": ("@state", {}),
    "resume_from_huggingface": (True, {}),  # its --resume is in ALONG: without the flag it is a missing folder
    "sample_at_first": (True, {"sample_prompts": "@prompts.txt"}),
    "sample_every_n_epochs": (1, {"sample_prompts": "@prompts.txt"}),
    "sample_every_n_steps": (5, {"sample_prompts": "@prompts.txt"}),
    "sample_prompts": ("@prompts.txt", {}),
    "sample_sampler": ("euler_a", {}),
    "save_every_n_epochs": (2, {}),
    "save_every_n_steps": (5, {}),
    "save_last_n_epochs": (2, {"save_every_n_epochs": 1}),
    "save_last_n_epochs_state": (2, {"save_every_n_epochs": 1, "save_state": True}),
    "save_last_n_steps": (10, {"save_every_n_steps": 1}),
    "save_last_n_steps_state": (10, {"save_every_n_steps": 1, "save_state": True}),
    "save_model_as": ("pt", {}),
    "save_n_epoch_ratio": (2, {}),
    "save_precision": ("fp16", {}),
    "save_state": (True, {}),
    "save_state_on_train_end": (True, {}),
    "save_state_to_huggingface": (True, {**HF, "save_state": True}),
    "scale_v_pred_loss_like_noise_pred": (True, {"v_parameterization": True}),
    "sdpa": (True, {}),
    "secondary_separator": (";;;", {}),
    "seed": (7, {}),
    "shuffle_caption": (True, {}),
    "skip_cache_check": (True, {}),
    "token_warmup_min": (2, {"token_warmup_step": 5}),
    "token_warmup_step": (5, {}),
    "tokenizer_cache_dir": ("@tok", {}),
    "torch_compile": (True, {}),
    "train_batch_size": (2, {}),
    "train_data_dir": ("@images2", {"conditioning_data_dir": "@cond2"}),
    "use_8bit_adam": (True, {}),
    "use_lion_optimizer": (True, {}),
    "v2": (True, {}),
    "v_parameterization": (True, {}),
    "v_pred_like_loss": (0.1, {}),
    "vae": ("@vae.safetensors", {}),
    "vae_batch_size": (4, {}),
    "wandb_api_key": ("key", {"log_with": "wandb"}),
    "wandb_run_name": ("run", {"log_with": "wandb"}),
    "weighted_captions": (True, {}),
    "xformers": (True, {}),
    "zero3_init_flag": (True, {**DS, "zero_stage": 3}),
    "zero3_save_16bit_model": (True, {**DS, "zero_stage": 3}),
    "zero_stage": (1, DS),
    "zero_terminal_snr": (True, {}),
}

# Options that go with the option itself, not into the comparison's baseline (None removes one).
ALONG = {
    "resume_from_huggingface": {"resume": "me/lllite/lllite-state:main:model"},
    "dataset_config": {"train_data_dir": None, "conditioning_data_dir": None},
    "offload_optimizer_nvme_path": {"offload_optimizer_device": "nvme"},
    "offload_param_nvme_path": {"offload_param_device": "nvme"},
    "lr_scheduler_type": {"lr_scheduler_args": ["step_size=5"]},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint) -> dict[str, str]:
    """What the values above name: datasets, a state folder, a prompt file, a thumbnail, ..."""
    root = tmp_path_factory.mktemp("parity")
    toml_path = make_shape_dataset(root / "data", n=2, size=64)
    make_shape_dataset(root / "data2", n=2, size=64)
    f = {"@images": str(root / "data" / "images"), "@cond": str(root / "data" / "conditioning"),
         "@images2": str(root / "data2" / "images"), "@cond2": str(root / "data2" / "conditioning"),
         "@dataset.toml": str(toml_path), "@ckpt": str(tiny_checkpoint)}
    for name in ("out", "out2", "logs", "tok", "reg"):
        f[f"@{name}"] = str(root / name)
    (root / "state").mkdir()
    (root / "state" / "train_state.json").write_text('{"global_step": 1, "epoch": 1, "batches_in_epoch": 1}')
    f["@state"] = str(root / "state")
    (root / "meta.json").write_text(json.dumps({str(Path(f["@images"]) / "000.png"): {"caption": "a red square"}}))
    f["@meta.json"] = str(root / "meta.json")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "thumb.png")
    f["@thumb.png"] = str(root / "thumb.png")
    guide = Path(f["@cond"]) / "000.png"
    (root / "prompts.txt").write_text(f"a red square --cn {guide.as_posix()}\n")
    f["@prompts.txt"] = str(root / "prompts.txt")
    (root / "trackers.toml").write_text('[tensorboard]\nflush_secs = 5\n')
    f["@trackers.toml"] = str(root / "trackers.toml")
    from library.sdxl.loading import load_sdxl
    from networks.control_net_lllite import ControlNetLLLite

    ControlNetLLLite(load_sdxl(str(tiny_checkpoint)).unet, cond_emb_dim=8, network_dim=8).save(root / "net.safetensors")
    f["@net.safetensors"] = str(root / "net.safetensors")
    import shutil

    shutil.copy(tiny_checkpoint, root / "vae.safetensors")
    f["@vae.safetensors"] = str(root / "vae.safetensors")
    f["@log.txt"] = str(root / "log.txt")
    return f


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    # Each resolution names a new tracker run folder by the time; keep it fixed so two resolutions compare.
    monkeypatch.setattr(tracking.time, "strftime", lambda *a, **k: "20260101000000")
    # Optional packages (wandb, deepspeed) need not be installed to check what the options resolve to.
    monkeypatch.setattr(tracking, "check_tracker_packages", lambda opts: None)
    monkeypatch.setattr(accelerator_setup, "check_deepspeed_installed", lambda opts: None)


def _value(v, files):
    if isinstance(v, str) and v.startswith("@"):
        return files[v]
    if isinstance(v, list):
        return [_value(x, files) for x in v]
    return v


def _base(files) -> dict:
    return {"pretrained_model_name_or_path": files["@ckpt"], "train_data_dir": files["@images"],
            "conditioning_data_dir": files["@cond"], "output_dir": files["@out"], "resolution": "64",
            "max_train_steps": 4}


def _argv(options: dict) -> list[str]:
    argv = []
    for k, v in options.items():
        if v is None or v is False:
            continue
        if v is True:
            argv.append(f"--{k}")
        elif isinstance(v, list):
            argv += [f"--{k}", *map(str, v)]
        else:
            argv += [f"--{k}", str(v)]
    return argv


def _toml(path: Path, options: dict) -> Path:
    import toml

    path.write_text(toml.dumps({k: v for k, v in options.items() if v is not None}))
    return path


def _resolve(argv: list[str]):
    parser, args = parse_args(argv)
    check_refused(parser, args)
    return resolve(args)


def test_the_list_is_complete():
    assert len(REFERENCE) == 173
    assert sorted(VALUES) == sorted(REFERENCE)


@pytest.mark.parametrize("name", REFERENCE)
def test_option_is_accepted_and_never_a_silent_no_op(name, files, tmp_path):
    value, needs = VALUES[name]
    actions = {a.dest for a in build_parser()._actions}
    assert name in actions, f"--{name} is not an option of the training script"
    if value is None:
        return  # config_file / output_config: see the module docstring
    base = {**_base(files), **{k: _value(v, files) for k, v in needs.items()}}
    given = {**base, **ALONG.get(name, {}), name: _value(value, files)}
    if name in REFUSED:
        with pytest.raises(UserError, match=REFUSED[name]):
            _resolve(_argv(given))
        return
    before, after = _resolve(_argv(base)), _resolve(_argv(given))
    assert after != before, f"--{name} {value} changes nothing in the resolved options: a silent no-op"
    # the same option as a config-file key resolves to the same options as on the command line
    from_file = _resolve(["--config_file", str(_toml(tmp_path / "train.toml", given))])
    assert from_file == after


def test_reference_defaults_of_refused_options_are_accepted(files, tmp_path):
    """GUIs write every option with its default into the config: those values must not stop a run."""
    given = {**_base(files), "v2": False, "prior_loss_weight": 1.0}
    _resolve(["--config_file", str(_toml(tmp_path / "train.toml", given))])
