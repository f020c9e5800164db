"""sdxl_train_control_net_lllite.py end to end, as users run it: a subprocess with a TOML config."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

from library.sdxl.weights_io import read_weights
from networks.control_net_lllite import ControlNetLLLite
from tests.conftest import make_shape_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sdxl_train_control_net_lllite.py"


def write_config(path: Path, **options) -> Path:
    lines = []
    for k, v in options.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v}")
        else:
            lines.append(f'{k} = "{Path(v).as_posix() if isinstance(v, Path) else v}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def base_options(tmp_path: Path, checkpoint: Path, **extra) -> dict:
    opts = dict(
        pretrained_model_name_or_path=checkpoint,
        dataset_config=make_shape_dataset(tmp_path / "data"),
        output_dir=tmp_path / "out",
        output_name="tiny",
        network_dim=8,
        cond_emb_dim=8,
        learning_rate=1e-3,
        max_train_steps=4,
        seed=42,
    )
    opts.update(extra)
    return opts


def run_train(*args: str, launcher: list[str] | None = None, timeout: int = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_toml_run_trains_and_saves_published_layout(tmp_path, tiny_checkpoint, tiny_models):
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint, save_precision="fp16",
                                                                cache_latents=True, cache_text_encoder_outputs=True,
                                                                gradient_checkpointing=True, min_timestep=300,
                                                                clip_skip=2))
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out" / "tiny.safetensors"
    sd, meta = read_weights(out)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    # the modelspec fields as sd-scripts writes them for an SDXL LLLite
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert re.fullmatch(r"sdxl-lllite/([0-9a-f]{40}|unknown)", meta["modelspec.implementation_version"])
    assert (meta["modelspec.timestep_range"], meta["modelspec.encoder_layer"]) == ("300,1000", "2")
    assert (meta["modelspec.title"], meta["modelspec.prediction_type"]) == ("tiny", "epsilon")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
    assert meta["ss_network_dim"] == "8" and meta["ss_cond_emb_dim"] == "8" and meta["ss_steps"] == "4"
    net = ControlNetLLLite.from_file(tiny_models[0], out)
    # trained: the up layers are no longer all zero
    assert any(torch.count_nonzero(m.up[0].weight) for _, m in net.lllite_modules())


def test_include_output_blocks(tmp_path, tiny_checkpoint, tiny_models):
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint, include_output_blocks=True,
                                                                max_train_steps=2, save_state=True))
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    sd, _ = read_weights(tmp_path / "out" / "tiny.safetensors")
    names = {k.split(".")[0] for k in sd}
    out_names = {n for n in names if n.startswith("lllite_unet_output_blocks_")}
    assert out_names and len(out_names) < len(names)  # the usual input/middle modules stay
    net = ControlNetLLLite.from_file(tiny_models[0], tmp_path / "out" / "tiny.safetensors")
    assert net.has_output_blocks and len(list(net.lllite_modules())) == len(names)

    # a file without output-block modules cannot continue with the option
    plain = tmp_path / "plain.safetensors"
    ControlNetLLLite(tiny_models[0], cond_emb_dim=8, network_dim=8).save(plain)
    res = run_train("--config_file", str(cfg), "--network_weights", str(plain), "--output_name", "cont")
    assert res.returncode != 0 and "has no output-block modules" in res.stderr and "Traceback" not in res.stderr

    # resuming a state saved with the option, without it: the network does not fit, said plainly
    plain_cfg = write_config(tmp_path / "plain.toml", **base_options(tmp_path, tiny_checkpoint, output_name="again",
                                                                     max_train_steps=3))
    res = run_train("--config_file", str(plain_cfg), "--resume", str(tmp_path / "out" / "tiny-state"))
    assert res.returncode != 0, res.stderr[-3000:]
    assert "the saved LLLite does not fit this run's network" in res.stderr and "Traceback" not in res.stderr


def test_command_line_beats_config_file(tmp_path, tiny_checkpoint):
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint))
    res = run_train("--config_file", str(cfg), "--max_train_steps", "1", "--output_name", "cli")
    assert res.returncode == 0, res.stderr[-3000:]
    _, meta = read_weights(tmp_path / "out" / "cli.safetensors")
    assert meta["ss_steps"] == "1"


def test_config_typo_gets_suggestion(tmp_path, tiny_checkpoint):
    opts = base_options(tmp_path, tiny_checkpoint)
    opts["learning_rte"] = opts.pop("learning_rate")
    cfg = write_config(tmp_path / "train.toml", **opts)
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 2
    assert 'unknown option "learning_rte". Did you mean "learning_rate"?' in res.stderr
    assert "Traceback" not in res.stderr


def test_output_config_writes_non_defaults(tmp_path):
    cfg = tmp_path / "written.toml"
    res = run_train("--config_file", str(cfg), "--output_config", "--network_dim", "16",
                    "--pretrained_model_name_or_path", "model.safetensors")
    assert res.returncode == 0, res.stderr
    text = cfg.read_text()
    assert "network_dim = 16" in text and 'pretrained_model_name_or_path = "model.safetensors"' in text
    assert "learning_rate" not in text  # defaults are not written


def test_resume_continues_as_if_never_stopped(tmp_path, tiny_checkpoint):
    common = base_options(tmp_path, tiny_checkpoint, cache_latents=True, cache_text_encoder_outputs=True)
    straight = write_config(tmp_path / "straight.toml", **{**common, "output_name": "straight"})
    assert run_train("--config_file", str(straight)).returncode == 0
    first = write_config(tmp_path / "first.toml", **{**common, "output_name": "part", "max_train_steps": 2, "save_state": True})
    res = run_train("--config_file", str(first))
    assert res.returncode == 0, res.stderr[-3000:]
    state = tmp_path / "out" / "part-state"
    assert (state / "train_state.json").is_file()
    second = write_config(tmp_path / "second.toml", **{**common, "output_name": "resumed"})
    res = run_train("--config_file", str(second), "--resume", str(state))
    assert res.returncode == 0, res.stderr[-3000:]
    a, _ = read_weights(tmp_path / "out" / "straight.safetensors")
    b, _ = read_weights(tmp_path / "out" / "resumed.safetensors")
    p, _ = read_weights(tmp_path / "out" / "part.safetensors")
    assert any(not torch.equal(a[k], p[k]) for k in a)  # the second half did train
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_nan_loss_stops_cleanly(tmp_path, tiny_checkpoint):
    # An absurd learning rate blows the weights up after the first update; the next loss is not finite.
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint, learning_rate=1e30,
                                                                optimizer_type="SGDNesterov", max_grad_norm=0,
                                                                save_every_n_steps=1, max_train_steps=6))
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 2
    assert "the loss became" in res.stderr and "at step" in res.stderr and "Traceback" not in res.stderr
    out = tmp_path / "out"
    assert not (out / "tiny.safetensors").exists()
    for f in out.glob("*.safetensors"):
        sd, _ = read_weights(f)
        assert all(torch.isfinite(v).all() for v in sd.values()), f


def test_save_every_and_last_n_epochs(tmp_path, tiny_checkpoint):
    # 4 images, batch 2: 2 steps per epoch; 4 epochs, keep the last 2 epoch files
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint, max_train_epochs=4,
                                                                save_every_n_epochs=1, save_last_n_epochs=2))
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert names == ["tiny-000002.safetensors", "tiny-000003.safetensors", "tiny.safetensors"]


def test_missing_optional_optimizer_package(tmp_path, tiny_checkpoint):
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint, optimizer_type="Lion"))
    res = run_train("--config_file", str(cfg))
    try:
        import lion_pytorch  # noqa: F401
    except ImportError:
        assert res.returncode == 2 and "pip install lion-pytorch" in res.stderr
    else:
        assert res.returncode == 0


def test_two_process_cpu_run(tmp_path, tiny_checkpoint):
    """Data-parallel training on the CPU (gloo): the processes agree and only the main one writes files."""
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tiny_checkpoint, cache_latents_to_disk=True,
                                                                cache_text_encoder_outputs=True, save_state=True))
    with socket.socket() as s:  # a port nobody uses now, so parallel runs cannot collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["torchrun", "--nproc_per_node", "2", "--master_port", str(port)]
    res = run_train("--config_file", str(cfg), launcher=launcher, timeout=400, env={"ACCELERATE_USE_CPU": "true"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr
    # the main process compares the weights of both processes at the end
    assert re.search(r"final LLLite weights fingerprint [0-9a-f]{16}, equal on all 2 processes", res.stderr), res.stderr[-2000:]
    assert res.stderr.count("wrote " + str(tmp_path / "out" / "tiny.safetensors")) == 1
    state = tmp_path / "out" / "tiny-state"
    assert {p.name for p in state.glob("noise_rng_*.pt")} == {"noise_rng_0.pt", "noise_rng_1.pt"}
    # each image's latent cache file was written once, by one of the two processes
    assert len(list((tmp_path / "data" / "images").glob("*_lllite.safetensors"))) == 4


def test_sample_prompts_and_trained_file_in_gen_script(tmp_path, tiny_checkpoint, capsys):
    """Samples during training use the generation code; the trained file then works in sdxl_gen_img.py."""
    import sdxl_gen_img
    from library.errors import run_cli
    from library.generation.png_metadata import read_png_parameters

    guide = tmp_path / "data" / "conditioning" / "000.png"
    prompts = tmp_path / "prompts.txt"
    opts = base_options(tmp_path, tiny_checkpoint, max_train_steps=2, sample_every_n_steps=2, sample_at_first=True,
                        sample_prompts=prompts, sample_sampler="euler", cache_latents=True, cache_text_encoder_outputs=True)
    cfg = write_config(tmp_path / "train.toml", **opts)  # makes the dataset, so the guide exists afterwards
    prompts.write_text(f"a red square --w 64 --h 64 --s 3 --d 7 --cn {guide.as_posix()}\n")
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    samples = sorted((tmp_path / "out" / "sample").glob("*.png"))
    # at first (step 0), at step 2 (every 2 steps); the final sample is the step-2 one again
    assert [p.name.split("_")[1] for p in samples] == ["000000", "000002"]
    meta = read_png_parameters(samples[-1])
    assert meta["prompt"] == "a red square" and int(meta["seed"]) == 7 and int(meta["steps"]) == 3

    outdir = tmp_path / "gen"
    run_cli(lambda: sdxl_gen_img.main([
        "--ckpt", str(tiny_checkpoint), "--control_net_lllite_models", str(tmp_path / "out" / "tiny.safetensors"),
        "--guide_image_path", str(guide), "--prompt", "a red square", "--W", "64", "--H", "64", "--steps", "2",
        "--seed", "1", "--outdir", str(outdir), "--no_progress",
    ]))
    images = list(outdir.glob("*.png"))
    assert len(images) == 1
    assert "tiny.safetensors" in str(read_png_parameters(images[0]))


def test_debug_dataset_writes_panels_without_loading_the_model(tmp_path):
    cfg = write_config(tmp_path / "train.toml", **base_options(tmp_path, tmp_path / "not_needed.safetensors"))
    res = run_train("--config_file", str(cfg), "--debug_dataset")
    assert res.returncode == 0, res.stderr[-3000:]
    panels = sorted((tmp_path / "out" / "debug_dataset").glob("*.png"))
    assert len(panels) == 4


def test_every_option_is_in_the_docs():
    """docs/training.md's option tables are generated from the parser and must be current."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "write_option_docs.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    from library.training.options import build_parser

    doc = (ROOT / "docs" / "training.md").read_text()
    options = [a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.option_strings[0] != "-h"]
    assert len(options) > 80
    assert [o for o in options if f"`{o}`" not in doc] == []
