"""library/generation/pipeline.py, samplers.py, lora.py, png_metadata.py on a tiny random SDXL (CPU, fp32, 64x64)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.generation.pipeline import (
    GenerationRequest,
    GradualLatent,
    batch_key,
    generate,
    request_from_prompt_spec,
    round_size,
)
from library.generation.png_metadata import (
    format_parameters_text,
    parse_parameters_text,
    read_png_parameters,
    save_png,
)
from library.generation.prompt_lines import parse_prompt_line
from library.generation.samplers import SAMPLER_NAMES, build_scheduler
from library.sdxl.loading import load_sdxl, save_sdxl_single_file
from library.sdxl.lora import lora_name_map, make_lora_state_dict, merge_lora
from library.sdxl.text_encoding import parse_prompt_attention
from library.sdxl.tiny import build_random_models
from library.sdxl.weights_io import write_weights
from networks.control_net_lllite import ControlNetLLLite, LLLiteModule

STEPS = 3


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_model") / "tiny_sdxl.safetensors"
    save_sdxl_single_file(path, *build_random_models())
    return path


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return load_sdxl(str(tiny_ckpt))


def make_lllite(unet, seed: int) -> ControlNetLLLite:
    torch.manual_seed(seed)
    net = ControlNetLLLite(unet, cond_emb_dim=8, network_dim=8)
    for _, module in net.lllite_modules():
        torch.nn.init.normal_(module.up[0].weight, std=1.0)
    return net.eval()


@pytest.fixture(scope="module")
def nets(models):
    return make_lllite(models.unet, 1), make_lllite(models.unet, 2)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen_images")
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("guide_a", "guide_b", "init"):
        arr = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{name}.png")
        paths[name] = str(folder / f"{name}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    paths["mask"] = str(folder / "mask.png")
    for name, value in (("black", 0), ("white", 255)):
        Image.fromarray(np.full((64, 64), value, np.uint8)).save(folder / f"{name}.png")
        paths[name] = str(folder / f"{name}.png")
    return paths


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube", negative_prompt="blurry", width=64, height=64, steps=STEPS, seed=7, sampler="euler")
    base.update(kw)
    return GenerationRequest(**base)


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def draw(models, nets, **kw) -> np.ndarray:
    return arr(generate(models, list(nets), req(**kw), progress=False)[0])


# ----------------------------------------------------------------------------------------------
# Determinism, multipliers, stacking
# ----------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(models, nets, images):
    a = generate(models, [nets[0]], req(guide_images=[images["guide_a"]]), progress=False)[0]
    b = generate(models, [nets[0]], req(guide_images=[images["guide_a"]]), progress=False)[0]
    assert a.tobytes() == b.tobytes() and a.size == (64, 64) and a.info["seed"] == 7
    c = generate(models, [nets[0]], req(seed=8, guide_images=[images["guide_a"]]), progress=False)[0]
    assert a.tobytes() != c.tobytes()


def test_batch_does_not_change_an_image(models, images):
    alone = draw(models, [], seed=3)
    batch = generate(models, [], [req(seed=5, prompt="x"), req(seed=3)], progress=False)
    assert np.abs(arr(batch[1]) - alone).max() <= 2


def test_multiplier_zero_equals_no_lllite(models, nets, images):
    plain = draw(models, [])
    zero = draw(models, [nets[0]], guide_images=[images["guide_a"]], control_multipliers=[0.0])
    assert np.array_equal(plain, zero)
    on = draw(models, [nets[0]], guide_images=[images["guide_a"]])
    assert np.abs(on - plain).max() > 0


def test_stacked_models_differ_and_order_does_not_matter(models, nets, images):
    a, b = nets
    ga, gb = images["guide_a"], images["guide_b"]
    only_a = draw(models, [a], guide_images=[ga])
    only_b = draw(models, [b], guide_images=[gb])
    both = draw(models, [a, b], guide_images=[ga, gb])
    swapped = draw(models, [b, a], guide_images=[gb, ga])
    assert np.abs(both - only_a).max() > 0 and np.abs(both - only_b).max() > 0
    assert np.abs(both - swapped).max() <= 1


def test_generate_restores_model_state(models, nets, images):
    a = nets[0]
    a.set_multiplier(0.3)
    models.unet.train()
    try:
        generate(models, [a], req(guide_images=[images["guide_a"]], control_multipliers=[1.0]), progress=False)
        assert a.multiplier == 0.3 and a.active and not a._attached
        assert models.unet.training and not models.vae.training
        assert all(m.cond_emb is None for _, m in a.lllite_modules())
    finally:
        models.unet.eval()
        a.set_multiplier(1.0)


# ----------------------------------------------------------------------------------------------
# Windows, embedding once per pass
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def residual_log(monkeypatch, nets):
    """Which network's modules ran at which (pass, step)."""
    owner = {id(m): i for i, net in enumerate(nets) for _, m in net.lllite_modules()}
    log: dict[tuple[int, int], set[int]] = {}
    where = {"key": None}
    original = LLLiteModule.residual

    def residual(self, x, grid=None):
        log.setdefault(where["key"], set()).add(owner[id(self)])
        return original(self, x, grid)

    monkeypatch.setattr(LLLiteModule, "residual", residual)

    def on_step(pass_index, step, evaluation):
        where["key"] = (pass_index, step)

    return log, on_step


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_start_and_ratio_windows_switch_at_the_right_steps(models, nets, images, residual_log, sampler):
    log, on_step = residual_log
    r = req(steps=4, sampler=sampler, guide_images=[images["guide_a"], images["guide_b"]],
            control_starts=[0.0, 0.5], control_ratios=[0.5, 1.0])
    generate(models, list(nets), r, progress=False, on_step=on_step)
    assert log == {(0, 0): {0}, (0, 1): {0}, (0, 2): {1}, (0, 3): {1}}


