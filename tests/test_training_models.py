"""The frozen base model and the network of a training run: fp8 storage, attention, tokenizers, memory options."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from library.sdxl.loading import load_sdxl
from library.training.cache_filling import release
from library.training.models import quantize_fp8, set_attention, store_weights_in_fp8
from networks.control_net_lllite import ControlNetLLLite
from tests.conftest import unet_inputs

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "tiny_sdxl" / "tiny_sdxl.safetensors"


def _out(unet, seed: int = 0) -> torch.Tensor:
    sample, t, ctx, added = unet_inputs(unet, batch=2, seed=seed)
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


def test_fp8_base_stores_float8_and_matches_within_tolerance(tiny_models):
    fp8 = copy.deepcopy(tiny_models[0])
    n = store_weights_in_fp8(fp8, torch.float32)
    linears = [m for m in fp8.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert n == len(linears) > 0
    # stored in float8; each layer sees its weight in the compute dtype
    assert all(m.parametrizations.weight.original.dtype == torch.float8_e4m3fn for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in linears)
    weight_bytes = sum(m.parametrizations.weight.original.numel() for m in linears)
    assert sum(p.numel() * p.element_size() for p in fp8.parameters() if p.dtype == torch.float8_e4m3fn) == weight_bytes

    # Exactly the plain U-Net with its weights rounded to float8: the compute path adds no error of its own.
    rounded = copy.deepcopy(tiny_models[0])
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                stored, scale = quantize_fp8(m.weight)
                m.weight.copy_(stored.float() * scale)
    torch.testing.assert_close(_out(fp8), _out(rounded), rtol=0, atol=1e-5)
    # Against the unquantised U-Net. Random weights amplify weight noise, so the tolerance is
    # checked on the bundled model, whose weights are trained: e4m3 keeps 3 mantissa bits, and one
    # forward pass moves by 3.5% (relative L2; bf16 storage: 0.4%).
    trained = load_sdxl(str(BUNDLED)).unet
    trained_fp8 = copy.deepcopy(trained)
    store_weights_in_fp8(trained_fp8, torch.float32)
    ref, got, bf16 = _out(trained), _out(trained_fp8), _out(copy.deepcopy(trained).to(torch.bfloat16).float())
    rel = (got - ref).norm() / ref.norm()
    assert (bf16 - ref).norm() / ref.norm() < rel < 0.05, rel


def test_fp8_base_trains_the_lllite(tiny_models):
    unet = copy.deepcopy(tiny_models[0]).requires_grad_(False)
    store_weights_in_fp8(unet, torch.float32)
    net = ControlNetLLLite(unet, cond_emb_dim=8, network_dim=4).attach()
    with torch.no_grad():
        for _, m in net.lllite_modules():
            m.up[0].weight.normal_(0, 0.01)  # a fresh LLLite is a no-op; nudge it so gradients reach every part
    sample, t, ctx, added = unet_inputs(unet, batch=1)
    cond = torch.rand(1, 3, 64, 64) * 2 - 1
    out = net(cond, unet, sample, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert not any(p.grad is not None for p in unet.parameters())


def test_attention_choices(tiny_models, caplog):
    from diffusers.models.attention_processor import (
        AttnProcessor2_0,
        SlicedAttnProcessor,
    )

    unet = copy.deepcopy(tiny_models[0])
    ref = _out(unet)
    assert set_attention(unet, "mem_eff").startswith("sliced")
    assert all(isinstance(p, SlicedAttnProcessor) for p in unet.attn_processors.values())
    torch.testing.assert_close(_out(unet), ref, rtol=1e-4, atol=1e-5)
    # no GPU here: auto means SDPA, and an explicit --xformers says why it is not used
    assert set_attention(unet, "auto") == "PyTorch SDPA"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    with caplog.at_level(logging.WARNING):
        assert set_attention(unet, "xformers") == "PyTorch SDPA"
    assert "--xformers" in caplog.text and "CUDA" in caplog.text


def test_tokenizer_cache_dir_is_filled_then_used(tmp_path):
    from library.sdxl.text_encoding import tokenizers_via_cache_dir

    t1, t2 = tokenizers_via_cache_dir(str(tmp_path / "tok"))
    assert (tmp_path / "tok" / "tokenizer" / "tokenizer_config.json").is_file() and (tmp_path / "tok" / "tokenizer_2").is_dir()
    assert t1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # a folder that holds tokenizers is what gets used: change one and it shows
    t1.add_tokens(["<my-token>"])
    t1.save_pretrained(tmp_path / "tok" / "tokenizer")
    again, _ = tokenizers_via_cache_dir(str(tmp_path / "tok"))
    assert len(again) == len(t1) and "<my-token>" in again.get_vocab()


def test_highvram_keeps_modules_on_the_device():
    m = torch.nn.Linear(2, 2)
    assert release([m], keep_on_device=True) is False
    assert release([m], keep_on_device=False) is True


@pytest.mark.parametrize("argv, message", [
    (["--network_module", "networks.lora"], "trains ControlNet-LLLite only"),
    (["--cond_emb_dim", "7"], "--cond_emb_dim 7"),
    (["--network_dropout", "1.5"], "--network_dropout 1.5"),
    (["--v2"], "SDXL has no v2"),
])
def test_model_and_network_option_errors(argv, message, tmp_path):
    from library.cli import check_refused
    from library.errors import UserError
    from library.training.options import parse_args
    from library.training.models import AttentionOptions, NetworkOptions

    parser, args = parse_args(["--pretrained_model_name_or_path", "x.safetensors", *argv])
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        check_refused(parser, args)
        NetworkOptions.from_args(args)
        AttentionOptions.from_args(args)


def test_checkpoint_markers_switch_the_loss_and_the_sampling_schedule_on():
    from types import SimpleNamespace

    from library.training.loss import LossOptions, checkpoint_schedule

    config = {"num_train_timesteps": 1000, "prediction_type": "epsilon"}
    models = SimpleNamespace(name="vpred", v_prediction=True, zero_terminal_snr=True, scheduler_config=config)
    given = LossOptions()
    schedule = checkpoint_schedule(given, models)
    opts = schedule.loss_options(given)
    assert opts.v_parameterization and opts.zero_terminal_snr
    assert schedule.scheduler_config(models.scheduler_config) == {
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    # a value beside the options: neither the options nor the loaded models change
    assert given == LossOptions() and models.scheduler_config == {"num_train_timesteps": 1000, "prediction_type": "epsilon"}
    # --v_parameterization on a checkpoint without the marker: samples are drawn with v-prediction too
    plain = SimpleNamespace(name="plain", v_prediction=False, zero_terminal_snr=False, scheduler_config={})
    schedule = checkpoint_schedule(LossOptions(v_parameterization=True), plain)
    assert schedule.loss_options(LossOptions(v_parameterization=True)).v_parameterization
    assert schedule.scheduler_config({}) == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": False}
