"""What the sd-scripts generation options do here, on the tiny SDXL (CPU, fp32, 64 px and a few odd sizes).

One group per option family: Deep Shrink, Gradual Latent, --vae_slices, the negative original size,
the highres fix's upscalers and first-pass file, LoRA application modes with LLLite, and the
script-level options (metadata printing, preview, logging, tokenizer cache, seeds, memory format).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.generation.deep_shrink import input_blocks
from library.generation.pipeline import (
    DeepShrink,
    GenerationRequest,
    GradualLatent,
    Unsharp,
    generate,
)
from library.generation.png_metadata import read_png_parameters
from library.generation.samplers import build_scheduler
from library.generation.vae import VaeRunner
from library.sdxl.loading import load_sdxl
from library.sdxl.lora import HookedLoRA, MergedLoRA, read_lora
from networks.control_net_lllite import ControlNetLLLite, LLLiteModule
from tests.gen_helpers import (
    SMALL,
    make_gen_files,
    pixels,
    pngs,
    run_main,
    run_main_outputs,
    stdin_lines,
)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "tiny_sdxl" / "tiny_sdxl.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_gen_files(tmp_path_factory.mktemp("gen_features"))


@pytest.fixture(scope="module")
def models(files):
    return load_sdxl(files["ckpt"])


@pytest.fixture(scope="module")
def lllite(models, files):
    return ControlNetLLLite.from_file(models.unet, files["lllite1"]).eval()


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube", negative_prompt="blurry", width=64, height=64, steps=4, seed=7, sampler="euler")
    return GenerationRequest(**{**base, **kw})


def draw(models, nets=(), **kw) -> np.ndarray:
    return np.asarray(generate(models, list(nets), req(**kw), progress=False)[0]).astype(np.int16)


@pytest.fixture
def unet_calls(models):
    """The (height, width) of the latents of every U-Net call, and the added time ids it got."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((tuple(args[0].shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].clone()))

    handle = models.unet.register_forward_pre_hook(hook, with_kwargs=True)
    yield calls
    handle.remove()


# ----------------------------------------------------------------------------------------------
# Deep Shrink
# ----------------------------------------------------------------------------------------------


def test_deep_shrink_shrinks_the_chosen_block_at_the_chosen_timesteps(models):
    blocks = input_blocks(models.unet)
    seen: list[tuple[int, tuple[int, int]]] = []  # (depth, output grid) of input blocks 1 and 2 per call
    handles = [blocks[d].register_forward_hook(lambda m, a, out, d=d: seen.append((d, tuple(out.shape[-2:]))))
               for d in (1, 2)]
    try:
        plain = draw(models)
        assert seen[:2] == [(1, (8, 8)), (2, (4, 4))]
        seen.clear()
        ds = DeepShrink(depth_1=1, timesteps_1=700, depth_2=2, timesteps_2=300, ratio=0.5)
        shrunk = draw(models, deep_shrink=ds)
    finally:
        for h in handles:
            h.remove()
    timesteps = build_scheduler("euler", models.scheduler_config)
    timesteps.set_timesteps(4)
    expected = []
    for t in timesteps.timesteps.tolist():
        depth = 1 if t >= 700 else 2 if t >= 300 else None
        # a shrink before block 1 halves its output and the next level's; one before block 2 only the latter
        expected += [(1, (4, 4) if depth == 1 else (8, 8)), (2, (2, 2) if depth in (1, 2) else (4, 4))]
    assert seen == expected
    assert {depth for depth in (1 if t >= 700 else 2 if t >= 300 else None for t in timesteps.timesteps)} == {1, 2, None}
    assert np.abs(shrunk - plain).max() > 0
    assert not blocks[1]._forward_pre_hooks and not models.unet._forward_pre_hooks  # nothing left behind


def test_deep_shrink_depth_beyond_the_unet_is_a_user_error(models):
    from library.errors import UserError

    with pytest.raises(UserError, match="Deep Shrink depth 5 does not exist in this U-Net: it has 4 input blocks"):
        draw(models, deep_shrink=DeepShrink(depth_1=5))