def test_guides_embedded_once_per_pass_at_the_pass_size(models, nets, images, residual_log, monkeypatch):
    log, on_step = residual_log
    calls = []
    original = ControlNetLLLite.set_cond_image

    def set_cond_image(self, image):
        if image is not None:
            calls.append(tuple(image.shape))
        return original(self, image)

    monkeypatch.setattr(ControlNetLLLite, "set_cond_image", set_cond_image)
    r = req(guide_images=[images["guide_a"]], highres_fix_scale=0.5, highres_fix_steps=2, strength=0.7)
    out = generate(models, [nets[0]], r, progress=False, on_step=on_step)[0]
    assert out.size == (64, 64)
    assert calls == [(1, 3, 32, 32), (1, 3, 64, 64)]
    assert {k[0] for k in log} == {0, 1}

    log.clear()
    calls.clear()
    generate(models, [nets[0]], dataclasses.replace(r, highres_fix_disable_control_net=True), progress=False,
             on_step=on_step)
    assert calls == [(1, 3, 32, 32)] and {k[0] for k in log} == {0}


# ----------------------------------------------------------------------------------------------
# Modes and sizes
# ----------------------------------------------------------------------------------------------


def test_img2img_and_inpainting(models, nets, images):
    i2i = draw(models, [], init_image=images["init"], strength=0.6)
    assert i2i.shape == (64, 64, 3)
    full_mask = draw(models, [], init_image=images["init"], strength=0.6, mask=images["white"])
    assert np.array_equal(i2i, full_mask)  # a white mask regenerates everything: plain img2img
    # a black mask keeps everything: the VAE's reconstruction of the init image
    keep = draw(models, [], init_image=images["init"], strength=0.6, mask=images["black"])
    from library.generation.pipeline import image_to_tensor, tensor_to_images
    from library.generation.vae import VaeRunner

    vae = VaeRunner(models.vae)
    with torch.no_grad():
        recon = arr(tensor_to_images(vae.decode(vae.encode(image_to_tensor(images["init"], 64, 64)[None])))[0])
    assert np.abs(keep - recon).max() <= 1
    # inpainting: where the mask is black the final latents are exactly the init image's latents
    import library.generation.pipeline as gen

    decoded = []
    original_decode = VaeRunner.decode

    def decode(self, latents):
        decoded.append(latents.clone())
        return original_decode(self, latents)

    VaeRunner.decode = decode
    try:
        draw(models, [nets[0]], guide_images=[images["guide_a"]], init_image=images["init"], mask=images["mask"],
             strength=1.0)
    finally:
        VaeRunner.decode = original_decode
    with torch.no_grad():
        init_latents = vae.encode(image_to_tensor(images["init"], 64, 64)[None])
    mask = gen.mask_to_latent(images["mask"], 64, 64)[None]
    kept = (mask == 0).expand_as(init_latents)
    assert kept.any() and (mask == 1).any()
    assert torch.equal(decoded[-1][kept], init_latents[kept])
    assert not torch.allclose(decoded[-1][~kept], init_latents[~kept], atol=1e-2)


