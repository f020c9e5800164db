"""Every checkpoint layout users bring loads to the same weights as the plain layout, or fails with a
clear error that names the file and what it is. Tiny models, fp32, CPU."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import perturbed_tiny_models
from safetensors.torch import save_file

from library.errors import UserError
from library.sdxl import keys as sdxl_keys
from library.sdxl import weights_io
from library.sdxl.loading import load_sdxl, load_vae, save_sdxl_single_file
from library.sdxl.tiny import build_random_models, tiny_configs
from library.sdxl.weights_io import read_weights

TE1 = sdxl_keys.TE1_PREFIX
TE2 = sdxl_keys.TE2_PREFIX
UNET = sdxl_keys.UNET_PREFIX
NAMES = ("unet", "vae", "text_encoder1", "text_encoder2")


@pytest.fixture(scope="session")
def plain_sd(tiny_checkpoint) -> dict[str, torch.Tensor]:
    """The plain sgm layout's tensors (fp32); tests build the other layouts from it."""
    return {k: v.clone() for k, v in read_weights(tiny_checkpoint)[0].items()}


def _expected(reference: torch.nn.Module, stored: torch.dtype | None, loaded: torch.dtype = torch.float32):
    """The state dict ``reference`` has after a trip through a file stored in ``stored``, loaded in ``loaded``."""
    sd = reference.state_dict()
    if stored is not None:
        sd = {k: v.to(stored) for k, v in sd.items()}
    return {k: v.to(loaded) for k, v in sd.items()}


def assert_models_equal(models, references, stored=None, loaded: torch.dtype = torch.float32):
    """Every weight of the loaded models equals the reference's (after the storage dtype's rounding).

    ``stored``: the file's dtype, or one per model (unet, vae, text encoders 1 and 2); None: fp32.
    """
    stored = stored if isinstance(stored, tuple) else (stored,) * 4
    for name, ref, dt in zip(NAMES, references, stored):
        got, want = getattr(models, name).state_dict(), _expected(ref, dt, loaded)
        assert got.keys() == want.keys(), name
        for k in want:
            assert got[k].dtype == loaded, (name, k, got[k].dtype)
            assert torch.equal(got[k], want[k]), (name, k)


