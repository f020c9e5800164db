"""Optimizers and learning-rate schedules by sd-scripts' names (issue #13).

Expected learning rates are written from each schedule's definition (transformers', diffusers',
torch's), at a few steps, for a base learning rate of 1.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from library.cli import check_refused
from library.errors import UserError
from library.training import optimizers as opt
from library.training.options import build_parser


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def resolve(parser, *argv: str) -> opt.OptimizerOptions:
    args = parser.parse_args(list(argv))
    check_refused(parser, args)
    return opt.OptimizerOptions.from_args(args)


def param() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(4, 4))]


def lr_curve(options: opt.OptimizerOptions, max_steps: int, num_processes: int = 1) -> list[float]:
    """The learning rate before each optimizer step 0..max_steps (scheduler stepped once per process, as accelerate does)."""
    optimizer = torch.optim.SGD(param(), lr=1.0)
    scheduler = opt.build_lr_scheduler(options, optimizer, max_steps=max_steps, num_processes=num_processes)
    lrs = []
    for _ in range(max_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(num_processes):
            scheduler.step()
    return lrs


def approx(values: list[float]):
    return pytest.approx(values, abs=1e-6)


# ---------------------------------------------------------------------------------------------- schedules


def test_named_schedules_follow_their_definitions(parser):
    def curve(*argv, steps=10):
        return lr_curve(resolve(parser, "--learning_rate", "1", *argv), steps)

    c = curve("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4")
    assert [c[i] for i in (0, 2, 4, 8)] == approx([0, 0.5, 1, 1])
    c = curve("--lr_scheduler", "linear", "--lr_warmup_steps", "2")
    assert [c[i] for i in (1, 2, 6, 10)] == approx([0.5, 1, 0.5, 0])
    c = curve("--lr_scheduler", "cosine")
    assert [c[i] for i in (0, 5, 10)] == approx([1, 0.5, 0])
    c = curve("--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2")
    assert [c[i] for i in (0, 4, 5, 9)] == approx([1, 0.5 * (1 + math.cos(math.pi * 0.8)), 1, 0.5 * (1 + math.cos(math.pi * 0.8))])
    c = curve("--lr_scheduler", "polynomial", "--lr_scheduler_power", "2")
    assert c[5] == pytest.approx((1 - 1e-7) * 0.5**2 + 1e-7)
    # inverse_sqrt after warm-up: 1/sqrt((step + timescale - warmup) / timescale)
    c = curve("--lr_scheduler", "inverse_sqrt", "--lr_scheduler_timescale", "4", steps=12)
    assert [c[i] for i in (0, 5, 12)] == approx([1, 1 / math.sqrt(9 / 4), 0.5])
    # cosine down to min_lr_ratio; sd-scripts passes num_cycles/2 half-periods
    c = curve("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1")
    assert [c[i] for i in (0, 5, 10)] == approx([1, 0.55, 0.1])
    # warm-up 2, decay 4 of 10 steps: stable from 2 to 6, cosine to the minimum from 6 to 10
    c = curve("--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "4",
              "--lr_scheduler_min_lr_ratio", "0.1")
    assert [c[i] for i in (2, 4, 6, 8, 10)] == approx([1, 1, 1, 0.55, 0.1])
    c = curve("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:2,0.1:4,0.01")
    assert [c[i] for i in (1, 2, 3, 5)] == approx([1, 0.1, 0.1, 0.01])


def test_scheduler_class_with_args(parser):
    options = resolve(parser, "--learning_rate", "1", "--lr_scheduler_type", "torch.optim.lr_scheduler.CosineAnnealingLR",
                      "--lr_scheduler_args", "T_max=10", "eta_min=0.2")
    c = lr_curve(options, 10)
    assert [c[i] for i in (0, 5, 10)] == approx([1, 0.6, 0.2])
    assert resolve(parser, "--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=3").lr_scheduler_type == "StepLR"


def test_warmup_ratio_and_processes(parser):
    # A fraction is of the total steps, as in sd-scripts: 0.25 of 8 steps is 2 (also written "25%").
    for value in ("0.25", "25%"):
        options = resolve(parser, "--learning_rate", "1", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", value)
        assert options.lr_warmup_steps == 0.25
        assert lr_curve(options, 8)[:3] == approx([0, 0.5, 1])
    # With 2 processes accelerate steps the schedule twice per optimizer step: the curve per optimizer step is the same.
    options = resolve(parser, "--learning_rate", "1", "--lr_scheduler", "linear", "--lr_warmup_steps", "2")
    assert lr_curve(options, 10, num_processes=2) == approx(lr_curve(options, 10))
    rules = resolve(parser, "--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:2,0.1:4,0.01")
    assert lr_curve(rules, 6, num_processes=2) == approx(lr_curve(rules, 6))


def test_adafactor_follows_sd_scripts(parser):
    from transformers.optimization import Adafactor, AdafactorSchedule

    # relative_step=True unless optimizer_args turn it off: Adafactor's own step size, the adafactor schedule
    options = resolve(parser, "--optimizer_type", "adafactor", "--learning_rate", "1e-3")
    assert options.name == "Adafactor" and options.args["relative_step"] is True and options.lr_scheduler == "adafactor"
    params = param()
    optimizer = opt.build_optimizer(options.name, params, options.learning_rate, dict(options.args))
    assert isinstance(optimizer, Adafactor) and optimizer.param_groups[0]["lr"] is None
    scheduler = opt.build_lr_scheduler(options, optimizer, max_steps=10)
    assert isinstance(scheduler, AdafactorSchedule) and scheduler.get_last_lr() == [1e-3]  # the initial value
    params[0].grad = torch.ones(4, 4)
    optimizer.step()
    scheduler.step()
    # relative step at step 1: min(1e-2, 1/sqrt(1)) * max(1e-3, RMS(param)=1) (scale_parameter=True)
    assert scheduler.get_last_lr() == pytest.approx([1e-2])
    fixed = resolve(parser, "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
                    "scale_parameter=False", "--lr_scheduler", "cosine")
    optimizer = opt.build_optimizer(fixed.name, param(), 0.5, dict(fixed.args))
    assert optimizer.param_groups[0]["lr"] == 0.5 and fixed.lr_scheduler == "cosine"
    # warmup_init needs relative_step, which sd-scripts turns back on
    assert resolve(parser, "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
                   "warmup_init=True").args["relative_step"] is True


# ---------------------------------------------------------------------------------------------- optimizers


def test_optimizer_names_build_their_classes(parser):
    import bitsandbytes as bnb

    expected = {
        "AdamW": torch.optim.AdamW, "adamw8bit": bnb.optim.AdamW8bit, "PagedAdamW": bnb.optim.PagedAdamW,
        "PagedAdamW8bit": bnb.optim.PagedAdamW8bit, "PagedAdamW32bit": bnb.optim.PagedAdamW32bit,
        "AdEMAMix8bit": bnb.optim.AdEMAMix8bit, "PagedAdEMAMix8bit": bnb.optim.PagedAdEMAMix8bit,
        "Lion8bit": bnb.optim.Lion8bit, "PagedLion8bit": bnb.optim.PagedLion8bit, "SGDNesterov8bit": bnb.optim.SGD8bit,
        "SGDNesterov": torch.optim.SGD, "RAdam": torch.optim.RAdam, "torch.optim.NAdam": torch.optim.NAdam,
        "bitsandbytes.optim.PagedAdamW8bit": bnb.optim.PagedAdamW8bit,
    }
    for name, cls in expected.items():
        options = resolve(parser, "--optimizer_type", name)
        built = opt.build_optimizer(options.name, param(), 1e-3, dict(options.args))
        assert type(built) is cls, name
    sgd = opt.build_optimizer("SGDNesterov", param(), 1e-3, {})
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9
    # the old aliases
    assert resolve(parser, "--use_8bit_adam").name == "AdamW8bit"
    assert resolve(parser, "--use_8bit_adam", "--optimizer_type", "AdamW").name == "AdamW8bit"
    assert resolve(parser, "--optimizer_type", "").name == "AdamW"  # sd-scripts' default value
    if importlib.util.find_spec("lion_pytorch") is not None:
        assert resolve(parser, "--use_lion_optimizer").name == "Lion"


@pytest.mark.parametrize("name, package", [("Lion", "lion-pytorch"), ("DAdaptAdam", "dadaptation"),
                                           ("DAdaptation", "dadaptation"), ("Prodigy", "prodigyopt")])
def test_optional_optimizer_packages(parser, name, package):
    module = opt.NAMED_OPTIMIZERS[name][0].split(".")[0]
    if importlib.util.find_spec(module) is None:
        with pytest.raises(UserError, match=f"pip install {package}"):
            resolve(parser, "--optimizer_type", name)
    else:
        options = resolve(parser, "--optimizer_type", name)
        assert type(opt.build_optimizer(options.name, param(), 1.0, {})).__name__ == opt.NAMED_OPTIMIZERS[name][1]


@pytest.mark.parametrize("argv, words", [
    (["--optimizer_type", "AdamX"], ["--optimizer_type 'AdamX'", "AdamW", "torch.optim.RAdam"]),
    (["--optimizer_type", "torch.optim.Nope"], ["torch.optim.Nope", "has no Nope"]),
    (["--optimizer_type", "nosuchpkg.Opt"], ["pip install nosuchpkg"]),
    (["--optimizer_type", "torch.nn.Linear"], ["torch.nn.Linear", "not a torch.optim.Optimizer"]),
    (["--optimizer_type", "AdamWScheduleFree"], ["AdamWScheduleFree", "eval()"]),
    (["--use_8bit_adam", "--use_lion_optimizer"], ["--use_8bit_adam and --use_lion_optimizer"]),
    (["--use_8bit_adam", "--optimizer_type", "Lion"], ["--use_8bit_adam", "--optimizer_type Lion"]),
    (["--fused_backward_pass", "--optimizer_type", "Adafactor"], ["--fused_backward_pass", "Adafactor", "23M"]),
    (["--lr_scheduler", "cosine_restarts"], ["--lr_scheduler 'cosine_restarts'", 'did you mean "cosine_with_restarts"']),
    (["--lr_scheduler", "reduce_lr_on_plateau"], ["reduce_lr_on_plateau", "metric"]),
    (["--lr_scheduler_type", "ReduceLROnPlateau"], ["ReduceLROnPlateau", "metrics"]),
    (["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_maxx=5"], ["T_maxx", "CosineAnnealingLR"]),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.Nope"], ["has no Nope"]),
    (["--lr_scheduler", "cosine", "--lr_scheduler_args", "foo=1"], ["--lr_scheduler cosine", "foo"]),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "--lr_warmup_steps", "3"],
     ["--lr_warmup_steps 3", "StepLR"]),
    (["--lr_warmup_steps", "5"], ["--lr_warmup_steps 5", "constant has no warm-up"]),
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "1.5"], ["--lr_warmup_steps 1.5", "below 1"]),
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "-2"], ["--lr_warmup_steps -2", "at least 0"]),
    (["--lr_scheduler", "cosine_with_min_lr"], ["cosine_with_min_lr", "--lr_scheduler_min_lr_ratio"]),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "1.5"], ["--lr_scheduler_min_lr_ratio 1.5", "at most 1"]),
    (["--lr_scheduler", "inverse_sqrt", "--lr_scheduler_timescale", "0"], ["--lr_scheduler_timescale 0", "at least 1"]),
    (["--lr_scheduler", "piecewise_constant"], ["piecewise_constant", "step_rules"]),
    (["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:a,0.1"], ["step_rules", "multiplier:step"]),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "0.6", "--lr_decay_steps", "0.5",
      "--max_train_steps", "10"], ["--lr_warmup_steps 0.6", "--lr_decay_steps 0.5", "more than the 10"]),
    (["--lr_scheduler", "adafactor"], ["adafactor", "relative_step=True"]),
    (["--optimizer_type", "Adafactor", "--lr_scheduler", "cosine"], ["--lr_scheduler cosine", "relative_step=False"]),
    (["--optimizer_type", "Adafactor", "--lr_warmup_steps", "10"], ["--lr_warmup_steps 10", "adafactor has no warm-up"]),
    (["--lr_scheduler_num_cycles", "0"], ["--lr_scheduler_num_cycles 0", "at least 1"]),
])
def test_bad_optimizer_and_schedule_values_are_refused(parser, argv, words):
    with pytest.raises(UserError) as e:
        resolve(parser, *argv)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_optimizer_args_are_a_user_error():
    with pytest.raises(UserError, match="--optimizer_args do not fit AdamW"):
        opt.build_optimizer("AdamW", param(), 1e-3, {"momentom": 0.9})


def test_parity_options_train_end_to_end(tmp_path, tiny_checkpoint, tiny_models):
    """The training script with several of these options together, from a TOML file: 2 steps on the tiny model."""
    from library.sdxl.weights_io import read_weights
    from networks.control_net_lllite import ControlNetLLLite
    from tests.test_train_script import base_options, run_train, write_config

    cfg = write_config(tmp_path / "train.toml", **base_options(
        tmp_path, tiny_checkpoint, max_train_steps=2, optimizer_type="Adafactor", lr_scheduler="warmup_stable_decay",
        lr_warmup_steps=0.5, lr_decay_steps=1, lr_scheduler_min_lr_ratio=0.1, noise_offset=0.05,
        noise_offset_random_strength=True, adaptive_noise_scale=0.01, multires_noise_iterations=3,
        ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, v_pred_like_loss=0.1, loss_type="huber",
        huber_schedule="exponential"))
    with cfg.open("a") as f:
        f.write('optimizer_args = ["relative_step=False", "scale_parameter=False"]\n')
    res = run_train("--config_file", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out" / "tiny.safetensors"
    _, meta = read_weights(out)
    assert meta["ss_optimizer"] == "Adafactor" and meta["ss_lr_scheduler"] == "warmup_stable_decay"
    net = ControlNetLLLite.from_file(tiny_models[0], out)
    assert any(torch.count_nonzero(m.up[0].weight) for _, m in net.lllite_modules())  # it trained