@pytest.mark.parametrize("size", [(64, 64), (104, 144), (40, 56)])
def test_deep_shrink_and_gradual_latent_with_lllite_use_each_blocks_grid(models, lllite, files, size, monkeypatch):
    grids = []
    original = LLLiteModule.tokens_for

    def tokens_for(self, n, grid=None):
        tokens = original(self, n, grid)
        grids.append((grid, tokens.shape[1]))
        return tokens

    monkeypatch.setattr(LLLiteModule, "tokens_for", tokens_for)
    w, h = size
    kw = dict(width=w, height=h, steps=4, sampler="euler_a", guide_images=[files["guide0"]],
              deep_shrink=DeepShrink(depth_1=1, timesteps_1=500, ratio=0.5),
              gradual_latent=GradualLatent(timesteps=900, ratio=0.5, ratio_step=0.25, every_n_steps=1))
    on = draw(models, [lllite], **kw)
    off = draw(models, [lllite], control_multipliers=[0.0], **kw)
    assert on.shape == (h, w, 3) and np.abs(on - off).max() > 0
    assert all(g is not None and g[0] * g[1] == n for g, n in grids)
    full = (h // 8, w // 8)
    assert any(g[0] < full[0] for g, _ in grids)  # shrunk grids were met and embedded at their own size


# ----------------------------------------------------------------------------------------------
# Gradual Latent
# ----------------------------------------------------------------------------------------------


def test_gradual_latent_grows_the_latents_at_the_set_steps(models, unet_calls, caplog):
    plain = draw(models, sampler="euler_a")
    unet_calls.clear()
    gl = GradualLatent(timesteps=1000, ratio=0.5, ratio_step=0.25, every_n_steps=1)
    grown = draw(models, sampler="euler_a", gradual_latent=gl)
    # start at 0.5 (4x4); the first step grows to 0.75 (6x6), the second to 1.0 (8x8)
    assert [c[0] for c in unet_calls] == [(4, 4), (6, 6), (8, 8), (8, 8)]
    assert np.abs(grown - plain).max() > 0
    unet_calls.clear()
    every_2 = draw(models, sampler="euler_a", gradual_latent=dataclasses.replace(gl, every_n_steps=2))
    assert [c[0] for c in unet_calls] == [(4, 4), (6, 6), (6, 6), (8, 8)]
    variants = [draw(models, sampler="euler_a", gradual_latent=dataclasses.replace(gl, **change))
                for change in ({"s_noise": 0.5}, {"unsharp": Unsharp(3, 0.5, 0.5, True)},
                               {"unsharp": Unsharp(3, 0.5, 0.5, False)})]
    for v in [every_2, *variants]:
        assert np.abs(v - grown).max() > 0
    with caplog.at_level(logging.WARNING):
        late = draw(models, sampler="euler_a", gradual_latent=GradualLatent(timesteps=10, ratio=0.5))
    # only the last step (timestep below 10) grows once, to 0.625: the latents are then resized to the full size
    assert late.shape == (64, 64, 3) and "Gradual Latent reached ratio 0.625 by the last step" in caplog.text


# ----------------------------------------------------------------------------------------------
# --vae_slices, --vae_batch_size
# ----------------------------------------------------------------------------------------------


def test_vae_slices_give_the_same_image_within_one_level(models):
    whole = draw(models, width=128, height=96)
    assert np.abs(draw(models, width=128, height=96) - whole).max() == 0
    decodes = []
    original = VaeRunner.decode
    VaeRunner.decode = lambda self, z: decodes.append(self.slices) or original(self, z)
    try:
        sliced = np.asarray(generate(models, [], req(width=128, height=96), progress=False, vae_slices=5)[0])
    finally:
        VaeRunner.decode = original
    assert decodes == [5] and np.abs(sliced.astype(np.int16) - whole).max() <= 1


@pytest.mark.skipif(not BUNDLED.is_file(), reason="the bundled tiny SDXL is not in this checkout")
def test_vae_slices_on_a_trained_vae_decode_and_encode_a_picture_alike():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vae_decode import picture_latents

    vae = load_sdxl(str(BUNDLED)).vae.eval()
    z = picture_latents(vae, 192)
    with torch.no_grad():
        whole = VaeRunner(vae).decode(z)
        pixels_sliced = VaeRunner(vae, slices=6).decode(z)
        assert ((pixels_sliced - whole).abs() * 127.5).max() < 0.05  # levels of 255
        assert (VaeRunner(vae, slices=4).encode(whole) - VaeRunner(vae).encode(whole)).abs().max() < 1e-4


def test_vae_batch_size_below_one_is_a_share_of_the_batch(models):
    calls = []
    runner = VaeRunner(models.vae, batch_size=0.5)
    original = models.vae.decode
    models.vae.decode = lambda z, *a, **k: calls.append(z.shape[0]) or original(z, *a, **k)
    try:
        with torch.no_grad():
            runner.decode(torch.zeros(4, 4, 8, 8))
    finally:
        del models.vae.decode
    assert calls == [2, 2] and VaeRunner(models.vae, batch_size=3)._images_per_call(4) == 3


# ----------------------------------------------------------------------------------------------
# SDXL size conditioning of the negative half
# ----------------------------------------------------------------------------------------------


def test_negative_original_size_reaches_the_uncond_half_only(models, unet_calls):
    base = draw(models, original_width=1024, original_height=768)
    ids = unet_calls[0][1]
    assert ids.tolist() == [[768, 1024, 0, 0, 64, 64]] * 2  # (negative, prompt) halves
    unet_calls.clear()
    neg = draw(models, original_width=1024, original_height=768, original_width_negative=512,
               original_height_negative=256)
    assert unet_calls[0][1].tolist() == [[256, 512, 0, 0, 64, 64], [768, 1024, 0, 0, 64, 64]]
    assert np.abs(neg - base).max() > 0
    unet_calls.clear()
    draw(models, negative_scale=2.0, original_width_negative=512)
    assert [row[:2] for row in unet_calls[0][1].tolist()] == [[64, 512], [64, 64], [64, 512]]  # empty, prompt, negative


# ----------------------------------------------------------------------------------------------
# Highres fix: upscalers, strengths, the first pass
# ----------------------------------------------------------------------------------------------


def test_highres_upscalers_differ_and_sharpening_changes_the_pixels(models, unet_calls):
    kw = dict(highres_fix_scale=0.5, highres_fix_steps=2, steps=4, strength=0.5)
    images = {name: draw(models, highres_fix_upscaler=name, **kw)
              for name in ("bicubic", "lanczos", "nearest", "latent_bicubic", "latent_nearest")}
    names = list(images)
    assert all(np.abs(images[a] - images[b]).max() > 0 for i, a in enumerate(names) for b in names[i + 1:])
    assert np.abs(draw(models, **kw) - images["bicubic"]).max() == 0  # bicubic is the default
    sharp = draw(models, highres_fix_upscaler="lanczos", highres_fix_upscaler_args=(("sharpen", 1.0),), **kw)
    assert np.abs(sharp - images["lanczos"]).max() > 0
    first = []
    unet_calls.clear()
    generate(models, [], req(**kw), progress=False, first_pass=first.extend)
    assert [im.size for im in first] == [(32, 32)] and [c[0] for c in unet_calls] == [(4, 4)] * 2 + [(8, 8)] * 2
    # the explicit original size is scaled for the first pass, as in sd-scripts
    unet_calls.clear()
    draw(models, original_width=1000, original_height=600, **kw)
    assert unet_calls[0][1][0].tolist()[:2] == [300, 500] and unet_calls[-1][1][0].tolist()[:2] == [600, 1000]


def test_highres_strengths_follow_sd_scripts(models, files, unet_calls):
    kw = dict(init_image=files["init"], highres_fix_scale=0.5, highres_fix_steps=4, steps=4)
    draw(models, strength=0.5, highres_fix_strength=0.75, **kw)
    # pass 1: img2img at highres_fix_strength (3 of 4 steps); pass 2: at strength (2 of 4 steps)
    assert [c[0] for c in unet_calls] == [(4, 4)] * 3 + [(8, 8)] * 2


# ----------------------------------------------------------------------------------------------
# LoRA modes with LLLite
# ----------------------------------------------------------------------------------------------


def test_lora_hooked_pre_calc_and_merged_draw_the_same_with_lllite(models, lllite, files):
    kw = dict(guide_images=[files["guide0"]])
    plain = draw(models, [lllite], **kw)
    layers = read_lora(files["lora"], models.unet, models.text_encoder1, models.text_encoder2).layers
    originals = [layer.module.weight.detach().clone() for layer in layers]
    images = {}
    for mode in ("hooked", "pre_calc", "merged"):
        lora = read_lora(files["lora"], models.unet, models.text_encoder1, models.text_encoder2)
        net = HookedLoRA(lora, 0.8) if mode == "hooked" else MergedLoRA(lora, 0.8, keep_backup=mode == "pre_calc")
        try:
            images[mode] = draw(models, [lllite], **kw)
            if mode == "pre_calc":
                net.set_multiplier(0.0)  # merged again from the kept weights: exactly the original
                assert all(torch.equal(layer.module.weight, w) for layer, w in zip(layers, originals))
                assert np.array_equal(draw(models, [lllite], **kw), plain)
        finally:
            if mode == "hooked":
                net.remove()
            with torch.no_grad():  # a permanent merge has no way back: the test restores the layers itself
                for layer, w in zip(layers, originals):
                    layer.module.weight.copy_(w)
    assert np.abs(images["hooked"] - plain).max() > 2
    assert np.abs(images["pre_calc"] - images["hooked"]).max() <= 1
    assert np.abs(images["merged"] - images["hooked"]).max() <= 1
    assert np.array_equal(draw(models, [lllite], **kw), plain)


# ----------------------------------------------------------------------------------------------
# Script-level options
# ----------------------------------------------------------------------------------------------


def test_script_writes_first_pass_metadata_log_and_tokenizer_cache(files, tmp_path, capsys):
    out, log, tok = tmp_path / "out", tmp_path / "logs" / "run.log", tmp_path / "tok"
    code, err = run_main(
        capsys, "--ckpt", files["ckpt"], "--prompt", "a cat --c a photo of a cat --nw 512 --nh 256 --d 3",
        "--highres_fix_scale", "0.5", "--highres_fix_steps", "2", "--highres_fix_save_1st",
        "--network_module", "networks.lora", "--network_weights", files["lora"], "--network_show_meta",
        "--control_net_lllite_models", files["lllite1"],
        "--guide_image_path", files["guide0"], "--console_log_file", str(log), "--tokenizer_cache_dir", str(tok),
        "--outdir", str(out), *SMALL,
    )
    assert code == 0, err
    final, first = sorted(pngs(out), key=lambda p: p.name.endswith("_1st.png"))
    assert first.name == final.name.replace(".png", "_1st.png")
    meta1, meta = read_png_parameters(first), read_png_parameters(final)
    assert (meta1["size"], meta1["highres_fix_pass"], meta1["steps"], meta["size"]) == ("32x32", 1, 2, "64x64")
    assert meta["clip_prompt"] == "a photo of a cat" and meta["original_size_negative"] == "512x256"
    assert Image.open(first).size == (32, 32)
    assert "INFO" in log.read_text() and "saved" in log.read_text() and "saved" not in err  # INFO goes to the file
    assert (tok / "tokenizer").is_dir() and (tok / "tokenizer_2").is_dir()


def test_network_show_meta_prints_each_files_metadata(files, tmp_path, capsys):
    code, err, out = run_main_outputs(capsys, "--ckpt", files["ckpt"], "--prompt", "x", "--network_module",
                                      "networks.lora", "--network_weights", files["lora"],
                                      "--control_net_lllite_models", files["lllite1"],
                                      "--guide_image_path", files["guide0"], "--network_show_meta",
                                      "--outdir", str(tmp_path), *SMALL)
    assert code == 0, err
    assert f"metadata of {files['lora']}:" in out and "  ss_note: test lora" in out
    assert f"metadata of {files['lllite1']}:" in out and "  ss_training_comment: test lllite 1" in out


def test_interactive_preview_unless_no_preview(files, tmp_path, capsys, monkeypatch):
    from PIL import ImageShow

    shown = []
    monkeypatch.setattr(ImageShow, "show", lambda image, title=None: shown.append(title) or True)
    for extra, expected in (([], 2), (["--no_preview"], 0)):
        shown.clear()
        with stdin_lines("a cat --d 1\na dog --d 2\n\n"):
            code, err = run_main(capsys, "--ckpt", files["ckpt"], "--interactive", *extra,
                                 "--outdir", str(tmp_path / str(expected)), *SMALL)
        assert code == 0, err
        assert len(shown) == expected and len(pngs(tmp_path / str(expected))) == 2


def test_merged_lora_refuses_a_line_multiplier_and_pre_calc_takes_it(files, tmp_path, capsys):
    common = ["--ckpt", files["ckpt"], "--network_module", "networks.lora", "--network_weights", files["lora"],
              "--network_mul", "0.8", *SMALL]
    code, err = run_main(capsys, *common, "--network_merge", "--prompt", "x --am 0.5 --d 1", "--outdir", str(tmp_path))
    assert code == 2 and "--am 0.5 for" in err.splitlines()[-1] and not pngs(tmp_path)
    images = {}
    for mode, extra in (("hooked", []), ("pre_calc", ["--network_pre_calc"]), ("merged", ["--network_merge"])):
        line = "x --d 1" if mode == "merged" else "x --d 1 --am 0.8"
        code, err = run_main(capsys, *common, *extra, "--prompt", line, "--outdir", str(tmp_path / mode))
        assert code == 0, err
        images[mode] = pixels(pngs(tmp_path / mode)[0])
    assert np.abs(images["pre_calc"] - images["hooked"]).max() <= 1
    assert np.abs(images["merged"] - images["hooked"]).max() <= 1


def test_iter_same_seed_gives_every_image_of_an_iteration_one_seed(files, tmp_path, capsys):
    code, err = run_main(capsys, "--ckpt", files["ckpt"], "--prompt", "x", "--images_per_prompt", "2", "--n_iter", "2",
                         "--seed", "40", "--iter_same_seed", "--sequential_file_name", "--outdir", str(tmp_path), *SMALL)
    assert code == 0, err
    assert [read_png_parameters(f)["seed"] for f in pngs(tmp_path)] == [40, 40, 41, 41]


def test_console_log_level_and_simple_format(files, tmp_path, capsys):
    args = ["--ckpt", files["ckpt"], "--prompt", "x --d 1", "--W", "68", *SMALL[2:]]
    code, err = run_main(capsys, *args, "--outdir", str(tmp_path / "a"))
    assert code == 0 and re.search(r"\d\d:\d\d:\d\d INFO library\.generation\.jobs: saved", err), err
    code, err = run_main(capsys, *args, "--console_log_simple", "--console_log_level", "WARNING",
                         "--outdir", str(tmp_path / "b"))
    assert code == 0 and "INFO" not in err and "WARNING: --W 68 is not a multiple of 8: using 64" in err, err


def test_model_options_channels_last_and_attention(files, caplog):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from library.generation.options import ModelOptions
    from library.generation.model_setup import load_models

    with caplog.at_level(logging.INFO):
        models = load_models(ModelOptions(files["ckpt"], channels_last=True, attention="xformers"), torch.device("cpu"))
    conv = models.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert "--xformers needs a CUDA GPU: using PyTorch SDPA attention instead" in caplog.text
    assert all(isinstance(p, AttnProcessor2_0) for p in models.unet.attn_processors.values())


def test_bench_vae_decode_smoke(capsys):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_vae_decode

    threads = torch.get_num_threads()
    try:
        res = bench_vae_decode.main(["--tiny"])
    finally:
        torch.set_num_threads(threads)
    assert "--vae_slices" in capsys.readouterr().out
    assert [c["slices"] for c in res["cases"]] == [None, 2, 4]
    assert all(d["max_levels"] < 1 for d in res["differences"])


def test_interactive_lines_bring_their_own_guides_and_a_bad_line_is_skipped(files, tmp_path, capsys):
    lines = f"a cat --d 1 --cn {files['guide0']}\na dog --d 2\na fox --d 3 --zz 1\na cow --d 4 --cn {files['guide1']}\n\n"
    with stdin_lines(lines):
        code, err = run_main(capsys, "--ckpt", files["ckpt"], "--interactive", "--no_preview",
                             "--control_net_lllite_models", files["lllite1"], "--outdir", str(tmp_path), *SMALL)
    assert code == 0, err
    assert "interactive line 2: 1 LLLite model(s) but no guide image" in err
    assert "interactive line 3: unknown prompt option --zz" in err
    assert sorted(read_png_parameters(f)["seed"] for f in pngs(tmp_path)) == [1, 4]


def test_images_of_odd_kinds_are_read_as_rgb_and_grey(files, tmp_path, capsys):
    """16-bit grey, CMYK, palette with transparency, a rotated JPEG: guides, init and mask all open."""
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((48, 80)) * 65535).astype(np.uint16)).save(tmp_path / "guide16.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).convert("CMYK").save(tmp_path / "init.jpg")
    mask = Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8) * 255).convert("P")
    mask.info["transparency"] = 0
    mask.save(tmp_path / "mask.png")
    rotated = Image.fromarray((rng.random((32, 64, 3)) * 255).astype(np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    code, err = run_main(capsys, "--ckpt", files["ckpt"], "--prompt", "x --d 1", "--control_net_lllite_models",
                         files["lllite1"], files["lllite2"], "--guide_image_path", str(tmp_path / "guide16.png"),
                         str(tmp_path / "rotated.jpg"), "--image_path", str(tmp_path / "init.jpg"), "--mask_path",
                         str(tmp_path / "mask.png"), "--outdir", str(tmp_path / "out"), *SMALL)
    assert code == 0, err
    assert Image.open(pngs(tmp_path / "out")[0]).size == (64, 64)
