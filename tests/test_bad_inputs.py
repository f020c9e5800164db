"""Every bad input is refused before any work starts: exit code 2, no traceback, the value on the last line, nothing written.

The module is a harness and tables of cases, one table per entry script. A case gives the arguments
(``{name}`` is replaced by a file of the ``bad_files`` fixture, ``{tmp}`` by the case's own folder),
the text the last line of stderr must contain (the value that is wrong), and whether the mistake
is one that needs no model: for those the model loader is replaced by one that fails the test if
it is called. The scripts' ``main`` runs in this process (importing torch per case in a subprocess
would cost more than all the cases together).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from library.errors import run_cli
from library.sdxl.lora import lora_name_map, make_lora_state_dict
from library.sdxl.tiny import build_random_models
from library.sdxl.weights_io import read_weights, write_weights
from tests.gen_helpers import make_gen_files

# ----------------------------------------------------------------------------------------------
# Harness
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    """One mistake: the arguments that make it and the text the last line of stderr must name."""

    name: str
    argv: tuple[str, ...]
    named: str
    before_load: bool = True  # found before any model loads (the loader must not be called)


def expand(template: str, files: dict[str, str], tmp: Path) -> str:
    return template.format(tmp=tmp, **files)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def forbid_model_loading(monkeypatch) -> None:
    """Make loading a model fail the test: an option error must be found before it."""

    def loader(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr("library.sdxl.loading.load_sdxl", loader)


def run_refused(main: Callable[[list[str]], object], argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)`` under ``run_cli``, as the script runs it: (exit code, stderr)."""
    code = 0
    try:
        run_cli(lambda: main(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def check_refusal(case: BadInput, main, files: dict[str, str], tmp: Path, capsys, monkeypatch) -> None:
    """Run ``case`` and assert: exit code 2, no traceback, the value on the last line, nothing written."""
    if case.before_load:
        forbid_model_loading(monkeypatch)
    before = files_under(tmp)
    argv = [expand(a, files, tmp) for a in case.argv]
    code, err = run_refused(main, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    named = expand(case.named, files, tmp)
    assert lines and named in lines[-1], f"last line {lines[-1] if lines else None!r} does not name {named!r}"
    assert files_under(tmp) == before, f"written: {files_under(tmp) - before}"


# ----------------------------------------------------------------------------------------------
# Files, good and bad
# ----------------------------------------------------------------------------------------------


def _bad_weight_files(d: Path, good: dict[str, str], out: dict[str, str]) -> None:
    unet, _, te1, te2 = build_random_models()
    names = lora_name_map(unet, te1, te2)
    name = next(n for n in names if n.endswith("attn1_to_q"))
    sd = make_lora_state_dict(names, rank=2, names=[name])
    sd[name + ".lora_down.weight"] = torch.zeros(2, 7)  # the layer takes another width
    write_weights(d / "lora_shape.safetensors", sd)
    sd15 = {f"lora_unet_down_blocks_0_attentions_{i}_proj_in.{k}": v for i in range(5)
            for k, v in make_lora_state_dict({"x": torch.nn.Linear(4, 4)}, names=["x"]).items() for k in [k.split(".", 1)[1]]}
    write_weights(d / "lora_sd15.safetensors", sd15)
    lllite, _ = read_weights(good["lllite1"])
    write_weights(d / "lllite_other.safetensors", {k.replace("input_blocks_1_1", "input_blocks_40_1"): v
                                                   for k, v in lllite.items()})
    key = next(k for k in lllite if k.endswith("down.0.weight"))
    write_weights(d / "lllite_shape.safetensors", {**lllite, key: torch.zeros(3, 3)})
    save_file({"clip_l": torch.zeros(2, 48), "clip_g": torch.zeros(2, 64)}, str(d / "ti_width.safetensors"))
    (d / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for key in ("lora_shape", "lora_sd15", "lllite_other", "lllite_shape", "ti_width", "damaged"):
        out[key] = str(d / f"{key}.safetensors")


def _bad_images_and_prompts(d: Path, good: dict[str, str], out: dict[str, str]) -> None:
    (d / "broken.png").write_bytes(b"not a png at all")
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(Path(good["guide0"]).read_bytes()[:80])
    (d / "no_images").mkdir()
    (d / "no_images" / "readme.txt").write_text("no images here")
    (d / "a_file").write_text("a file, not a folder")
    prompts = {"unknown": "a cat --zz 3\n", "value": "a cat\na dog --s zero\n", "small": "a cat --w 16\n",
               "cn": "a cat --cn missing_guide.png\n", "empty": "# nothing\n\n"}
    for key, text in prompts.items():
        (d / f"p_{key}.txt").write_text(text)
        out[f"p_{key}"] = str(d / f"p_{key}.txt")
    (d / "p_syntax.toml").write_text('prompt = [ { prompt = "x" ')
    (d / "p_latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    for key in ("broken", "empty", "truncated"):
        out[key] = str(d / f"{key}.png")
    out.update(no_images=str(d / "no_images"), a_file=str(d / "a_file"), p_syntax=str(d / "p_syntax.toml"),
               p_latin1=str(d / "p_latin1.txt"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad_inputs")
    out = make_gen_files(d)
    _bad_weight_files(d, out, out)
    _bad_images_and_prompts(d, out, out)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "black.png")
    return out


# ----------------------------------------------------------------------------------------------
# sdxl_gen_img.py
# ----------------------------------------------------------------------------------------------

G = ("--ckpt", "{ckpt}", "--outdir", "{tmp}/out", "--W", "64", "--H", "64", "--steps", "2", "--no_progress")
P = G + ("--prompt", "a cat")
L = P + ("--control_net_lllite_models", "{lllite1}", "--guide_image_path", "{guide0}")
LORA = P + ("--network_module", "networks.lora", "--network_weights", "{lora}")


def _gen(name: str, argv: tuple[str, ...], named: str, before_load: bool = True) -> BadInput:
    return BadInput(name, argv, named, before_load)


GENERATION_CASES = [
    # sizes
    _gen("W zero", P + ("--W", "0"), "--W 0 is too small: the smallest size is 8 px"),
    _gen("H negative", P + ("--H", "-64"), "--H -64 is too small"),
    _gen("W under 32 with LLLite", L + ("--W", "24"), "--W 24 is too small: the smallest size is 32 px with LLLite"),
    _gen("line width under 32 with LLLite", L[:-6] + ("--from_file", "{p_small}", "--control_net_lllite_models",
                                                       "{lllite1}", "--guide_image_path", "{guide0}"), "--w 16"),
    _gen("highres first pass too small", L + ("--highres_fix_scale", "0.25"), "--highres_fix_scale 0.25 makes the first pass 0x0"),
    _gen("W not a number", P + ("--W", "abc"), "'abc'"),
    # counts, ranges, numbers
    _gen("steps zero", P + ("--steps", "0"), "--steps 0 is out of range: it must be at least 1"),
    _gen("images_per_prompt zero", P + ("--images_per_prompt", "0"), "--images_per_prompt 0"),
    _gen("n_iter negative", P + ("--n_iter", "-1"), "--n_iter -1"),
    _gen("batch_size zero", P + ("--batch_size", "0"), "--batch_size 0"),
    _gen("scale not finite", P + ("--scale", "nan"), "--scale nan"),
    _gen("seed negative", P + ("--seed", "-5"), "--seed -5 is out of range: it must be at least 0"),
    _gen("clip_skip zero", P + ("--clip_skip", "0"), "--clip_skip 0"),
    _gen("clip_skip beyond the encoder", P + ("--clip_skip", "13"), "--clip_skip 13 is out of range: it must be at least 1 "
                                                                      "and at most 12"),
    _gen("max_embeddings_multiples zero", P + ("--max_embeddings_multiples", "0"), "--max_embeddings_multiples 0"),
    _gen("crop negative", P + ("--crop_top", "-8"), "--crop_top -8"),
    _gen("original size zero", P + ("--original_width_negative", "0"), "--original_width_negative 0"),
    _gen("vae_slices one", P + ("--vae_slices", "1"), "--vae_slices 1 is out of range: it must be at least 2"),
    _gen("vae_batch_size zero", P + ("--vae_batch_size", "0"), "--vae_batch_size 0"),
    _gen("sampler unknown", P + ("--sampler", "warp"), "'warp'"),
    # img2img, inpainting, highres fix
    _gen("strength above one", P + ("--image_path", "{init}", "--strength", "1.5"), "--strength 1.5 is out of range"),
    # sd-scripts fails on it too (no init image to mask); what sd-scripts ignores is tested in test_gen_script.py
    _gen("mask without an image", P + ("--mask_path", "{mask}"), "--mask_path {mask} needs --image_path"),
    _gen("network module without weights", P + ("--network_module", "networks.lora"),
         "--network_module networks.lora needs --network_weights"),
    _gen("highres scale one", P + ("--highres_fix_scale", "1"), "--highres_fix_scale 1 is out of range"),
    _gen("upscaler unknown", P + ("--highres_fix_scale", "0.5", "--highres_fix_upscaler", "tools.latent_upscaler"),
         "'tools.latent_upscaler' is not an upscaler here"),
    _gen("upscaler args for a latent upscaler", P + ("--highres_fix_scale", "0.5", "--highres_fix_upscaler",
                                                     "latent_bicubic", "--highres_fix_upscaler_args", "sharpen=1"),
         "'sharpen=1': the latent upscaler latent_bicubic takes no arguments"),
    # Deep Shrink, Gradual Latent
    _gen("deep shrink depth 9", P + ("--ds_depth_1", "9"), "--ds_depth_1 9 is out of range: it must be at least 0 and at most 8"),
    _gen("deep shrink ratio 1.5", P + ("--ds_depth_1", "3", "--ds_ratio", "1.5"), "--ds_ratio 1.5"),
    _gen("gradual latent unsharp", P + ("--gradual_latent_timesteps", "650", "--gradual_latent_unsharp_params", "2,1"),
         "--gradual_latent_unsharp_params '2,1'"),
    _gen("gradual latent with a mask", P + ("--gradual_latent_timesteps", "650", "--sampler", "euler_a", "--image_path",
                                             "{init}", "--mask_path", "{mask}"), "inpainting (--mask_path) cannot follow it"),
    # LLLite options
    _gen("control ratio above one", L + ("--control_net_ratios", "1.5"), "--control_net_ratios 1.5 is out of range"),
    _gen("start not below ratio", L + ("--control_net_starts", "0.5", "--control_net_ratios", "0.5"),
         "--control_net_starts 0.5 of LLLite model 1 is not below its --control_net_ratios 0.5"),
    _gen("fewer guides than models", P + ("--control_net_lllite_models", "{lllite1}", "{lllite2}", "--guide_image_path",
                                          "{guide0}"), "2 LLLite models but only 1 guide image"),
    # LoRA options
    _gen("merge more models than files", LORA + ("--network_merge_n_models", "2"), "--network_merge_n_models 2"),
    _gen("network module other", LORA + ("--network_module", "lycoris.kohya"), "--network_module lycoris.kohya"),
    # refused and conflicting options
    _gen("network_args", LORA + ("--network_args", "conv_dim=4"), "--network_args conv_dim=4"),
    _gen("regional mask colours", LORA + ("--network_regional_mask_max_color_codes", "3"),
         "--network_regional_mask_max_color_codes 3"),
    _gen("clip vision strength", P + ("--clip_vision_strength", "0.5"), "--clip_vision_strength 0.5"),
    _gen("fp16 and bf16", P + ("--fp16", "--bf16"), "--fp16 and --bf16 both given"),
    _gen("sdpa and xformers", P + ("--sdpa", "--xformers"), "--sdpa and --xformers both given"),
    _gen("device unknown", P + ("--device", "gpu7"), "--device gpu7"),
    _gen("no prompt", G, "nothing to draw: give --prompt, --from_file or --interactive"),
    # files: checkpoint, VAE, weights
    _gen("ckpt missing", P[:1] + ("{tmp}/nope.safetensors",) + P[2:], "--ckpt {tmp}/nope.safetensors: not found"),
    _gen("ckpt is an LLLite file", P[:1] + ("{lllite1}",) + P[2:], "--ckpt {lllite1} is a ControlNet-LLLite file"),
    _gen("ckpt is a LoRA file", P[:1] + ("{lora}",) + P[2:], "--ckpt {lora} is a LoRA file"),
    _gen("ckpt damaged", P[:1] + ("{damaged}",) + P[2:], "{damaged}"),
    _gen("vae missing", P + ("--vae", "{tmp}/vae.safetensors"), "--vae {tmp}/vae.safetensors: no such file"),
    _gen("LLLite file missing", P + ("--control_net_lllite_models", "{tmp}/x.safetensors", "--guide_image_path",
                                     "{guide0}"), "--control_net_lllite_models {tmp}/x.safetensors: no such file"),
    _gen("LLLite file is a LoRA", P + ("--control_net_lllite_models", "{lora}", "--guide_image_path", "{guide0}"),
         "--control_net_lllite_models {lora} is not a ControlNet-LLLite file"),
    _gen("LLLite file damaged", P + ("--control_net_lllite_models", "{damaged}", "--guide_image_path", "{guide0}"),
         "{damaged}"),
    _gen("LoRA file is an LLLite file", P + ("--network_module", "networks.lora", "--network_weights", "{lllite1}"), "--network_weights {lllite1} is not a LoRA"),
    _gen("LLLite for another model", P + ("--control_net_lllite_models", "{lllite_other}", "--guide_image_path",
                                          "{guide0}"), "{lllite_other} does not fit this U-Net", before_load=False),
    _gen("LLLite with a wrong shape", P + ("--control_net_lllite_models", "{lllite_shape}", "--guide_image_path",
                                           "{guide0}"), "{lllite_shape}", before_load=False),
    _gen("LoRA with a wrong shape", LORA[:-1] + ("{lora_shape}",), "{lora_shape}: LoRA layer",
         before_load=False),
    _gen("LoRA for SD1.5", LORA[:-1] + ("{lora_sd15}",), "{lora_sd15}: 5 of 5 LoRA entries match no layer",
         before_load=False),
    _gen("textual inversion of another width", P + ("--textual_inversion_embeddings", "{ti_width}"), "{ti_width}",
         before_load=False),
    _gen("textual inversion missing", P + ("--textual_inversion_embeddings", "{tmp}/emb.safetensors"),
         "--textual_inversion_embeddings {tmp}/emb.safetensors: no such file"),
    # images
    _gen("guide not an image", L[:-1] + ("{broken}",), "cannot read guide image {broken}"),
    _gen("guide empty file", L[:-1] + ("{empty}",), "cannot read guide image {empty}"),
    _gen("guide truncated", L[:-1] + ("{truncated}",), "{truncated}"),
    _gen("guide folder without images", L[:-1] + ("{no_images}",), "guide image folder {no_images} holds no images"),
    _gen("guide missing", L[:-1] + ("{tmp}/edges.png",), "--guide_image_path {tmp}/edges.png: no such file"),
    _gen("init not an image", P + ("--image_path", "{broken}"), "cannot read init image (--image_path) {broken}"),
    _gen("mask empty", P + ("--image_path", "{init}", "--mask_path", "{empty}"), "{empty}"),
    _gen("line guide missing", L + ("--prompt", "a cat --cn {tmp}/g.png"), "{tmp}/g.png"),
    # prompt files and lines
    _gen("prompt file missing", G + ("--from_file", "{tmp}/p.txt"), "--from_file {tmp}/p.txt: no such file"),
    _gen("prompt line unknown option", G + ("--from_file", "{p_unknown}"), "{p_unknown} line 1: unknown prompt option --zz"),
    _gen("prompt line bad value", G + ("--from_file", "{p_value}"), "{p_value} line 2: --s 'zero' is not valid"),
    _gen("prompt file syntax", G + ("--from_file", "{p_syntax}"), "syntax error in prompt file {p_syntax}"),
    _gen("prompt file empty", G + ("--from_file", "{p_empty}"), "prompt file {p_empty} contains no prompts"),
    _gen("prompt file not UTF-8", G + ("--from_file", "{p_latin1}"), "prompt file {p_latin1} is not UTF-8"),
    _gen("--prompt unknown option", G + ("--prompt", "a cat --W2 512"), "--prompt: unknown prompt option --W2"),
    # folders
    _gen("outdir under a file", P[:3] + ("{a_file}/out",) + P[4:], "--outdir {a_file}/out: cannot create or write"),
    _gen("log file under a file", P + ("--console_log_file", "{a_file}/log.txt"), "--console_log_file {a_file}"),
    _gen("log file is a folder", P + ("--console_log_file", "{tmp}"), "--console_log_file {tmp} is a folder"),
    _gen("tokenizer cache is a file", P + ("--tokenizer_cache_dir", "{a_file}"), "--tokenizer_cache_dir {a_file} is a file"),
]


@pytest.mark.parametrize("case", GENERATION_CASES, ids=[c.name for c in GENERATION_CASES])
def test_generation_bad_input(case, bad_files, tmp_path, capsys, monkeypatch):
    import sdxl_gen_img

    check_refusal(case, sdxl_gen_img.main, bad_files, tmp_path, capsys, monkeypatch)


def test_generation_table_covers_enough():
    assert len(GENERATION_CASES) >= 35 and len({c.name for c in GENERATION_CASES}) == len(GENERATION_CASES)
    json.dumps([c.name for c in GENERATION_CASES])


# ----------------------------------------------------------------------------------------------
# sdxl_train_control_net_lllite.py
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_files(bad_files, tmp_path_factory) -> dict[str, str]:
    """A good dataset beside datasets, configs, states and prompt files with one mistake each."""
    from tests.conftest import make_shape_dataset

    d = tmp_path_factory.mktemp("bad_train")
    out = dict(bad_files)
    good = make_shape_dataset(d / "good", n=2, size=64)
    out.update(data=str(good), images=str(d / "good" / "images"), cond=str(d / "good" / "conditioning"))
    toml_text = good.read_text()
    (d / "unknown_key.toml").write_text(toml_text.replace("batch_size = 2", "batch_size = 2\nbatch_sise = 4"))
    (d / "bad_syntax.toml").write_text(toml_text.replace("[[datasets]]", "[[datasets]"))
    (d / "neg_repeats.toml").write_text(toml_text + "  num_repeats = -1\n")
    unpaired = make_shape_dataset(d / "unpaired", n=2, size=64)
    (d / "unpaired" / "conditioning" / "001.png").unlink()
    corrupt = make_shape_dataset(d / "corrupt", n=2, size=64)
    (d / "corrupt" / "images" / "001.png").write_bytes(b"not an image")
    out.update(unknown_key=str(d / "unknown_key.toml"), bad_syntax=str(d / "bad_syntax.toml"),
               neg_repeats=str(d / "neg_repeats.toml"), unpaired=str(unpaired), corrupt=str(corrupt))
    (d / "typo.toml").write_text("learning_rte = 1e-4\n")
    (d / "wrong_type.toml").write_text('network_dim = "64"\n')
    (d / "v2.toml").write_text("v2 = true\n")
    (d / "half_state").mkdir()
    (d / "no_cn.txt").write_text("a red square --w 64 --h 64\n")
    (d / "broken_guides").mkdir()
    (d / "broken_guides" / "broken.png").write_bytes(b"not a png")
    (d / "broken_guides" / "broken.txt").write_text("a red square")
    out["broken_guides"] = str(d / "broken_guides")
    out.update(typo=str(d / "typo.toml"), wrong_type=str(d / "wrong_type.toml"), v2=str(d / "v2.toml"),
               half_state=str(d / "half_state"), no_cn=str(d / "no_cn.txt"))
    return out


T = ("--pretrained_model_name_or_path", "{ckpt}", "--dataset_config", "{data}", "--output_dir", "{tmp}/out",
     "--max_train_steps", "2", "--network_dim", "4", "--cond_emb_dim", "4")


def _train(name: str, extra: tuple[str, ...], named: str, before_load: bool = True, base: tuple[str, ...] = T) -> BadInput:
    return BadInput(name, base + extra, named, before_load)


def _without(option: str) -> tuple[str, ...]:
    i = T.index(option)
    return T[:i] + T[i + 2:]


TRAINING_CASES = [
    # the seven of issue #16, and their neighbours
    _train("output_dir under a file", ("--output_dir", "{a_file}/out"), "--output_dir {a_file}/out: cannot create or write"),
    _train("network_dropout 1.5", ("--network_dropout", "1.5"), "--network_dropout 1.5 is out of range: it must be at least 0 and below 1"),
    _train("learning_rate negative", ("--learning_rate=-1e-4",), "--learning_rate -0.0001 is out of range: it must be above 0"),
    _train("max_train_steps -1", ("--max_train_steps", "-1"), "--max_train_steps -1 is out of range: it must be at least 1"),
    _train("max_train_steps 0", ("--max_train_steps", "0"), "--max_train_steps 0"),
    _train("max_train_epochs 0", ("--max_train_epochs", "0"), "--max_train_epochs 0"),
    _train("network_dim 0", ("--network_dim", "0"), "--network_dim 0"),
    _train("cond_emb_dim odd", ("--cond_emb_dim", "7"), "--cond_emb_dim 7"),
    _train("gradient_accumulation_steps 0", ("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps 0"),
    _train("seed negative", ("--seed", "-3"), "--seed -3"),
    _train("vae_batch_size 0", ("--vae_batch_size", "0"), "--vae_batch_size 0"),
    _train("save_every_n_steps 0", ("--save_every_n_steps", "0"), "--save_every_n_steps 0"),
    _train("max_grad_norm negative", ("--max_grad_norm", "-1"), "--max_grad_norm -1"),
    # noise, loss, schedule, optimizer
    _train("timesteps crossed", ("--min_timestep", "500", "--max_timestep", "400"), "--min_timestep 500 must be below --max_timestep 400"),
    _train("max_timestep 2000", ("--max_timestep", "2000"), "--max_timestep 2000"),
    _train("noise_offset negative", ("--noise_offset", "-0.1"), "--noise_offset -0.1"),
    _train("huber_c zero", ("--loss_type", "huber", "--huber_c", "0"), "--huber_c 0"),
    _train("optimizer misspelled", ("--optimizer_type", "adamx"), "'adamx'"),
    _train("scheduler misspelled", ("--lr_scheduler", "cosinee"), "'cosinee'"),
    _train("mixed precision fp8", ("--mixed_precision", "fp8"), "'fp8'"),
    _train("optimizer argument out of range", ("--optimizer_args", "betas=(0.9,1.5)"), "--optimizer_args do not fit AdamW"),
    _train("ZeRO stage 3", ("--deepspeed", "--zero_stage", "3"), "--zero_stage 3 cannot train an LLLite"),
    _train("full_bf16 without bf16", ("--full_bf16",), "--full_bf16 needs --mixed_precision bf16"),
    _train("caption dropout 1.5", ("--caption_dropout_rate", "1.5"), "1.5"),
    # combinations
    # (switched-off options that sd-scripts ignores are warnings: test_training_switched_off below)
    _train("adaptive_noise_scale without noise_offset", ("--adaptive_noise_scale", "0.1"), "it needs --noise_offset"),
    _train("v-pred loss scaling without v-prediction", ("--scale_v_pred_loss_like_noise_pred",),
           "--scale_v_pred_loss_like_noise_pred applies to v-prediction only"),
    _train("tensorboard without logging_dir", ("--log_with", "tensorboard"), "--log_with tensorboard needs --logging_dir"),
    _train("epoch ratio and interval", ("--save_n_epoch_ratio", "2", "--save_every_n_epochs", "1"),
           "both set the epoch interval"),
    _train("deepspeed not installed", ("--deepspeed",), "pip install deepspeed"),
    _train("network_module lora", ("--network_module", "networks.lora"), "trains ControlNet-LLLite only"),
    # refused options
    _train("v2", ("--v2",), "--v2 : SDXL has no v2"),
    _train("reg_data_dir", ("--reg_data_dir", "{tmp}"), "--reg_data_dir {tmp}: regularization images"),
    _train("prior_loss_weight", ("--prior_loss_weight", "0.5"), "--prior_loss_weight 0.5"),
    _train("fused_backward_pass", ("--fused_backward_pass",), "--fused_backward_pass"),
    # files and folders that must exist
    _train("model missing", ("--pretrained_model_name_or_path", "{tmp}/model.safetensors"), "{tmp}/model.safetensors: not found"),
    _train("vae missing", ("--vae", "{tmp}/vae.safetensors"), "--vae {tmp}/vae.safetensors: no such file"),
    _train("network_weights missing", ("--network_weights", "{tmp}/net.safetensors"), "--network_weights {tmp}/net.safetensors"),
    _train("resume missing", ("--resume", "{tmp}/state"), "--resume {tmp}/state: no such state folder"),
    _train("resume incomplete", ("--resume", "{half_state}"), "train_state.json is missing"),
    _train("sample prompts missing", ("--sample_prompts", "{tmp}/p.txt"), "{tmp}/p.txt"),
    _train("fidelity guide unreadable", ("--fidelity_guides", "{broken_guides}", "--sample_every_n_steps", "1"),
           "broken.png"),
    _train("thumbnail missing", ("--metadata_thumbnail", "{tmp}/t.png"), "--metadata_thumbnail {tmp}/t.png: no such file"),
    _train("log file is a folder", ("--console_log_file", "{a_file}/x/log.txt"), "--console_log_file {a_file}/x"),
    _train("tracker config missing", ("--logging_dir", "{tmp}/logs", "--log_tracker_config", "{tmp}/t.toml"),
           "--log_tracker_config {tmp}/t.toml"),
    # config files
    _train("config file missing", ("--config_file", "{tmp}/train.toml"), "config file not found: {tmp}/train.toml"),
    _train("config typo", ("--config_file", "{typo}"), 'unknown option "learning_rte". Did you mean "learning_rate"?'),
    _train("config wrong type", ("--config_file", "{wrong_type}"), "network_dim must be an integer, got '64'"),
    _train("config refused option", ("--config_file", "{v2}"), "--v2 : SDXL has no v2"),
    # dataset TOMLs and folders
    _train("dataset config missing", ("--dataset_config", "{tmp}/d.toml"), "dataset config {tmp}/d.toml does not exist"),
    _train("dataset unknown key", ("--dataset_config", "{unknown_key}"), 'batch_sise'),
    _train("dataset bad syntax", ("--dataset_config", "{bad_syntax}"), "is not valid TOML"),
    _train("dataset negative repeats", ("--dataset_config", "{neg_repeats}"), "num_repeats"),
    _train("dataset with and without a TOML", ("--train_data_dir", "{images}"), "cannot be combined with --dataset_config"),
    _train("image folder missing", ("--train_data_dir", "{tmp}/img", "--conditioning_data_dir", "{cond}"), "{tmp}/img",
           base=_without("--dataset_config")),
    _train("image folder without images", ("--train_data_dir", "{no_images}", "--conditioning_data_dir", "{cond}"),
           "contains no images", base=_without("--dataset_config")),
    _train("unpaired image", ("--dataset_config", "{unpaired}"), "have no conditioning image with the same basename"),
    _train("corrupt image", ("--dataset_config", "{corrupt}"), "001.png"),
    # weight files of the wrong kind or damaged: named when they are opened
    _train("LLLite file as checkpoint", ("--pretrained_model_name_or_path", "{lllite1}"), "{lllite1}", before_load=False),
    _train("damaged checkpoint", ("--pretrained_model_name_or_path", "{damaged}"), "{damaged}", before_load=False),
    _train("LoRA as network_weights", ("--network_weights", "{lora}"), "{lora}", before_load=False),
    _train("damaged network_weights", ("--network_weights", "{damaged}"), "{damaged}", before_load=False),
]


@pytest.mark.parametrize("case", TRAINING_CASES, ids=[c.name for c in TRAINING_CASES])
def test_training_bad_input(case, train_files, tmp_path, capsys, monkeypatch):
    import sdxl_train_control_net_lllite

    if case.before_load:  # the trainer calls the loader through library.training.models
        monkeypatch.setattr("library.training.models.load_sdxl", lambda *a, **k: pytest.fail("the model was loaded"))
    check_refusal(case, sdxl_train_control_net_lllite.main, train_files, tmp_path, capsys, monkeypatch)


# Options whose switch is off: sd-scripts runs and ignores them, so the run goes on with exactly one warning.
SWITCHED_OFF = [
    (("--save_last_n_epochs", "2"), "--save_last_n_epochs 2 does nothing without --save_every_n_epochs or "
     "--save_n_epoch_ratio (it prunes the files they save): ignored, as sd-scripts does"),
    (("--save_last_n_steps", "1"), "--save_last_n_steps 1 does nothing without --save_every_n_steps (it prunes the "
     "files they save): ignored, as sd-scripts does"),
    (("--save_every_n_steps", "5", "--save_last_n_steps_state", "2"), "--save_last_n_steps_state 2 does nothing "
     "without --save_state (it prunes the states --save_state writes): ignored, as sd-scripts does"),
    (("--sample_every_n_steps", "5"), "--sample_every_n_steps/--sample_every_n_epochs/--sample_at_first does nothing "
     "without --sample_prompts or --fidelity_guides (there is nothing to draw or measure): ignored, as sd-scripts does"),
    (("--dynamo_backend", "eager"), "--dynamo_backend eager does nothing without --torch_compile: ignored, as "
     "sd-scripts does"),
    (("--zero_stage", "3"), "--zero_stage does nothing without --deepspeed (it is a DeepSpeed option): ignored, as "
     "sd-scripts does"),
    (("--wandb_run_name", "x"), "--wandb_run_name x does nothing without --log_with wandb (or all) (it applies to "
     "Weights & Biases): ignored, as sd-scripts does"),
    (("--log_config",), "--log_config does nothing without --logging_dir (TensorBoard) or --log_with wandb: ignored, "
     "as sd-scripts does"),
    (("--huggingface_path_in_repo", "x"), "--huggingface_path_in_repo x does nothing without --huggingface_repo_id "
     "(it applies to uploads): ignored, as sd-scripts does"),
]


@pytest.mark.parametrize("extra,warning", SWITCHED_OFF, ids=[" ".join(e) for e, _ in SWITCHED_OFF])
def test_training_switched_off(extra, warning, train_files, tmp_path, caplog):
    from library.training.options import parse_training_options

    argv = [a.format(**train_files, tmp=tmp_path) for a in T + extra]
    with caplog.at_level("WARNING"):
        parse_training_options(argv)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [warning]


def test_sample_prompt_without_a_guide_is_skipped_with_a_warning(train_files, tmp_path, caplog):
    """sd-scripts' LLLite trainer draws no samples, so its users' prompt files have no --cn: the run goes on."""
    from library.training.options import parse_training_options

    argv = [a.format(**train_files, tmp=tmp_path) for a in T + ("--sample_prompts", "{no_cn}", "--sample_at_first")]
    with caplog.at_level("WARNING"):
        opts = parse_training_options(argv)
    assert opts.samples.prompts == ()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{train_files['no_cn']}: prompt 1 ('a red square') has no --cn guide image: it is skipped (an LLLite sample "
        "needs one, e.g. `a cat --cn guides/cat_canny.png`)"]


def test_tables_cover_both_scripts():
    assert len(TRAINING_CASES) >= 50 and len({c.name for c in TRAINING_CASES}) == len(TRAINING_CASES)
    assert len(GENERATION_CASES) + len(TRAINING_CASES) >= 60
