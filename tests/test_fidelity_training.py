"""Control fidelity measured while training (--fidelity_guides): options, and the meter on the tiny model.

The end-to-end run that finds the figures in TensorBoard's event files at the configured steps is
tests/test_tracking.py::test_tensorboard_logs_every_series_under_the_run_folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from library.errors import UserError
from library.training import fidelity as training_fidelity
from library.training.options import build_parser
from library.training.fidelity import FidelityMeter, FidelityOptions
from library.training.samples import SampleOptions, combine_hooks


def guide_folder(root: Path, n: int = 2, blank: int = 0, prompts: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n + blank):
        img = Image.new("RGB", (64, 64), 0)
        if i < n:
            ImageDraw.Draw(img).rectangle([8 + 4 * i, 10, 40, 44], outline=(255, 255, 255))
        img.save(root / f"{i:02d}.png")
        if prompts:
            (root / f"{i:02d}.txt").write_text("a red square")
    return root


def options(*argv: str) -> FidelityOptions:
    return FidelityOptions.from_args(build_parser().parse_args(list(argv)))


def test_options(tmp_path):
    guides = guide_folder(tmp_path / "g", n=2, blank=1)
    o = options("--fidelity_guides", str(guides), "--sample_every_n_steps", "5", "--fidelity_steps", "4",
                "--fidelity_scale", "3", "--fidelity_seed", "9")
    assert [i.guide.name for i in o.items] == ["00.png", "01.png", "02.png"] and o.items[0].prompt == "a red square"
    assert (o.steps, o.scale, o.seed) == (4, 3.0, 9)
    assert options() == FidelityOptions()
    defaults = options("--fidelity_guides", str(guides), "--sample_every_n_epochs", "1")
    assert (defaults.steps, defaults.scale, defaults.seed) == (20, 7.0, 0)


@pytest.mark.parametrize("argv, message", [
    (["--fidelity_steps", "4"], "--fidelity_steps 4 sets how --fidelity_guides are drawn"),
    (["--fidelity_seed", "1"], "--fidelity_seed 1 sets how --fidelity_guides are drawn"),
    (["--fidelity_guides", "@g"], "is measured at the sample cadence: add --sample_every_n_steps"),
    (["--fidelity_guides", "@g", "--sample_at_first"], "is measured at the sample cadence"),
    (["--fidelity_guides", "@g", "--sample_every_n_steps", "2", "--fidelity_steps", "0"], "--fidelity_steps 0 is out of range"),
    (["--fidelity_guides", "@g", "--sample_every_n_steps", "2", "--fidelity_scale", "0.5"], "--fidelity_scale 0.5 is out of range"),
    (["--fidelity_guides", "@missing", "--sample_every_n_steps", "2"], "--fidelity_guides .*missing: guide folder not found"),
    (["--fidelity_guides", "@noprompt", "--sample_every_n_steps", "2"], r"have no prompt file .*; write one beside each guide$"),
    (["--fidelity_guides", "@blank", "--sample_every_n_steps", "2"], "none of the 2 guide images has any edge"),
])
def test_option_mistakes(tmp_path, argv, message):
    folders = {"@g": guide_folder(tmp_path / "g"), "@missing": tmp_path / "missing",
               "@noprompt": guide_folder(tmp_path / "noprompt", prompts=False),
               "@blank": guide_folder(tmp_path / "blank", n=0, blank=2)}
    with pytest.raises(UserError, match=message):
        options(*[str(folders.get(a, a)) for a in argv])


def test_sample_cadence_serves_fidelity_without_sample_prompts(tmp_path):
    guides = guide_folder(tmp_path / "g")
    o = SampleOptions.from_args(build_parser().parse_args(["--fidelity_guides", str(guides), "--sample_every_n_epochs", "2"]))
    assert o.prompts == () and o.at_end
    assert [e for e in range(1, 7) if o.due_after_epoch(e)] == [2, 4, 6] and not o.due_after_step(2)
    # a cadence with nothing to draw does nothing, as in sd-scripts: one warning, no hooks
    assert not SampleOptions.from_args(build_parser().parse_args(["--sample_every_n_steps", "2"])).at_end
    calls = []
    hook = combine_hooks(None, lambda n, s, e: calls.append(("a", s)), lambda n, s, e: calls.append(("b", s)))
    hook(None, 3, 1)
    assert calls == [("a", 3), ("b", 3)] and combine_hooks(None, None) is None


class FakeAccelerator:
    device = torch.device("cpu")
    is_main_process = True
    process_index, num_processes = 0, 1

    def __init__(self):
        self.trackers = [SimpleNamespace(name="recorder")]
        self.logged: list[tuple[int, dict]] = []

    def autocast(self):
        return contextlib.nullcontext()

    def wait_for_everyone(self):
        pass

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))


def test_meter_measures_the_baseline_once_and_logs_both(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    from library.sdxl.loading import load_sdxl
    from networks.control_net_lllite import ControlNetLLLite

    guides = guide_folder(tmp_path / "g", n=2, blank=1)
    opts = options("--fidelity_guides", str(guides), "--sample_every_n_steps", "1", "--fidelity_steps", "2")
    models = load_sdxl(str(tiny_checkpoint))
    network = ControlNetLLLite(models.unet, cond_emb_dim=8, network_dim=8)
    network.attach()
    network.train()
    asked = []
    real = training_fidelity.evaluate_control

    def counting(models_, network_, items, settings, multipliers, **kw):
        asked.append((tuple(multipliers), [i.guide.name for i in items], settings.width, settings.steps))
        return real(models_, network_, items, settings, multipliers, **kw)

    monkeypatch.setattr(training_fidelity, "evaluate_control", counting)
    acc = FakeAccelerator()
    meter = FidelityMeter(opts, models, acc, (64, 64), "euler")
    assert "skipping 1 guide(s) without edges at 64x64: 02.png" in caplog.text
    meter(network, 0, 1)
    with torch.no_grad():  # the LLLite learns something: its up layers are no longer zero
        for _, m in network.lllite_modules():
            m.up[0].weight.normal_(0, 0.5)
    rng = torch.get_rng_state()
    meter(network, 5, 2)
    assert torch.equal(torch.get_rng_state(), rng)  # measuring does not touch the training run's random stream
    assert network.training  # and the network trains on afterwards
    assert asked == [((0.0,), ["00.png", "01.png"], 64, 2), ((1.0,), ["00.png", "01.png"], 64, 2),
                     ((1.0,), ["00.png", "01.png"], 64, 2)]  # without the LLLite once, with it at every measurement
    (s0, first), (s1, second) = acc.logged
    assert (s0, s1) == (0, 5)
    assert first["fidelity/edge_f1"] == pytest.approx(first["fidelity/edge_f1_base"])  # zero up layers change nothing
    assert second["fidelity/edge_f1_base"] == first["fidelity/edge_f1_base"]
    assert second["fidelity/edge_ssim"] != pytest.approx(second["fidelity/edge_ssim_base"])  # the LLLite now acts
    assert set(second) >= {"fidelity/edge_f1", "fidelity/edge_ssim", "fidelity/edge_f1_base", "fidelity/edge_ssim_base"}
    assert [h["step"] for h in meter.history] == [0, 5]


def test_sample_prompt_with_gradual_latent_and_the_default_sampler_is_drawn_without_it(tmp_path, caplog):
    """sd-scripts' sampler default is ddim, which has no ancestral step: --glt is ignored with a warning, as in
    sdxl_gen_img.py, and a line's other mistakes are found before training, not at the first sample."""
    from library.training.samples import SampleDrawer

    Image.new("RGB", (64, 64)).save(tmp_path / "g.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a red square --cn {tmp_path / 'g.png'} --glt 500\n")
    opts = SampleOptions.from_args(build_parser().parse_args(["--sample_prompts", str(prompts), "--sample_at_first"]))
    with caplog.at_level("WARNING"):
        drawer = SampleDrawer(opts, None, FakeAccelerator(), tmp_path / "s", None, (64, 64), 0)
    assert opts.sampler == "ddim" and not drawer.requests[0].gradual_latent.enabled
    assert [r.getMessage() for r in caplog.records] == [
        "sample prompt 1: Gradual Latent (--glt) does nothing without --sampler euler_a (--sampler ddim has no "
        "ancestral step to grow the latents in): ignored, as sd-scripts does"]
    prompts.write_text(f"a red square --cn {tmp_path / 'g.png'} --w 8 --h 8\n")
    opts = SampleOptions.from_args(build_parser().parse_args(["--sample_prompts", str(prompts), "--sample_at_first"]))
    with pytest.raises(UserError, match="sample prompt 1: "):
        SampleDrawer(opts, None, FakeAccelerator(), tmp_path / "s", None, (64, 64), 0)
