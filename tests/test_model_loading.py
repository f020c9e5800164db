"""SDXL loading: single-file and diffusers folder agree; bad inputs give clear errors."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from library.errors import UserError
from library.sdxl import keys as sdxl_keys
from library.sdxl.loading import build_unet, bundled_config, load_sdxl, load_vae
from library.sdxl.tiny import tiny_configs
from library.sdxl.weights_io import read_weights


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_single_file_and_diffusers_folder_load_identical(tiny_checkpoint, tiny_diffusers_folder, tiny_models):
    single = load_sdxl(str(tiny_checkpoint))
    folder = load_sdxl(str(tiny_diffusers_folder))
    for name, original in zip(("unet", "vae", "text_encoder1", "text_encoder2"), tiny_models):
        _assert_same_weights(getattr(single, name), original)
        _assert_same_weights(getattr(folder, name), original)
    assert single.tokenizer1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not single.v_prediction


def test_text_encoders_are_not_swapped(tiny_checkpoint):
    m = load_sdxl(str(tiny_checkpoint))
    cfg = tiny_configs()
    assert m.text_encoder1.config.hidden_size == cfg["text_encoder"]["hidden_size"]
    assert m.text_encoder2.config.hidden_size == cfg["text_encoder_2"]["hidden_size"]
    assert m.text_encoder2.config.projection_dim == cfg["text_encoder_2"]["projection_dim"]


def test_inferred_configs_match_tiny_configs(tiny_checkpoint):
    sd, _ = read_weights(tiny_checkpoint)
    cfg = tiny_configs()
    inferred = sdxl_keys.infer_unet_config(sd)
    assert {k: inferred[k] for k in cfg["unet"] if not k.startswith("_")} == {
        k: v for k, v in cfg["unet"].items() if not k.startswith("_")
    }
    assert sdxl_keys.infer_vae_config(sd)["block_out_channels"] == cfg["vae"]["block_out_channels"]


def test_full_sdxl_config_inferred_from_shapes():
    """The converter path is the same for full SDXL: shapes of the real architecture give its config."""
    with init_empty_weights():
        unet = build_unet(bundled_config("unet"))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    sgm = sdxl_keys.unet_diffusers_to_sgm(unet.state_dict(), unet.config)
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in sgm
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sgm  # upsampler after attention
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sgm
    inferred = sdxl_keys.infer_unet_config(sgm)
    expected = {k: v for k, v in bundled_config("unet").items() if not k.startswith("_")}
    assert {k: inferred[k] for k in expected} == expected


def test_v_prediction_detected(tmp_path, tiny_checkpoint):
    sd, _ = read_weights(tiny_checkpoint)
    sd["v_pred"] = torch.tensor([])
    path = tmp_path / "vpred.safetensors"
    save_file(sd, str(path))
    m = load_sdxl(str(path))
    assert m.v_prediction and m.scheduler_config["prediction_type"] == "v_prediction"


def test_vae_override(tmp_path, tiny_checkpoint, tiny_models):
    sd, _ = read_weights(tiny_checkpoint)
    vae_sd = {k[len("first_stage_model."):]: v * 0 for k, v in sd.items() if k.startswith("first_stage_model.")}
    path = tmp_path / "zero_vae.safetensors"
    save_file(vae_sd, str(path))
    m = load_sdxl(str(tiny_checkpoint), vae=str(path))
    assert all(torch.count_nonzero(p) == 0 for p in m.vae.parameters())
    assert list(load_vae(str(path)).config.block_out_channels) == list(tiny_models[1].config.block_out_channels)


def test_ckpt_weights_only(tmp_path, tiny_checkpoint, tiny_models):
    sd, _ = read_weights(tiny_checkpoint)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd}, path)
    m = load_sdxl(str(path))
    _assert_same_weights(m.unet, tiny_models[0])


# -- errors -------------------------------------------------------------------------------------


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, I am not a model")
    with pytest.raises(UserError, match="notes.safetensors.*damaged or truncated"):
        load_sdxl(str(path))


def test_truncated_file(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_sdxl(str(path))


def test_sd15_checkpoint_refused(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 2),
        },
        str(path),
    )
    with pytest.raises(UserError, match=r"Stable Diffusion 1\.x.*SDXL only"):
        load_sdxl(str(path))


def test_sd2_checkpoint_refused(tmp_path):
    path = tmp_path / "sd2.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2),
        },
        str(path),
    )
    with pytest.raises(UserError, match=r"2\.x"):
        load_sdxl(str(path))


def test_lllite_file_as_checkpoint(tmp_path):
    path = tmp_path / "controllllite.safetensors"
    save_file({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(UserError, match="ControlNet-LLLite file.*--control_net_lllite_models"):
        load_sdxl(str(path))


def test_missing_path_and_offline_hub_id(monkeypatch):
    with pytest.raises(UserError, match="model.safetensors: not found"):
        load_sdxl("/no/such/model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Hugging Face hub.*local .safetensors"):
        load_sdxl("someone/some-sdxl-model")


def test_folder_without_components(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match="not a diffusers SDXL folder.*text_encoder"):
        load_sdxl(str(tmp_path))