def test_highres_fix_runs_both_passes_and_latent_upscaling_skips_the_vae(models, nets, images, monkeypatch):
    from library.generation.vae import VaeRunner

    evaluations, encodes = [], []
    original_encode = VaeRunner.encode
    monkeypatch.setattr(VaeRunner, "encode", lambda self, x: encodes.append(x.shape) or original_encode(self, x))
    kw = dict(guide_images=[images["guide_a"]], highres_fix_scale=0.5, highres_fix_steps=2, steps=4, strength=0.5)
    latent = arr(generate(models, [nets[0]], req(highres_fix_latents_upscaling=True, **kw), progress=False,
                          on_step=lambda p, s, i: evaluations.append(p))[0])
    # pass 1: 2 steps at 32x32; pass 2: int(4 * 0.5) = 2 img2img steps at 64x64; no VAE encode between them
    assert evaluations == [0, 0, 1, 1] and encodes == [] and latent.shape == (64, 64, 3)
    pixel = arr(generate(models, [nets[0]], req(**kw), progress=False)[0])
    assert encodes == [(1, 3, 64, 64)]  # the pixel upscaler decodes, resizes and encodes the first pass
    assert np.abs(pixel - latent).max() > 0
    single = draw(models, [nets[0]], guide_images=[images["guide_a"]], steps=4)
    assert np.abs(single - latent).max() > 0


def test_odd_size_is_rounded_with_a_warning(models, nets, images, caplog):
    # 1080x1440 proportions, scaled down for the CPU: 108x144 -> 104x144 (latent 13x18: odd token grids)
    with caplog.at_level(logging.WARNING):
        out = generate(models, [nets[0]], req(width=108, height=144, steps=2, guide_images=[images["guide_a"]]),
                       progress=False)[0]
    assert out.size == (104, 144)
    assert "width 108 is not a multiple of 8: using 104" in caplog.text and "height" not in caplog.text
    assert round_size(1080, 1440) == (1080, 1440)
    with pytest.raises(UserError, match="width 24 is too small: the smallest size is 32 px with LLLite"):
        generate(models, [nets[0]], req(width=24, guide_images=[images["guide_a"]]), progress=False)


def test_negative_scale_and_weighting_change_the_image(models):
    base = draw(models, [])
    assert np.abs(draw(models, [], negative_scale=3.0) - base).max() > 0
    assert np.abs(draw(models, [], prompt="a (red:1.5) cube") - base).max() > 0
    assert parse_prompt_attention("a (red:1.5) [cube] (x)") == [("a ", 1.0), ("red", 1.5), (" ", 1.0),
                                                                 ("cube", 1 / 1.1), (" ", 1.0), ("x", 1.1)]


# Written out here, not read from library.generation.samplers, so that a wrong mapping there fails this test.
EXPECTED_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}), "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}), "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def test_every_sampler_name_builds_its_scheduler_with_the_models_schedule(models):
    assert set(EXPECTED_SCHEDULERS) == set(SAMPLER_NAMES)
    for sampler, (cls, settings) in EXPECTED_SCHEDULERS.items():
        scheduler = build_scheduler(sampler, models.scheduler_config)
        assert type(scheduler).__name__ == cls, sampler
        for key, value in settings.items():
            assert scheduler.config[key] == value, (sampler, key)
        for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
            assert scheduler.config[key] == models.scheduler_config[key], (sampler, key)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "heun", "dpm_2_a", "dpmsolver", "dpmsingle", "lms", "pndm"])