def _write(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# -- sgm single files: key layouts --------------------------------------------------------------


def _without_text_model(sd):
    return {(TE1 + k[len(TE1 + "text_model."):] if k.startswith(TE1 + "text_model.") else k): v for k, v in sd.items()}


def _with_position_ids(sd):
    out = dict(sd)
    out[TE1 + "text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return out


def _with_extras(sd):
    """EMA copies (flattened names, as sgm writes them), denoiser sigmas, OpenCLIP's logit_scale."""
    out = dict(sd)
    for k, v in sd.items():
        if k.startswith(UNET):
            out["model_ema." + k[len("model."):].replace(".", "")] = v + 1
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    out["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    out[TE2 + "logit_scale"] = torch.tensor(4.6052)
    return out


LAYOUTS = {
    "te1_without_text_model": _without_text_model,
    "position_ids": _with_position_ids,
    "te1_without_text_model_with_position_ids": lambda sd: {
        **_without_text_model(sd), TE1 + "embeddings.position_ids": torch.arange(77).unsqueeze(0)
    },
    "extra_keys": _with_extras,
    "everything": lambda sd: _with_extras(_with_position_ids(_without_text_model(sd))),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sgm_key_layouts_load_the_plain_weights(layout, plain_sd, tiny_models, tmp_path, caplog):
    path = _write(tmp_path / f"{layout}.safetensors", LAYOUTS[layout](plain_sd))
    with caplog.at_level(logging.INFO):
        models = load_sdxl(str(path))
    assert_models_equal(models, tiny_models)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    if "extra" in layout or layout == "everything":
        assert any("EMA copies" in r.getMessage() and path.name in r.getMessage() for r in caplog.records)


def test_transformers5_text_encoder_keys_were_a_key_error_before(plain_sd):
    """The issue's case: without ``text_model.`` the config inference itself needs the normalised keys."""
    sd = _without_text_model(plain_sd)
    with pytest.raises(KeyError):
        sdxl_keys.infer_te1_config(sd)
    sdxl_keys.normalize_sgm_state_dict(sd)
    assert sdxl_keys.infer_te1_config(sd)["hidden_size"] == tiny_configs()["text_encoder"]["hidden_size"]


# -- sgm single files: storage dtypes -----------------------------------------------------------

STORED = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@pytest.mark.parametrize("stored", list(STORED))
def test_stored_dtypes_load(stored, plain_sd, tiny_models, tmp_path):
    dt = STORED[stored]
    path = _write(tmp_path / f"{stored}.safetensors", {k: v.to(dt) for k, v in plain_sd.items()})
    assert read_weights(path)[0][UNET + "out.2.weight"].dtype == dt  # safetensors keeps float8 as float8
    assert_models_equal(load_sdxl(str(path)), tiny_models, stored=dt)


def test_fp8_unet_with_fp16_rest_loads_in_bf16(plain_sd, tiny_models, tmp_path):
    """How "fp8" SDXL files are usually shared: the U-Net in float8, the rest in fp16."""
    sd = {k: v.to(torch.float8_e4m3fn if k.startswith(UNET) else torch.float16) for k, v in plain_sd.items()}
    models = load_sdxl(str(_write(tmp_path / "fp8.safetensors", sd)), dtype=torch.bfloat16, vae_dtype=torch.float32)
    unet_want = _expected(tiny_models[0], torch.float8_e4m3fn, torch.bfloat16)
    assert all(torch.equal(v, unet_want[k]) for k, v in models.unet.state_dict().items())
    vae_want = _expected(tiny_models[1], torch.float16, torch.float32)
    assert all(torch.equal(v, vae_want[k]) for k, v in models.vae.state_dict().items())
    te_want = _expected(tiny_models[3], torch.float16, torch.bfloat16)
    assert all(torch.equal(v, te_want[k]) for k, v in models.text_encoder2.state_dict().items())


# -- .ckpt pickles ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict_wrapper", "bare"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_ckpt_pickles(wrapped, zip_format, plain_sd, tiny_models, tmp_path):
    sd = _without_text_model(plain_sd) if wrapped else plain_sd
    obj = {"state_dict": sd, "epoch": 3, "global_step": 1200} if wrapped else sd
    path = tmp_path / "model.ckpt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    assert_models_equal(load_sdxl(str(path)), tiny_models)


def test_ckpt_with_python_objects_is_refused_weights_only(plain_sd, tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": plain_sd, "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(UserError, match=r"lightning\.ckpt.*Python objects besides tensors.*argparse\.Namespace.*weights-only"):
        load_sdxl(str(path))


# -- v-prediction markers -----------------------------------------------------------------------


@pytest.mark.parametrize("ztsnr", [False, True])
def test_v_prediction_markers(ztsnr, plain_sd, tiny_models, tmp_path, caplog):
    sd = dict(plain_sd, v_pred=torch.tensor([]))
    if ztsnr:
        sd["ztsnr"] = torch.tensor([])
    path = _write(tmp_path / "vpred.safetensors", sd)
    with caplog.at_level(logging.INFO, logger="library.sdxl.loading"):
        models = load_sdxl(str(path))
    assert_models_equal(models, tiny_models)
    assert models.v_prediction and models.scheduler_config["prediction_type"] == "v_prediction"
    assert models.zero_terminal_snr is ztsnr
    assert models.scheduler_config.get("rescale_betas_zero_snr", False) is ztsnr
    messages = [r.getMessage() for r in caplog.records]
    assert any("vpred.safetensors is a v-prediction model" in m for m in messages)
    assert any("zero terminal SNR" in m for m in messages) is ztsnr


def test_plain_file_is_epsilon(tiny_checkpoint):
    models = load_sdxl(str(tiny_checkpoint))
    assert not models.v_prediction and not models.zero_terminal_snr
    assert models.scheduler_config["prediction_type"] == "epsilon"


# -- diffusers folders --------------------------------------------------------------------------


def _copy_folder(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) == src and n in skip])
    return dst


@pytest.fixture(scope="session")
def fp16_variant_folder(tmp_path_factory, tiny_diffusers_folder, tiny_models) -> Path:
    """A diffusers folder holding only ``*.fp16.safetensors`` weight files, as often downloaded."""
    root = _copy_folder(tiny_diffusers_folder, tmp_path_factory.mktemp("fp16") / "sdxl",
                        skip=("unet", "vae", "text_encoder", "text_encoder_2"))
    for name, model in zip(("unet", "vae", "text_encoder", "text_encoder_2"), tiny_models):
        copy.deepcopy(model).to(torch.float16).save_pretrained(root / name, variant="fp16")
    return root


def test_diffusers_fp16_variant_folder(fp16_variant_folder, tiny_models):
    assert not list(fp16_variant_folder.glob("unet/diffusion_pytorch_model.safetensors"))
    assert list(fp16_variant_folder.glob("unet/*.fp16.safetensors"))
    assert_models_equal(load_sdxl(str(fp16_variant_folder)), tiny_models, stored=torch.float16)


def test_diffusers_folder_in_bf16(tiny_diffusers_folder, tiny_models):
    assert_models_equal(load_sdxl(str(tiny_diffusers_folder), dtype=torch.bfloat16, vae_dtype=torch.bfloat16),
                        tiny_models, loaded=torch.bfloat16)


@pytest.mark.parametrize("component", ["vae", "text_encoder_2", "unet"])
def test_diffusers_folder_without_a_component(component, tiny_diffusers_folder, tmp_path):
    root = _copy_folder(tiny_diffusers_folder, tmp_path / "partial", skip=(component,))
    with pytest.raises(UserError, match=rf"partial is not a diffusers SDXL folder: it has no {component} subfolder"):
        load_sdxl(str(root))


def test_diffusers_component_without_weights(tiny_diffusers_folder, tmp_path):
    root = _copy_folder(tiny_diffusers_folder, tmp_path / "nodata")
    for f in (root / "text_encoder_2").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match=r"nodata/text_encoder_2 has no weight file"):
        load_sdxl(str(root))


def test_diffusers_component_with_damaged_weights(tiny_diffusers_folder, tmp_path):
    root = _copy_folder(tiny_diffusers_folder, tmp_path / "damaged")
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"could not load .*damaged/unet"):
        load_sdxl(str(root))


def test_diffusers_folder_without_vae_with_separate_vae(tiny_diffusers_folder, tiny_models, tmp_path):
    root = _copy_folder(tiny_diffusers_folder, tmp_path / "novae", skip=("vae",))
    models = load_sdxl(str(root), vae=str(tiny_diffusers_folder / "vae"))
    assert_models_equal(models, tiny_models)


# -- a separate VAE -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def other_vae():
    """A VAE with other weights than the checkpoint's, so that an override is seen."""
    return perturbed_tiny_models(seed=7)[1]


def _vae_files(other_vae, root: Path) -> dict[str, Path]:
    sgm = sdxl_keys.vae_diffusers_to_sgm(other_vae.state_dict(), other_vae.config)
    bare = {k[len(sdxl_keys.VAE_PREFIX):]: v for k, v in sgm.items()}
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "sgm_prefixed": _write(root / "prefixed.safetensors", sgm),
        "sgm_bare": _write(root / "sdxl_vae.safetensors", bare),
        "sgm_fp16": _write(root / "sdxl_vae_fp16.safetensors", {k: v.half() for k, v in bare.items()}),
        "diffusers_file": _write(root / "diffusion_pytorch_model.safetensors", other_vae.state_dict()),
        "pt_file": root / "vae.pt",
    }
    torch.save(bare, files["pt_file"])
    other_vae.save_pretrained(root / "folder")
    files["diffusers_folder"] = root / "folder"
    copy.deepcopy(other_vae).half().save_pretrained(root / "pipe" / "vae", variant="fp16")
    files["pipeline_folder_fp16"] = root / "pipe"
    return files


