"""sdxl_gen_img.py end to end on a tiny random SDXL: a few runs as subprocesses, the rest in-process."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.generation.png_metadata import read_png_parameters
from tests.gen_helpers import SMALL, make_gen_files, pngs, run_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_gen_files(tmp_path_factory.mktemp("gen_script"))


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(ROOT / "sdxl_gen_img.py"), *args], capture_output=True, text=True,
                          env=env, timeout=300)


# ----------------------------------------------------------------------------------------------
# Subprocess runs
# ----------------------------------------------------------------------------------------------


def test_two_stacked_models_with_their_own_guides(files, tmp_path):
    out = tmp_path / "out"
    r = run_script(
        "--ckpt", files["ckpt"], "--control_net_lllite_models", files["lllite1"], files["lllite2"],
        "--guide_image_path", *(files[f"guide{i}"] for i in range(4)),
        "--control_net_multipliers", "1.0", "0.5", "--control_net_starts", "0", "0.25",
        "--control_net_ratios", "1", "0.75",
        "--prompt", "a (red:1.2) house --n blurry", "--images_per_prompt", "2", "--batch_size", "2",
        "--seed", "10", "--sequential_file_name", "--outdir", str(out), *SMALL[:1], "68", *SMALL[2:],
    )
    assert r.returncode == 0, r.stderr
    assert "--W 68 is not a multiple of 8: using 64" in r.stderr  # a warning the user can act on stays
    assert "kernels" not in r.stderr and "gemm_4bit" not in r.stderr  # bitsandbytes' CPU-kernel search is silenced
    files_out = pngs(out)
    assert [f.name for f in files_out] == ["im_000001.png", "im_000002.png"]
    first, second = (read_png_parameters(f) for f in files_out)
    assert first["guide_images"] == [files["guide0"], files["guide1"]]
    assert second["guide_images"] == [files["guide2"], files["guide3"]]
    assert (first["seed"], second["seed"]) == (10, 11)
    assert first["lllite_models"] == ["lllite1.safetensors", "lllite2.safetensors"]
    assert first["lllite_multipliers"] == [1.0, 0.5] and first["lllite_starts"] == [0.0, 0.25]
    assert first["lllite_ratios"] == [1.0, 0.75]
    assert (first["prompt"], first["negative_prompt"], first["steps"], first["size"]) == ("a (red:1.2) house", "blurry", 3, "64x64")
    assert "Steps: 3, Sampler: euler, CFG scale: 7.5, Seed: 10, Size: 64x64" in Image.open(files_out[0]).text["parameters"]


def test_lllite_file_as_ckpt_is_a_clear_error(files, tmp_path):
    r = run_script("--ckpt", files["lllite1"], "--prompt", "x", "--outdir", str(tmp_path), *SMALL)
    assert r.returncode == 2
    assert "is a ControlNet-LLLite file, not a base model" in r.stderr.splitlines()[-1]
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# In-process runs
# ----------------------------------------------------------------------------------------------


def test_prompt_file_lines_and_textual_inversion(files, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment\n"
        f"a myemb castle --n fog --w 72 --h 64 --s 2 --d 5,6 --l 4.5 --cn {files['guide1']}\n"
        "a [small] boat --ow 1024 --oh 768 --ct 8 --cl 4 --d 9\n"
    )
    code, err = run_main(
        capsys, "--ckpt", files["ckpt"], "--from_file", str(prompts), "--images_per_prompt", "2",
        "--control_net_lllite_models", files["lllite1"], "--guide_image_path", files["guide0"],
        "--textual_inversion_embeddings", files["emb"], "--outdir", str(tmp_path / "out"), *SMALL,
    )
    assert code == 0, err
    meta = [read_png_parameters(f) for f in pngs(tmp_path / "out")]
    by_seed = {m["seed"]: m for m in meta}
    assert sorted(by_seed) == [5, 6, 9, 10]
    assert by_seed[5]["size"] == "72x64" and by_seed[5]["steps"] == 2 and by_seed[5]["scale"] == 4.5
    assert by_seed[5]["negative_prompt"] == "fog" and by_seed[5]["guide_images"] == [files["guide1"]]
    assert by_seed[9]["guide_images"] == [files["guide0"]] and by_seed[9]["original_size"] == "1024x768"
    assert by_seed[9]["crop"] == "8,4"


def test_interactive_reads_lines_until_empty(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat --d 3\n\nnot read\n"))
    code, err = run_main(capsys, "--ckpt", files["ckpt"], "--interactive", "--outdir", str(tmp_path), *SMALL)
    assert code == 0, err
    assert [read_png_parameters(f)["prompt"] for f in pngs(tmp_path)] == ["a cat"]


def test_img2img_inpainting_hires_and_original_file_name(files, tmp_path, capsys):
    code, err = run_main(
        capsys, "--ckpt", files["ckpt"], "--prompt", "a cat --d 1", "--image_path", files["init"], "--strength", "0.7",
        "--mask_path", files["mask"], "--highres_fix_scale", "0.5", "--highres_fix_steps", "2",
        "--control_net_lllite_models", files["lllite1"], "--guide_image_path", files["guide0"],
        "--highres_fix_disable_control_net", "--use_original_file_name", "--outdir", str(tmp_path), *SMALL,
    )
    assert code == 0, err
    (out,) = pngs(tmp_path)
    assert out.name.startswith("init_im_")
    meta = read_png_parameters(out)
    assert meta["strength"] == 0.7 and meta["mask"] == files["mask"] and meta["highres_fix_scale"] == 0.5


def test_lora_with_multiplier_zero_changes_nothing(files, tmp_path, capsys):
    common = ["--ckpt", files["ckpt"], *SMALL]
    runs = {
        "plain": ["--prompt", "a cat --d 4"],
        "lora0": ["--prompt", "a cat --d 4 --am 0", "--network_module", "networks.lora", "--network_weights", files["lora"]],
        "lora1": ["--prompt", "a cat --d 4", "--network_module", "networks.lora", "--network_weights", files["lora"],
                  "--network_mul", "1.0"],
    }
    images = {}
    for name, args in runs.items():
        code, err = run_main(capsys, *common, *args, "--outdir", str(tmp_path / name))
        assert code == 0, err
        (f,) = pngs(tmp_path / name)
        images[name] = np.asarray(Image.open(f)).astype(int)
    assert np.abs(images["lora0"] - images["plain"]).max() <= 1
    assert np.abs(images["lora1"] - images["plain"]).max() > 1
    assert read_png_parameters(pngs(tmp_path / "lora1")[0])["networks"] == ["lora.safetensors"]


# (switches that are on, the option that does nothing without its switch, the start of its one warning)
SWITCHED_OFF_RUNS = [
    ([], ["--no_preview"], "--no_preview does nothing without --interactive"),
    ([], ["--strength", "0.5"], "--strength 0.5 does nothing without --image_path or --highres_fix_scale"),
    ([], ["--guide_image_path", "{guide0}"], "--guide_image_path {guide0} does nothing without --control_net_lllite_models"),
    ([], ["--ds_timesteps_1", "500"], "--ds_timesteps_1 500 does nothing without --ds_depth_1 (or a prompt line's --dsd1)"),
    ([], ["--gradual_latent_timesteps", "650"],
     "Gradual Latent (--gradual_latent_timesteps / --glt) does nothing without --sampler euler_a"),
    ([], ["--prompt", "a cat --d 4 --am 0.5"], "--prompt: --am 0.5 does nothing without --network_weights"),
    (["--image_path", "{init}"], ["--prompt", "a cat --d 4 --w 128"], "--prompt: --w 128 does nothing without "
                                                                       "--highres_fix_scale"),
    (["--image_path", "{init}"], ["--W", "128"], "--W 128 does nothing without --H (img2img draws at the init image's "
                                                 "size, resized to --W x --H only when both are given)"),
    (["--network_module", "networks.lora", "--network_weights", "{lora}", "--network_merge"], ["--network_pre_calc"],
     "--network_pre_calc does nothing without a LoRA that is not merged for good"),
    ([], ["--network_weights", "{lora}"],
     "--network_weights {lora} does nothing without a --network_module networks.lora for each file"),
    ([], ["--prompt", "a cat --d 4 --cn {guide0}"], "--prompt: --cn {guide0} does nothing without a "
                                                     "--control_net_lllite_models file for each guide image (0 files given)"),
    (["--network_module", "networks.lora", "--network_weights", "{lora}"], ["--prompt", "a cat --d 4 --am 1,0.5"],
     "--prompt: --am 0.5 does nothing without a --network_weights file for each value (1 LoRA file(s) given)"),
    (["--control_net_lllite_models", "{lllite1}", "{lllite2}", "--guide_image_path", "{guide0}", "{guide1}"],
     ["--guide_image_path", "{guide0}", "{guide1}", "{guide2}"], "--guide_image_path {guide2} does nothing without a "
                                                                 "whole group of 2 guide images (one per LLLite model)"),
]


@pytest.fixture(scope="module")
def drawn_without() -> dict[tuple[str, ...], np.ndarray]:
    """The image of each run without the ignored option, drawn once per set of switches."""
    return {}


@pytest.mark.parametrize("on, ignored, warning", SWITCHED_OFF_RUNS, ids=[" ".join(a) for _, a, _ in SWITCHED_OFF_RUNS])
def test_options_whose_switch_is_off_run_with_one_warning(files, tmp_path, capsys, drawn_without, on, ignored, warning):
    """sd-scripts runs these and ignores the option: so does this script, with one warning, drawing the same image."""
    size = SMALL[4:] if "--image_path" in on else SMALL  # img2img draws at the 64x64 init image's size
    common = ["--ckpt", files["ckpt"], "--prompt", "a cat --d 4", *size, "--steps", "1", *(a.format(**files) for a in on)]

    def draw(name: str, *extra: str) -> tuple[np.ndarray, list[str]]:
        code, err = run_main(capsys, *common, *extra, "--outdir", str(tmp_path / name))
        assert code == 0, err
        (f,) = pngs(tmp_path / name)
        return np.asarray(Image.open(f)), [line for line in err.splitlines() if "does nothing without" in line]

    if tuple(on) not in drawn_without:
        drawn_without[tuple(on)] = draw("without")[0]
    image, said = draw("with", *(a.format(**files) for a in ignored))
    assert len(said) == 1 and warning.format(**files) in said[0], said
    assert said[0].endswith(": ignored, as sd-scripts does")
    assert np.array_equal(image, drawn_without[tuple(on)])
