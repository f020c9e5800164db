"""Parity with sd-scripts' sdxl_gen_img.py: every option and prompt-line option is accepted and does something.

The two lists in tests/data are sd-scripts' option names (78) and prompt-line options (27). For each
one, the test sets a value other than the default and checks that the resolved, typed options (or
the request a prompt line makes) differ from those without it, or that it is refused with a reason
that names it. What the resolved objects then do is tested in tests/test_gen_features.py.
No model is loaded here: resolving needs only files that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from library.errors import UserError
from library.generation.options import REFUSED, build_parser, resolve
from library.generation.pipeline import GenerationRequest, request_from_prompt_spec
from library.generation.prompt_lines import OPTIONS, parse_prompt_line

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]
REFERENCE_OPTIONS = DATA / "sd_scripts_sdxl_gen_img_options.txt"
REFERENCE_LINE_OPTIONS = DATA / "sd_scripts_sdxl_gen_img_prompt_line_options.txt"


def names(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Files that exist (resolving checks existence only; what is inside matters when models load)."""
    d = tmp_path_factory.mktemp("parity")
    out = {}
    for name in ("ckpt", "ckpt2", "lllite", "lora", "lora2", "emb", "vae", "guide", "guide2", "init", "mask"):
        suffix = ".png" if name in ("guide", "guide2", "init", "mask") else ".safetensors"
        (d / f"{name}{suffix}").write_bytes(b"x")
        out[name] = str(d / f"{name}{suffix}")
    (d / "prompts.txt").write_text("a cat\n")
    out["prompts"] = str(d / "prompts.txt")
    out["dir"] = str(d)
    return out


def resolved(paths: dict[str, str], *extra: str):
    argv = ["--ckpt", paths["ckpt"], "--prompt", "x", "--outdir", paths["dir"] + "/out", *extra]
    return resolve(build_parser().parse_args(argv))