@pytest.fixture(scope="session")
def vae_files(other_vae, tmp_path_factory):
    return _vae_files(other_vae, tmp_path_factory.mktemp("vaes"))


@pytest.mark.parametrize(
    "layout", ["sgm_prefixed", "sgm_bare", "sgm_fp16", "diffusers_file", "pt_file", "diffusers_folder", "pipeline_folder_fp16"]
)
def test_separate_vae_layouts(layout, vae_files, other_vae, tiny_checkpoint, tiny_models):
    models = load_sdxl(str(tiny_checkpoint), vae=str(vae_files[layout]))
    stored = (None, torch.float16 if "fp16" in layout else None, None, None)
    assert_models_equal(models, (tiny_models[0], other_vae, tiny_models[2], tiny_models[3]), stored=stored)


def test_full_checkpoint_as_vae(tiny_checkpoint, tiny_models):
    vae = load_vae(str(tiny_checkpoint))
    assert all(torch.equal(v, tiny_models[1].state_dict()[k]) for k, v in vae.state_dict().items())


def test_diffusers_vae_with_pre_0_14_attention_names(other_vae, tmp_path):
    old = {}
    for k, v in other_vae.state_dict().items():
        for new, former in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            k = k.replace(new, former)
        old[k] = v[:, :, None, None] if k.endswith(("query.weight", "key.weight", "value.weight", "proj_attn.weight")) else v
    vae = load_vae(str(_write(tmp_path / "old_vae.safetensors", old)))
    assert all(torch.equal(v, other_vae.state_dict()[k]) for k, v in vae.state_dict().items())