def test_samplers_draw_different_images_from_the_same_noise(models, sampler):
    out = draw(models, [], sampler=sampler, steps=2)
    assert out.shape == (64, 64, 3) and out.std() > 0
    if sampler != "euler_a":
        assert np.abs(out - draw(models, [], sampler="euler_a", steps=2)).max() > 0


def test_sampler_uses_the_models_prediction_type(models):
    cfg = dict(models.scheduler_config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert build_scheduler("euler_a", cfg).config.prediction_type == "v_prediction"
    assert build_scheduler("ddim", cfg).config.rescale_betas_zero_snr
    with pytest.raises(UserError, match="unknown sampler 'k_foo'"):
        build_scheduler("k_foo", cfg)


def test_bad_requests_are_user_errors(models, nets, images):
    with pytest.raises(UserError, match="guide image"):
        generate(models, list(nets), req(guide_images=[images["guide_a"]]), progress=False)
    with pytest.raises(UserError, match="guide image not found"):
        generate(models, [nets[0]], req(guide_images=["/nonexistent/edges.png"]), progress=False)
    with pytest.raises(UserError, match="needs the image to inpaint"):
        generate(models, [], req(mask=images["mask"]), progress=False)
    with pytest.raises(UserError, match=r"--control_net_ratios 1.5 is out of range: it must be at least 0 and at most 1"):
        generate(models, [nets[0]], req(guide_images=[images["guide_a"]], control_ratios=[1.5]), progress=False)
    with pytest.raises(UserError, match="is not below its --control_net_ratios 0.5: the model would never be on"):
        generate(models, [nets[0]], req(guide_images=[images["guide_a"]], control_starts=[0.5], control_ratios=[0.5]),
                 progress=False)
    with pytest.raises(UserError, match="Gradual Latent .* works with --sampler euler_a only"):
        generate(models, [], req(gradual_latent=GradualLatent(timesteps=500)), progress=False)


# ----------------------------------------------------------------------------------------------
# Prompt lines -> requests
# ----------------------------------------------------------------------------------------------


def test_prompt_line_options_become_a_request(images):
    spec = parse_prompt_line(
        "a (cat:1.2) --n bad, ugly --w 96 --h 64 --s 5 --d 7,8 --l 5.5 --nl 3 --t 0.5 --ow 1024 --oh 768 "
        f"--ct 4 --cl 8 --am 0.5,0.25 --ss k_euler_a --cn {images['guide_a']} --cn {images['guide_b']}"
    )
    r = request_from_prompt_spec(spec, GenerationRequest(steps=30, scale=7.0))
    assert (r.prompt, r.negative_prompt, r.width, r.height, r.steps, r.seed) == ("a (cat:1.2)", "bad, ugly", 96, 64, 5, 7)
    assert (r.scale, r.negative_scale, r.strength) == (5.5, 3.0, 0.5)
    assert (r.original_width, r.original_height, r.crop_top, r.crop_left) == (1024, 768, 4, 8)
    assert r.network_multipliers == [0.5, 0.25] and r.sampler == "k_euler_a"
    assert r.guide_images == [images["guide_a"], images["guide_b"]]
    kept = request_from_prompt_spec(parse_prompt_line("plain"), GenerationRequest(steps=30, negative_prompt="x"))
    assert (kept.steps, kept.negative_prompt, kept.seed) == (30, "x", None)
    assert batch_key(r) == batch_key(dataclasses.replace(r, prompt="other", seed=1))
    assert batch_key(r) != batch_key(dataclasses.replace(r, steps=6))


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------


def test_lora_names_follow_the_kohya_layout(models):
    names = lora_name_map(models.unet, models.text_encoder1, models.text_encoder2)
    unet = models.unet
    assert names["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"] is \
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert names["lora_unet_middle_block_1_proj_in"] is unet.mid_block.attentions[0].proj_in
    assert names["lora_unet_input_blocks_1_0_in_layers_2"] is unet.down_blocks[0].resnets[0].conv1
    assert names["lora_unet_output_blocks_0_0_skip_connection"] is unet.up_blocks[0].resnets[0].conv_shortcut
    assert names["lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_0_proj"] is \
        unet.up_blocks[0].attentions[1].transformer_blocks[0].ff.net[0].proj
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names


def test_lora_merges_changes_multiplier_and_unmerges(models, tmp_path):
    names = lora_name_map(models.unet, models.text_encoder1, models.text_encoder2)
    chosen = ["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_1_0_in_layers_2",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1"]
    sd = make_lora_state_dict(names, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(0), names=chosen)
    path = tmp_path / "lora.safetensors"
    write_weights(path, sd)
    q = names[chosen[0]]
    before = q.weight.detach().clone()
    lora = merge_lora(path, models.unet, models.text_encoder1, models.text_encoder2, multiplier=0.5)
    try:
        expected = before + 0.5 * 0.5 * (sd[chosen[0] + ".lora_up.weight"] @ sd[chosen[0] + ".lora_down.weight"])
        assert torch.allclose(q.weight, expected, atol=1e-6)
        assert len(lora.layers) == 4
        lora.set_multiplier(1.0)
        assert torch.allclose(q.weight, before + 2 * (expected - before), atol=1e-6)
    finally:
        lora.unmerge()
    assert torch.allclose(q.weight, before, atol=1e-6)


def test_lora_errors(models, tmp_path, nets):
    names = lora_name_map(models.unet, models.text_encoder1, models.text_encoder2)
    sd = make_lora_state_dict(names, rank=2, names=[next(iter(names))])
    for i in range(5):  # an SD1.5-style layer name that this model does not have
        sd.update({f"lora_unet_down_blocks_0_attentions_{i}_proj_in.{k}": v
                   for k, v in make_lora_state_dict({"x": torch.nn.Linear(4, 4)}, names=["x"]).items()
                   for k in [k.split(".", 1)[1]]})
    bad = tmp_path / "sd15.safetensors"
    write_weights(bad, sd)
    with pytest.raises(UserError, match="5 of 6 LoRA entries match no layer"):
        merge_lora(bad, models.unet, models.text_encoder1, models.text_encoder2)
    lllite = tmp_path / "lllite.safetensors"
    nets[0].save(lllite)
    with pytest.raises(UserError, match="not a LoRA file"):
        merge_lora(lllite, models.unet)


# ----------------------------------------------------------------------------------------------
# PNG metadata
# ----------------------------------------------------------------------------------------------


def test_png_metadata_round_trips(tmp_path):
    params = {"prompt": "a cat, (sitting:1.2)", "negative_prompt": "blurry, low quality", "steps": 28,
              "sampler": "euler_a", "scale": 7.0, "seed": 123, "size": "1024x768", "model": "sdxl.safetensors",
              "lllite_models": ["canny.safetensors", "depth.safetensors"], "lllite_multipliers": [1.0, 0.5],
              "guide_images": ["edges, 1.png", "depth.png"]}
    path = tmp_path / "x.png"
    save_png(Image.new("RGB", (8, 8)), path, params)
    assert read_png_parameters(path) == params
    text = Image.open(path).text["parameters"]
    assert text.startswith("a cat, (sitting:1.2)\nNegative prompt: blurry, low quality\nSteps: 28, Sampler: euler_a")
    parsed = parse_parameters_text(text)
    assert parsed["prompt"] == params["prompt"] and parsed["negative_prompt"] == params["negative_prompt"]
    assert parsed["seed"] == "123" and parsed["size"] == "1024x768" and parsed["lllite_multipliers"] == "1 | 0.5"
    assert parsed["guide_images"] == "edges, 1.png | depth.png"
    assert parse_parameters_text(format_parameters_text({"prompt": "p", "steps": 3})) == {"prompt": "p", "steps": "3"}