def option_cases(p: dict[str, str]) -> dict[str, tuple[list[str], list[str]]]:
    """option -> (its arguments with a non-default value, the options it needs, given with and without it)."""
    lllite = ["--control_net_lllite_models", p["lllite"], "--guide_image_path", p["guide"]]
    lora, hires = ["--network_module", "networks.lora", "--network_weights", p["lora"]], ["--highres_fix_scale", "0.5"]
    ds, gl = ["--ds_depth_1", "3"], ["--gradual_latent_timesteps", "650"]
    cases = {
        "--H": (["--H", "512"], []), "--W": (["--W", "512"], []), "--batch_size": (["--batch_size", "2"], []),
        "--bf16": (["--bf16"], []), "--fp16": (["--fp16"], []), "--ckpt": (["--ckpt", p["ckpt2"]], []),
        "--clip_skip": (["--clip_skip", "1"], []), "--console_log_file": (["--console_log_file", p["dir"] + "/l.txt"], []),
        "--console_log_level": (["--console_log_level", "DEBUG"], []), "--console_log_simple": (["--console_log_simple"], []),
        "--control_net_lllite_models": (lllite, []), "--control_net_multipliers": (["--control_net_multipliers", "0.5"], lllite),
        "--control_net_ratios": (["--control_net_ratios", "0.5"], lllite), "--crop_left": (["--crop_left", "8"], []),
        "--crop_top": (["--crop_top", "8"], []), "--diffusers_xformers": (["--diffusers_xformers"], []),
        "--ds_depth_1": (ds, []), "--ds_depth_2": (["--ds_depth_2", "4"], ds), "--ds_ratio": (["--ds_ratio", "0.6"], ds),
        "--ds_timesteps_1": (["--ds_timesteps_1", "500"], ds), "--ds_timesteps_2": (["--ds_timesteps_2", "300"], ds),
        "--from_file": (["--from_file", p["prompts"]], []), "--gradual_latent_timesteps": (gl, []),
        "--gradual_latent_every_n_steps": (["--gradual_latent_every_n_steps", "2"], gl),
        "--gradual_latent_ratio": (["--gradual_latent_ratio", "0.25"], gl),
        "--gradual_latent_ratio_step": (["--gradual_latent_ratio_step", "0.25"], gl),
        "--gradual_latent_s_noise": (["--gradual_latent_s_noise", "0.9"], gl),
        "--gradual_latent_unsharp_params": (["--gradual_latent_unsharp_params", "3,0.5,0.5,1"], gl),
        "--guide_image_path": (["--guide_image_path", p["guide2"]], lllite),
        "--highres_fix_disable_control_net": (["--highres_fix_disable_control_net"], hires + lllite),
        "--highres_fix_latents_upscaling": (["--highres_fix_latents_upscaling"], hires),
        "--highres_fix_save_1st": (["--highres_fix_save_1st"], hires), "--highres_fix_scale": (hires, []),
        "--highres_fix_steps": (["--highres_fix_steps", "10"], hires),
        "--highres_fix_strength": (["--highres_fix_strength", "0.5"], hires + ["--image_path", p["init"]]),
        "--highres_fix_upscaler": (["--highres_fix_upscaler", "lanczos"], hires),
        "--highres_fix_upscaler_args": (["--highres_fix_upscaler_args", "sharpen=0.5"], hires),
        "--image_path": (["--image_path", p["init"]], []), "--images_per_prompt": (["--images_per_prompt", "2"], []),
        "--interactive": (["--interactive"], []), "--iter_same_seed": (["--iter_same_seed"], []),
        "--mask_path": (["--mask_path", p["mask"]], ["--image_path", p["init"]]),
        "--max_embeddings_multiples": (["--max_embeddings_multiples", "2"], []), "--n_iter": (["--n_iter", "2"], []),
        "--negative_scale": (["--negative_scale", "3"], []), "--network_merge": (["--network_merge"], lora),
        "--network_merge_n_models": (["--network_merge_n_models", "1"], lora),
        "--network_module": (["--network_module", "networks.lycoris"], lora),
        "--network_mul": (["--network_mul", "0.5"], lora), "--network_pre_calc": (["--network_pre_calc"], lora),
        "--network_show_meta": (["--network_show_meta"], lora), "--network_weights": (lora, []),
        "--no_half_vae": (["--no_half_vae"], []), "--no_preview": (["--no_preview"], ["--interactive"]),
        "--opt_channels_last": (["--opt_channels_last"], []), "--outdir": (["--outdir", p["dir"] + "/other"], []),
        "--prompt": (["--prompt", "y"], []), "--sampler": (["--sampler", "euler_a"], []), "--scale": (["--scale", "5"], []),
        "--sdpa": (["--sdpa"], []), "--seed": (["--seed", "5"], []), "--sequential_file_name": (["--sequential_file_name"], []),
        "--steps": (["--steps", "5"], []), "--strength": (["--strength", "0.5"], ["--image_path", p["init"]]),
        "--textual_inversion_embeddings": (["--textual_inversion_embeddings", p["emb"]], []),
        "--tokenizer_cache_dir": (["--tokenizer_cache_dir", p["dir"] + "/tok"], []),
        "--use_original_file_name": (["--use_original_file_name"], []), "--vae": (["--vae", p["vae"]], []),
        "--vae_batch_size": (["--vae_batch_size", "0.5"], []), "--vae_slices": (["--vae_slices", "4"], []),
        "--xformers": (["--xformers"], []),
        "--network_args": (["--network_args", "down_lr_weight=0.5"], lora),
        "--network_regional_mask_max_color_codes": (["--network_regional_mask_max_color_codes", "3"], lora),
        "--clip_vision_strength": (["--clip_vision_strength", "0.5"], ["--image_path", p["init"]]),
    }
    for name in ("original_width", "original_height", "original_width_negative", "original_height_negative"):
        cases[f"--{name}"] = ([f"--{name}", "2048"], [])
    return cases


# Options refused here, with the words their reason must contain; and the one option that selects the default.
REFUSALS = {f"--{name}": reason.split(";")[0][:40] for name, reason in REFUSED.items()}
REFUSALS["--network_module"] = "only networks.lora"
SAME_AS_DEFAULT = {"--sdpa": "PyTorch SDPA attention is also what runs without an attention option"}


def test_the_lists_are_the_reference_ones():
    assert len(names(REFERENCE_OPTIONS)) == 78 and len(names(REFERENCE_LINE_OPTIONS)) == 27


def test_every_reference_option_parses(paths):
    ours = {s for a in build_parser()._actions for s in a.option_strings}
    assert [o for o in names(REFERENCE_OPTIONS) if o not in ours] == []
    assert set(option_cases(paths)) == set(names(REFERENCE_OPTIONS))


@pytest.mark.parametrize("option", names(REFERENCE_OPTIONS))
def test_every_option_changes_the_resolved_options_or_is_refused(paths, option):
    args, needs = option_cases(paths)[option]
    base = resolved(paths, *needs)
    if option in REFUSALS:
        with pytest.raises(UserError) as e:
            resolved(paths, *needs, *args)
        assert str(e.value).startswith(option) and REFUSALS[option] in str(e.value)
        return
    changed = resolved(paths, *needs, *args)
    if option in SAME_AS_DEFAULT:
        assert changed == base and changed.model.attention == "sdpa"
        return
    assert changed != base, f"{option} {args} resolved to the same options as without it"