def test_checkpoint_without_vae_needs_a_separate_vae(plain_sd, vae_files, other_vae, tiny_models, tmp_path):
    path = _write(tmp_path / "novae.safetensors", {k: v for k, v in plain_sd.items() if not k.startswith("first_stage_model.")})
    with pytest.raises(UserError, match=r"novae\.safetensors has an SDXL U-Net but no first_stage_model\.\*.*--vae"):
        load_sdxl(str(path))
    models = load_sdxl(str(path), vae=str(vae_files["sgm_bare"]))
    assert_models_equal(models, (tiny_models[0], other_vae, tiny_models[2], tiny_models[3]))


def test_not_a_vae(tmp_path, tiny_checkpoint):
    path = _write(tmp_path / "lllite.safetensors", {"lllite_unet_x.down.0.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match=r"lllite\.safetensors is not a VAE.*ControlNet-LLLite"):
        load_sdxl(str(tiny_checkpoint), vae=str(path))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match=r"emptydir has no config\.json"):
        load_vae(str(tmp_path / "emptydir"))


# -- SDXL-family files that are not the base model ----------------------------------------------


def _refiner(sd):
    out = {k: v for k, v in sd.items() if not k.startswith(("conditioner.embedders.0.", TE2))}
    out.update({"conditioner.embedders.0.model." + k[len(TE2):]: v for k, v in sd.items() if k.startswith(TE2)})
    return out


def _in_channels(n):
    def make(sd):
        w = sd[UNET + "input_blocks.0.0.weight"]
        return dict(sd, **{UNET + "input_blocks.0.0.weight": torch.cat([w] * 3, dim=1)[:, :n]})
    return make


NON_BASE = {
    "refiner": (_refiner, r"is an SDXL refiner"),
    "inpainting": (_in_channels(9), r"is an SDXL inpainting model \(its U-Net takes 9 input channels"),
    "instruct_pix2pix": (_in_channels(8), r"is an SDXL InstructPix2Pix-style edit model"),
    "playground_v2_5": (lambda sd: dict(sd, edm_mean=torch.zeros(1, 4, 1, 1), edm_std=torch.ones(1, 4, 1, 1)), r"is Playground v2\.5"),
    "cosxl": (lambda sd: dict(sd, **{"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)}), r"is an EDM v-prediction model such as CosXL"),
}


@pytest.mark.parametrize("variant", list(NON_BASE))
def test_non_base_sdxl_files_are_named(variant, plain_sd, tmp_path):
    make, message = NON_BASE[variant]
    path = _write(tmp_path / f"{variant}.safetensors", make(plain_sd))
    with pytest.raises(UserError, match=rf"{variant}\.safetensors {message}.*not an SDXL base model"):
        load_sdxl(str(path))


def test_distilled_unet_is_named(tmp_path):
    cfg = tiny_configs(transformer_layers=(1, 2))
    path = tmp_path / "ssd.safetensors"
    save_sdxl_single_file(path, *build_random_models(cfg))
    sd, _ = read_weights(path)
    # SSD-1B-style pruning: one decoder attention block of a level keeps fewer transformer blocks.
    sd = {k: v for k, v in sd.items() if not k.startswith(UNET + "output_blocks.1.1.transformer_blocks.1.")}
    _write(path, sd)
    with pytest.raises(UserError, match=r"ssd\.safetensors is a distilled or pruned SDXL U-Net.*output_blocks\.1\.1: 1"):
        load_sdxl(str(path))


def test_scaled_fp8_is_refused(plain_sd, tmp_path):
    sd = dict(plain_sd, scaled_fp8=torch.zeros(0, dtype=torch.float8_e4m3fn))
    sd[UNET + "out.2.scale_weight"] = torch.tensor(1.5)
    with pytest.raises(UserError, match=r"scaled\.safetensors is a scaled-fp8 checkpoint"):
        load_sdxl(str(_write(tmp_path / "scaled.safetensors", sd)))


@pytest.mark.parametrize("kind,key,message", [
    ("sd3", "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "Stable Diffusion 3"),
    ("flux", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "FLUX"),
    ("controlnet", "control_model.input_blocks.0.0.weight", "This is a ControlNet"),
])
def test_other_model_families_are_named(kind, key, message, tmp_path):
    path = _write(tmp_path / f"{kind}.safetensors", {key: torch.zeros(2, 2)})
    with pytest.raises(UserError, match=rf"{kind}\.safetensors is not an SDXL checkpoint.*{message}"):
        load_sdxl(str(path))


def test_diffusers_inpainting_folder_is_named(tiny_diffusers_folder, tmp_path):
    root = _copy_folder(tiny_diffusers_folder, tmp_path / "inpaint")
    cfg = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps(dict(cfg, in_channels=9)))
    with pytest.raises(UserError, match=r"inpaint is an SDXL inpainting model.*not an SDXL base model"):
        load_sdxl(str(root))


def test_diffusers_refiner_folder_is_named(tiny_diffusers_folder, tmp_path):
    root = _copy_folder(tiny_diffusers_folder, tmp_path / "refiner", skip=("text_encoder", "tokenizer"))
    with pytest.raises(UserError, match=r"refiner is an SDXL refiner.*not an SDXL base model"):
        load_sdxl(str(root))


# -- damaged files: the file and what is wrong, never a traceback -------------------------------


def test_damaged_files_are_named(plain_sd, tmp_path):
    cases = {}
    cases["empty.safetensors"] = b""
    cases["garbage.ckpt"] = b"\x80\x02not really a pickle"
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=r"empty\.safetensors is empty \(0 bytes\)"):
        load_sdxl(str(tmp_path / "empty.safetensors"))
    with pytest.raises(UserError, match=r"garbage\.ckpt \(21 bytes\): UnpicklingError: Unsupported operand 110\. .*damaged or truncated"):
        load_sdxl(str(tmp_path / "garbage.ckpt"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF0000")
    with pytest.raises(UserError, match=r"model\.gguf: unknown extension '\.gguf'\. GGUF"):
        load_sdxl(str(tmp_path / "model.gguf"))


def test_wrong_shapes_and_missing_keys_are_named(plain_sd, tmp_path):
    sd = dict(plain_sd)
    key = UNET + "input_blocks.1.0.in_layers.2.weight"
    sd[key] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(UserError, match=r"U-Net weights in .*shapes\.safetensors do not fit.*input_blocks|down_blocks"):
        load_sdxl(str(_write(tmp_path / "shapes.safetensors", sd)))
    sd = {k: v for k, v in plain_sd.items() if k != TE2 + "ln_final.weight"}
    with pytest.raises(UserError, match=r"CLIPTextModelWithProjection weights in .*missing\.safetensors do not fit.*final_layer_norm"):
        load_sdxl(str(_write(tmp_path / "missing.safetensors", sd)))
    sd = {k: v for k, v in plain_sd.items() if k != UNET + "out.2.weight"}
    with pytest.raises(UserError, match=r"U-Net weights \(model\.diffusion_model\.\*\) in .*noout\.safetensors are not in the SDXL layout"):
        load_sdxl(str(_write(tmp_path / "noout.safetensors", sd)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file_is_named(tiny_checkpoint, tmp_path):
    path = tmp_path / "locked.safetensors"
    shutil.copy(tiny_checkpoint, path)
    path.chmod(0)
    with pytest.raises(UserError, match=r"locked\.safetensors: permission denied"):
        load_sdxl(str(path))


def test_unknown_unet_keys_are_reported(plain_sd, tiny_models, tmp_path, caplog):
    """Keys SDXL's U-Net lacks are an actionable warning (the file holds more than was used)."""
    sd = dict(plain_sd, **{UNET + "input_blocks.0.0.extra.weight": torch.zeros(2)})
    with caplog.at_level(logging.WARNING):
        models = load_sdxl(str(_write(tmp_path / "extra.safetensors", sd)))
    assert_models_equal(models, tiny_models)
    assert any("extra.safetensors: 1 U-Net keys are not part of SDXL's U-Net" in r.getMessage() for r in caplog.records)


# -- memory options -----------------------------------------------------------------------------


@pytest.fixture
def safe_open_calls(monkeypatch):
    calls = []
    real = weights_io.safe_open

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(weights_io, "safe_open", spy)
    return calls


def test_disable_mmap_reads_without_mmap(tiny_checkpoint, tiny_models, safe_open_calls):
    assert_models_equal(load_sdxl(str(tiny_checkpoint), disable_mmap=True), tiny_models)
    assert any(c.get("backend") == "pread" for c in safe_open_calls)


def test_disable_mmap_ckpt_and_folder(tiny_diffusers_folder, plain_sd, tiny_models, tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    torch.save(plain_sd, path)
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("mmap")) or real_load(*a, **k))
    assert_models_equal(load_sdxl(str(path), disable_mmap=True), tiny_models)
    assert_models_equal(load_sdxl(str(path)), tiny_models)
    assert seen[:2] == [False, True]
    assert_models_equal(load_sdxl(str(tiny_diffusers_folder), disable_mmap=True), tiny_models)


def test_lowram_reads_straight_onto_the_device(plain_sd, tmp_path, tiny_checkpoint, tiny_models, safe_open_calls):
    """lowram: tensors go from the file to the device, models are built there. The meta device stands in
    for an accelerator (torch.load can map onto it; a CUDA machine is not needed to see the path)."""
    path = tmp_path / "m.ckpt"
    torch.save(plain_sd, path)
    models = load_sdxl(str(path), lowram=True, device="meta")
    for name in NAMES:
        module = getattr(models, name)
        assert {t.device.type for t in module.state_dict().values()} == {"meta"}, name
    assert models.unet.config.block_out_channels == tiny_models[0].config.block_out_channels
    # safetensors cannot read onto meta: the error says so instead of calling the file damaged.
    with pytest.raises(UserError, match=r"tiny_sdxl\.safetensors straight onto meta.*without lowram"):
        load_sdxl(str(tiny_checkpoint), lowram=True, device="meta")
    # On the CPU the device still reaches safetensors.
    assert_models_equal(load_sdxl(str(tiny_checkpoint), lowram=True, device="cpu"), tiny_models)
    assert safe_open_calls[-1].get("device") == "cpu"


def test_mmap_load_does_not_write_the_file(tiny_checkpoint, tmp_path):
    """Memory-mapped tensors are copy-on-write: changing a loaded fp32 weight leaves the file as it was."""
    path = tmp_path / "cow.safetensors"
    shutil.copy(tiny_checkpoint, path)
    before = path.read_bytes()
    models = load_sdxl(str(path))
    with torch.no_grad():
        next(models.unet.parameters()).add_(1)
    assert path.read_bytes() == before


# -- third-party progress bars ----------------------------------------------------------------


def test_loading_leaves_transformers_progress_bars_as_they_were(tiny_checkpoint, fp16_variant_folder, capsys):
    from transformers.utils import logging as transformers_logging

    load_sdxl(str(tiny_checkpoint), dtype=torch.bfloat16)
    assert transformers_logging.is_progress_bar_enabled()
    load_sdxl(str(fp16_variant_folder), dtype=torch.bfloat16)
    assert transformers_logging.is_progress_bar_enabled()  # only turned off while the folder loads
    assert "Loading weights" not in capsys.readouterr().err