HIRES = ["--highres_fix_scale", "0.5"]
LORA = ["--network_module", "networks.lora", "--network_weights", "{lora}"]
LLLITE = ["--control_net_lllite_models", "{lllite}", "--guide_image_path", "{guide}"]
LORA_MERGED = ["--network_module", "networks.lora", "--network_weights", "{lora}", "--network_merge"]
SWITCHED_OFF = (  # (the switches that are on, the ignored option, its one warning): sd-scripts ignores each of them
    ([], ["--highres_fix_steps", "10"], "--highres_fix_steps 10 does nothing without --highres_fix_scale (it configures "
                                        "the highres fix): ignored, as sd-scripts does"),
    ([], ["--network_pre_calc"], "--network_pre_calc does nothing without --network_weights (it sets how LoRA files are "
                                 "applied): ignored, as sd-scripts does"),
    ([], ["--no_preview"], "--no_preview does nothing without --interactive (images are shown only in interactive "
                           "mode): ignored, as sd-scripts does"),
    ([], ["--control_net_multipliers", "0.5"], "--control_net_multipliers 0.5 does nothing without "
                                               "--control_net_lllite_models (it is for LLLite models): ignored"),
    ([], ["--strength", "0.5"], "--strength 0.5 does nothing without --image_path or --highres_fix_scale (it is the "
                                "img2img strength): ignored, as sd-scripts does"),
    ([], ["--guide_image_path", "{guide}"], "--guide_image_path {guide} does nothing without --control_net_lllite_models"),
    (HIRES, ["--highres_fix_strength", "0.5"], "--highres_fix_strength 0.5 does nothing without --image_path (it is the "
                                               "first highres pass's img2img strength; the second pass's is --strength)"),
    (LORA + ["--network_mul", "1"], ["--network_mul", "1", "0.5"], "--network_mul 0.5 does nothing without a --network_weights file for each "
                                         "value (1 file given): ignored, as sd-scripts does"),
    (LLLITE + ["--control_net_multipliers", "1"], ["--control_net_multipliers", "1", "0.5"], "--control_net_multipliers 0.5 does nothing without a "
                                                        "--control_net_lllite_models file for each value (1 file given)"),
    (LORA_MERGED, ["--network_pre_calc"], "--network_pre_calc does nothing without a LoRA that is not merged for good "
                                          "(--network_merge / --network_merge_n_models merge every file): ignored"),
)


@pytest.mark.parametrize("on, argv, warning", SWITCHED_OFF, ids=[" ".join(a) for _, a, _ in SWITCHED_OFF])
def test_options_whose_switch_is_off_warn_once_and_change_nothing(paths, caplog, on, argv, warning):
    on, argv = [a.format(**paths) for a in on], [a.format(**paths) for a in argv]
    with caplog.at_level("WARNING"):
        got = resolved(paths, *on, *argv)
    warnings = [r.getMessage() for r in caplog.records if "does nothing without" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(warning.format(**paths)), warnings
    assert got == resolved(paths, *on)  # the run is the one without the ignored option


def line_cases() -> dict[str, str]:
    """prompt-line option -> a value other than the default."""
    cases = {"n": "ugly", "c": "a photo", "w": "512", "h": "512", "ow": "2048", "oh": "2048", "nw": "512", "nh": "512",
             "ct": "8", "cl": "8", "s": "5", "d": "3", "l": "5", "nl": "3", "t": "0.5", "am": "0.5", "dsd1": "2",
             "dst1": "500", "dsd2": "4", "dst2": "300", "dsr": "0.6", "glt": "500", "glr": "0.25", "gle": "2",
             "gls": "0.25", "glsn": "0.9", "glus": "3,0.5,0.5,1"}
    cases.update(ss="ddim", cn="g.png")  # this project's own
    return cases


def test_every_reference_prompt_line_option_is_known():
    reference = [n.removeprefix("--") for n in names(REFERENCE_LINE_OPTIONS)]
    assert [n for n in reference if n not in OPTIONS] == []
    assert set(line_cases()) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(line_cases()))
def test_every_prompt_line_option_changes_the_request(name):
    defaults = GenerationRequest(width=1024, height=1024, steps=30, sampler="euler_a")
    plain = request_from_prompt_spec(parse_prompt_line("x"), defaults)
    request = request_from_prompt_spec(parse_prompt_line(f"x --{name} {line_cases()[name]}"), defaults)
    assert request != plain, f"--{name} made the same request as a line without it"


def test_docs_list_every_option_and_prompt_line_option():
    doc = (ROOT / "docs" / "generation.md").read_text()
    options = [a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.option_strings[0] != "-h"]
    assert [o for o in options if f"`{o}`" not in doc] == []
    assert [n for n in OPTIONS if f"`--{n}`" not in doc] == []


def test_docs_quote_the_warnings_as_printed(paths, caplog):
    doc = (ROOT / "docs" / "generation.md").read_text()
    with caplog.at_level("WARNING"):
        resolved(paths, "--no_preview", "--strength", "0.5")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all(f"\n    {w}\n" in doc for w in warnings), warnings
