"""Optimizers and learning-rate schedules by the names users put in their configs (sd-scripts' names).

The optimizers and schedules themselves are torch's, bitsandbytes', transformers' and diffusers';
this module maps sd-scripts' option values onto them, checks the options before any model loads,
and refuses what cannot apply to this training loop with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from library.cli import Limit, Options, check_choice, flag, option, parse_key_values, refused
from library.errors import UserError

logger = logging.getLogger(__name__)

_BNB = "bitsandbytes.optim"
# sd-scripts' --optimizer_type names (matched case-insensitively): (module, class, pip package or None).
NAMED_OPTIMIZERS: dict[str, tuple[str, str, str | None]] = {
    "AdamW": ("torch.optim", "AdamW", None),
    "AdamW8bit": (_BNB, "AdamW8bit", "bitsandbytes"),
    "PagedAdamW": (_BNB, "PagedAdamW", "bitsandbytes"),
    "PagedAdamW8bit": (_BNB, "PagedAdamW8bit", "bitsandbytes"),
    "PagedAdamW32bit": (_BNB, "PagedAdamW32bit", "bitsandbytes"),
    "AdEMAMix8bit": (_BNB, "AdEMAMix8bit", "bitsandbytes"),
    "PagedAdEMAMix8bit": (_BNB, "PagedAdEMAMix8bit", "bitsandbytes"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Lion8bit": (_BNB, "Lion8bit", "bitsandbytes"),
    "PagedLion8bit": (_BNB, "PagedLion8bit", "bitsandbytes"),
    "SGDNesterov": ("torch.optim", "SGD", None),
    "SGDNesterov8bit": (_BNB, "SGD8bit", "bitsandbytes"),
    "DAdaptation": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdamPreprint": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdaGrad": ("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "DAdaptAdan": ("dadaptation", "DAdaptAdan", "dadaptation"),
    "DAdaptAdanIP": ("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "DAdaptLion": ("dadaptation", "DAdaptLion", "dadaptation"),
    "DAdaptSGD": ("dadaptation", "DAdaptSGD", "dadaptation"),
    "Adafactor": ("transformers.optimization", "Adafactor", None),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
}
OPTIMIZERS = list(NAMED_OPTIMIZERS)

LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
                 "piecewise_constant", "adafactor"]
_NO_WARMUP = ("constant", "piecewise_constant", "adafactor")
_MIN_LR = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")
# transformers' schedules that adapt to a metric passed to every step() call.
_METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")

_SCHEDULE_FREE_REASON = (
    "schedule-free optimizers keep two weight sequences and must be switched to eval() before every save and sample "
    "and back to train() after; this trainer does not switch them, so it would save the wrong weights (sd-scripts' "
    "LLLite script does not switch them either). Use AdamW with --lr_scheduler cosine instead"
)
_FUSED_BACKWARD_REASON = (
    "sd-scripts applies it to Adafactor only: it steps each parameter inside backward so that the gradients of a fully "
    "fine-tuned SDXL U-Net (2.6B parameters, about 10 GB in fp32) never exist at once. Only the LLLite trains here "
    "(about 23M parameters at network_dim 64, cond_emb_dim 32: about 90 MB of fp32 gradients), so it would save "
    "almost nothing, and stepping inside backward would update the weights before this trainer's non-finite-loss "
    "check, before global gradient clipping and before multi-GPU gradient averaging. sd-scripts' LLLite script ignores "
    "it. Drop the option; Adafactor works without it"
)


def steps_or_ratio(text: Any) -> int | float:
    """sd-scripts' form of --lr_warmup_steps/--lr_decay_steps: whole steps (``100``) or a fraction of the total
    steps (``0.05`` or ``5%``)."""
    s = str(text).strip()
    if s.endswith("%"):
        return float(s[:-1]) / 100
    try:
        return int(s)
    except ValueError:
        return float(s)


@dataclass(frozen=True)
class OptimizerOptions(Options):
    group = "optimizer and learning rate"

    name: str = option(
        "AdamW", name="optimizer_type",
        help=f"one of {', '.join(OPTIMIZERS)} (case-insensitive; DAdaptation is DAdaptAdamPreprint; the "
             "bitsandbytes, lion-pytorch, dadaptation and prodigyopt ones need that package), or an "
             "optimizer class: a torch.optim class name (RAdam) or a full path (torch.optim.RAdam, "
             "bitsandbytes.optim.PagedAdEMAMix8bit). Adafactor follows sd-scripts: relative_step=True unless "
             "--optimizer_args sets relative_step=False, and then its own step size replaces learning_rate "
             "and the schedule (--lr_scheduler adafactor). Schedule-free optimizers are refused: "
             "this trainer cannot switch them to eval mode for saving")
    args: dict[str, Any] = option(
        [], name="optimizer_args", nargs="*", held={},
        help='extra optimizer arguments as name=value, values are Python literals, e.g. "weight_decay=0.01" '
             '"betas=0.9,0.999"')
    use_8bit_adam: bool = flag(
        help="old spelling of --optimizer_type AdamW8bit (needs bitsandbytes); cannot be combined with "
             "another --optimizer_type")
    use_lion_optimizer: bool = flag(
        help="old spelling of --optimizer_type Lion (needs lion-pytorch); cannot be combined with another "
             "--optimizer_type")
    learning_rate: float = option(
        2e-6, type=float, limit=Limit(0, low_open=True),
        help="learning rate (> 0); sd-scripts' default, tuned for full fine-tuning: its LLLite README trains with 2e-4")
    max_grad_norm: float = option(1.0, type=float, limit=Limit(0), what="0 turns clipping off",
                                  help="gradient clipping to this norm, >= 0; 0 turns it off")
    fused_backward_pass: None = refused(_FUSED_BACKWARD_REASON, flag=True)
    lr_scheduler: str = option(
        "constant",
        help=f"one of {', '.join(LR_SCHEDULERS)} (transformers' schedules of these names; piecewise_constant "
             "is diffusers', with --lr_scheduler_args step_rules=...; adafactor reports the step size of "
             "Adafactor with relative_step=True). reduce_lr_on_plateau and greedy are refused: they need "
             "a validation metric at each step")
    lr_scheduler_type: str | None = option(
        help="a scheduler class instead of --lr_scheduler: a torch.optim.lr_scheduler class name "
             "(CosineAnnealingLR) or a full path (torch.optim.lr_scheduler.CosineAnnealingLR), built with "
             "--lr_scheduler_args (e.g. T_max=1000). As in sd-scripts, step counts in those arguments count "
             "optimizer steps x processes, and --lr_warmup_steps must be 0")
    lr_scheduler_args: dict[str, Any] = option(
        [], nargs="*", held={},
        help='extra scheduler arguments as name=value, e.g. "T_max=1000" for --lr_scheduler_type, '
             '"step_rules=1:100,0.1:200,0.01" for piecewise_constant (multipliers up to each step, '
             'then the last one), "lr_end=1e-6" for polynomial; they override the values derived from the '
             'options below')
    lr_warmup_steps: int | float = option(
        0, type=steps_or_ratio,
        help="warm-up of the schedule: whole optimizer steps (>= 0), or a fraction of the total steps below "
             "1 (0.05, or 5 with a percent sign), as in sd-scripts. Refused with constant, piecewise_constant, adafactor and "
             "--lr_scheduler_type, which have no warm-up")
    lr_decay_steps: int | float = option(
        0, type=steps_or_ratio,
        help="decay of warmup_stable_decay: whole optimizer steps (>= 0) or a fraction of the total steps "
             "below 1; the stable phase is what is left after warm-up and decay")
    lr_scheduler_num_cycles: int = option(
        1, type=int, limit=Limit(1),
        help="restarts for cosine_with_restarts; for cosine_with_min_lr, cosine_warmup_with_min_lr and "
             "warmup_stable_decay the cosine runs num_cycles half-periods, as in sd-scripts (>= 1)")
    lr_scheduler_power: float = option(1.0, type=float, limit=Limit(0, low_open=True), help="power for polynomial (> 0)")
    lr_scheduler_timescale: int | None = option(
        type=int, limit=Limit(1),
        help="timescale of inverse_sqrt in optimizer steps (>= 1): after warm-up the learning rate is "
             "learning_rate / sqrt((step + timescale - warmup) / timescale); default: the warm-up steps, or "
             "10000 without warm-up (transformers' default)")
    lr_scheduler_min_lr_ratio: float | None = option(
        type=float, limit=Limit(0, 1),
        help="lowest learning rate as a fraction of learning_rate (0..1) for cosine_with_min_lr and "
             "cosine_warmup_with_min_lr (required by them, or min_lr in --lr_scheduler_args) and for "
             "warmup_stable_decay (default 0)")

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        name = _optimizer_name(args)
        extra = parse_key_values("optimizer_args", v["args"])
        _check_installed(name)
        if name == "Adafactor":
            extra = adafactor_kwargs(extra)
        relative_step = name == "Adafactor" and bool(extra["relative_step"])
        if (name.startswith("DAdapt") or name == "Prodigy") and v["learning_rate"] <= 0.1:
            logger.warning("%s adapts the step size and expects learning_rate around 1.0; got %g", name, v["learning_rate"])
        warmup = _check_steps("lr_warmup_steps", v["lr_warmup_steps"])
        decay = _check_steps("lr_decay_steps", v["lr_decay_steps"])
        sched_args = parse_key_values("lr_scheduler_args", v["lr_scheduler_args"])
        scheduler_type = v["lr_scheduler_type"] or None  # sd-scripts' default is ""
        lr_scheduler = v["lr_scheduler"]
        if scheduler_type:
            _check_scheduler_class(scheduler_type, warmup, relative_step, lr_scheduler)
        else:
            lr_scheduler = _check_scheduler_name(lr_scheduler, relative_step, warmup, sched_args,
                                                 v["lr_scheduler_min_lr_ratio"])
            _warn_unused(args, lr_scheduler, decay)
        v = {**v, "name": name, "args": extra, "lr_scheduler": lr_scheduler, "lr_scheduler_type": scheduler_type,
             "lr_scheduler_args": sched_args}
        # Built once on a stand-in optimizer, so that wrong --lr_scheduler_args (or warm-up plus decay beyond the
        # total) stop the run before any model loads. With --max_train_epochs the total is not known yet: only the
        # arguments are checked here, the steps again when training starts.
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=v["learning_rate"])
        build_lr_scheduler(cls(**v), probe, max_steps=args.max_train_steps if args.max_train_epochs is None else 10**9)
        # The same for --optimizer_args: a value the optimizer refuses stops the run now, not after loading.
        build_optimizer(name, [torch.zeros(1, requires_grad=True)], v["learning_rate"], extra)
        return v


OPTIONS = (OptimizerOptions,)


# ---------------------------------------------------------------------------------------------- optimizers


def _optimizer_name(args: argparse.Namespace) -> str:
    given = args.optimizer_type or ""  # sd-scripts' default is "", meaning AdamW
    if args.use_8bit_adam or args.use_lion_optimizer:
        alias = "--use_8bit_adam" if args.use_8bit_adam else "--use_lion_optimizer"
        if args.use_8bit_adam and args.use_lion_optimizer:
            raise UserError("--use_8bit_adam and --use_lion_optimizer choose two optimizers: give one "
                            "(or --optimizer_type AdamW8bit / Lion)")
        if given not in ("", "AdamW"):
            raise UserError(f"{alias} and --optimizer_type {given} choose two optimizers: give only --optimizer_type")
        given = "AdamW8bit" if args.use_8bit_adam else "Lion"
    return canonical_optimizer(given)


def canonical_optimizer(value: str) -> str:
    """The canonical spelling of an --optimizer_type value: a name of OPTIMIZERS or a class path."""
    if not value:
        return "AdamW"
    if value.lower().endswith("schedulefree"):
        raise UserError(f"--optimizer_type {value}: {_SCHEDULE_FREE_REASON}")
    for known in OPTIMIZERS:
        if value.lower() == known.lower():
            return known
    if "." in value:
        return value
    if isinstance(getattr(torch.optim, value, None), type):  # sd-scripts: a bare name is a torch.optim class
        return f"torch.optim.{value}"
    try:
        check_choice("optimizer_type", value, OPTIMIZERS, case_sensitive=False)
    except UserError as e:
        raise UserError(f"{e}. A class path such as torch.optim.RAdam works too") from None
    return value


def _check_installed(name: str) -> None:
    """Refuse a missing package before any model loads (named optimizers only look for the package)."""
    if name in NAMED_OPTIMIZERS:
        module, _, package = NAMED_OPTIMIZERS[name]
        if package and importlib.util.find_spec(module.split(".")[0]) is None:
            raise UserError(f"--optimizer_type {name} needs the package {package}: run `pip install {package}` "
                            "or choose another optimizer (AdamW needs nothing extra)")
    else:
        optimizer_class(name)


def optimizer_class(name: str) -> type:
    """The class an --optimizer_type value names (canonical spelling), imported."""
    module, attr, package = NAMED_OPTIMIZERS.get(name) or (*name.rsplit(".", 1), None)
    package = package or module.split(".")[0]
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs the package {package}: run `pip install {package}` "
                        "or choose another optimizer (AdamW needs nothing extra)") from None
    except AttributeError:
        raise UserError(f"--optimizer_type {name}: {module} has no {attr}; check the spelling, or upgrade the "
                        f"package (`pip install -U {package}`)") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"--optimizer_type {name} is not a torch.optim.Optimizer class")
    return cls


def adafactor_kwargs(extra: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts' Adafactor: relative_step=True unless optimizer_args say otherwise; warmup_init needs it on."""
    kwargs = {"relative_step": True, **extra}
    if kwargs.get("warmup_init") and not kwargs["relative_step"]:
        logger.info("Adafactor: warmup_init=True needs relative_step=True; turning relative_step on, as sd-scripts does")
        kwargs["relative_step"] = True
    return kwargs


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, extra: dict[str, Any]) -> torch.optim.Optimizer:
    """An optimizer for the trainable parameters; ``name`` is an --optimizer_type value (case-insensitive)."""
    name = canonical_optimizer(name)
    cls = optimizer_class(name)
    kwargs = dict(extra)
    if name == "AdamW":
        # The fused kernel is faster on GPUs; it needs all parameters on one CUDA device in float types.
        if all(p.is_cuda for p in params) and "fused" not in kwargs:
            kwargs["fused"] = True
    elif name in ("SGDNesterov", "SGDNesterov8bit"):
        kwargs = {"momentum": 0.9, **kwargs, "nesterov": True}  # Nesterov needs momentum; 0.9 as in sd-scripts
    elif name == "Adafactor":
        kwargs = adafactor_kwargs(kwargs)
        if kwargs["relative_step"]:
            logger.info("Adafactor with relative_step=True: it sets its own step size; learning_rate %g is only "
                        "reported as the initial value", lr)
            lr = None  # transformers refuses a manual lr together with relative_step
    try:
        return cls(params, lr=lr, **kwargs)
    except (TypeError, ValueError) as e:  # unknown arguments, and values the optimizer refuses (betas, eps...)
        raise UserError(f"--optimizer_args do not fit {name}: {e}") from None


# ---------------------------------------------------------------------------------------------- schedules


def _check_steps(name: str, value: int | float) -> int | float:
    if isinstance(value, float):
        Limit(0, 1, high_open=True).check(f"--{name}", value, "a fraction of the total steps; give a whole number "
                                                               "for a number of steps")
    else:
        Limit(0).check(f"--{name}", value)
    return value


def _transformers_schedulers() -> set[str]:
    from transformers.optimization import SchedulerType

    return {s.value for s in SchedulerType}


def _check_scheduler_name(value: str, relative_step: bool, warmup: int | float, sched_args: dict[str, Any],
                          min_lr_ratio: float | None) -> str:
    if value in _METRIC_SCHEDULERS:
        raise UserError(f"--lr_scheduler {value} adapts the learning rate from a metric passed at every step (such as "
                        "a validation loss); this trainer has none to give. Use --lr_scheduler cosine or linear")
    name = check_choice("lr_scheduler", value, LR_SCHEDULERS)
    if relative_step:
        if name not in ("constant", "adafactor"):
            raise UserError(f"--lr_scheduler {name} cannot apply: Adafactor with relative_step=True (sd-scripts' "
                            "default for it) sets its own step size. Use --lr_scheduler adafactor, or "
                            '--optimizer_args "relative_step=False" to use learning_rate with a schedule')
        name = "adafactor"
    elif name == "adafactor":
        raise UserError("--lr_scheduler adafactor only reports the step size of --optimizer_type Adafactor with "
                        "relative_step=True; use another schedule")
    if warmup and name in _NO_WARMUP:
        why = " (Adafactor with relative_step=True warms up by itself)" if relative_step else ""
        raise UserError(f"--lr_warmup_steps {warmup}: --lr_scheduler {name} has no warm-up{why}. Use 0, or a schedule "
                        "with warm-up such as constant_with_warmup or cosine")
    if name in _MIN_LR and min_lr_ratio is None and not {"min_lr", "min_lr_rate"} & set(sched_args):
        raise UserError(f"--lr_scheduler {name} needs the lowest learning rate: give --lr_scheduler_min_lr_ratio "
                        '(e.g. 0.1) or --lr_scheduler_args "min_lr=1e-6"')
    if name in _MIN_LR + ("warmup_stable_decay", "inverse_sqrt") and name not in _transformers_schedulers():
        raise UserError(f"--lr_scheduler {name} needs a newer transformers: run `pip install -U transformers`")
    if name == "piecewise_constant":
        if "step_rules" not in sched_args:
            raise UserError('--lr_scheduler piecewise_constant needs --lr_scheduler_args "step_rules=1:100,0.1:200,0.01"'
                            " (learning-rate multipliers up to each step, then the multiplier for the rest)")
        parse_step_rules(str(sched_args["step_rules"]))
    return name


def parse_step_rules(rules: str) -> tuple[list[tuple[float, int]], float]:
    """diffusers' piecewise_constant rules ``"1:100,0.1:200,0.01"`` as ([(multiplier, until step)], last multiplier)."""
    *pairs, last = rules.split(",")
    try:
        parsed = [(float(m), int(s)) for m, s in (p.split(":") for p in pairs)]
        return parsed, float(last)
    except ValueError:
        raise UserError(f'--lr_scheduler_args step_rules="{rules}" must look like "1:100,0.1:200,0.01": multiplier:step '
                        "pairs (whole steps), then the multiplier for the remaining steps") from None


def _check_scheduler_class(path: str, warmup: int | float, relative_step: bool, lr_scheduler: str) -> None:
    scheduler_class(path)
    if relative_step:
        raise UserError(f"--lr_scheduler_type {path} cannot apply: Adafactor with relative_step=True sets its own step "
                        'size. Add --optimizer_args "relative_step=False" to schedule learning_rate')
    if warmup:
        raise UserError(f"--lr_warmup_steps {warmup} cannot apply to --lr_scheduler_type {path}, as in sd-scripts: "
                        "give the warm-up through its --lr_scheduler_args if it has one, or use 0")
    if lr_scheduler != "constant":
        logger.warning("--lr_scheduler %s is ignored: --lr_scheduler_type %s gives the schedule", lr_scheduler, path)


def scheduler_class(path: str) -> type:
    """A learning-rate scheduler class from a torch.optim.lr_scheduler name or a full class path."""
    module, attr = path.rsplit(".", 1) if "." in path else ("torch.optim.lr_scheduler", path)
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError:
        raise UserError(f"--lr_scheduler_type {path}: cannot import {module}; install its package") from None
    except AttributeError:
        raise UserError(f"--lr_scheduler_type {path}: {module} has no {attr}") from None
    if not isinstance(cls, type):
        raise UserError(f"--lr_scheduler_type {path} is not a class")
    needs = [p.name for p in list(inspect.signature(cls.step).parameters.values())[1:]
             if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if needs:
        raise UserError(f"--lr_scheduler_type {path} needs {', '.join(needs)} at every step (such as a validation "
                        "loss); this trainer has none to give")
    return cls


def _warn_unused(args: argparse.Namespace, name: str, decay: int | float) -> None:
    """Options that the chosen schedule does not read (sd-scripts ignores them silently)."""
    unused = []
    if decay and name != "warmup_stable_decay":
        unused.append("--lr_decay_steps")
    if args.lr_scheduler_timescale is not None and name != "inverse_sqrt":
        unused.append("--lr_scheduler_timescale")
    if args.lr_scheduler_min_lr_ratio is not None and name not in _MIN_LR + ("warmup_stable_decay",):
        unused.append("--lr_scheduler_min_lr_ratio")
    if args.lr_scheduler_num_cycles != 1 and name not in _MIN_LR + ("cosine_with_restarts", "warmup_stable_decay"):
        unused.append("--lr_scheduler_num_cycles")
    if args.lr_scheduler_power != 1.0 and name != "polynomial":
        unused.append("--lr_scheduler_power")
    if unused:
        logger.warning("%s: not used by --lr_scheduler %s", ", ".join(unused), name)


def _scheduler_steps(value: int | float, max_steps: int, num_processes: int) -> int:
    """Scheduler steps for a whole number of optimizer steps or a fraction of them.

    accelerate steps a prepared schedule once per process at each optimizer step, so the counts are
    multiplied by the number of processes (a fraction is of the total, as in sd-scripts).
    """
    if isinstance(value, float):
        return int(value * max_steps * num_processes)
    return value * num_processes


def schedule_steps(opts: OptimizerOptions, max_steps: int, num_processes: int) -> dict[str, int]:
    """Warm-up, decay and total scheduler steps; refuses warm-up plus decay beyond the total."""
    total = max_steps * num_processes
    warmup = _scheduler_steps(opts.lr_warmup_steps, max_steps, num_processes)
    decay = _scheduler_steps(opts.lr_decay_steps, max_steps, num_processes)
    if opts.lr_scheduler_type is None and opts.lr_scheduler == "warmup_stable_decay" and warmup + decay > total:
        raise UserError(f"--lr_warmup_steps {opts.lr_warmup_steps} and --lr_decay_steps {opts.lr_decay_steps} are "
                        f"{(warmup + decay) // num_processes} steps together, more than the {max_steps} training steps")
    return {"warmup": warmup, "decay": decay, "total": total}


def _schedule_kwargs(opts: OptimizerOptions, steps: dict[str, int], num_processes: int) -> dict[str, Any]:
    """Arguments of transformers' schedule function of this name, as sd-scripts passes them."""
    name = opts.lr_scheduler
    if name == "constant":
        return {}
    kwargs: dict[str, Any] = {"num_warmup_steps": steps["warmup"]}
    if name == "constant_with_warmup":
        return kwargs
    if name == "inverse_sqrt":
        timescale = opts.lr_scheduler_timescale
        return {**kwargs, "timescale": None if timescale is None else timescale * num_processes}
    if name == "warmup_stable_decay":
        return {**kwargs, "num_stable_steps": steps["total"] - steps["warmup"] - steps["decay"],
                "num_decay_steps": steps["decay"], "num_cycles": opts.lr_scheduler_num_cycles / 2,
                "min_lr_ratio": opts.lr_scheduler_min_lr_ratio or 0.0}
    kwargs["num_training_steps"] = steps["total"]
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = opts.lr_scheduler_num_cycles
    elif name == "polynomial":
        kwargs["power"] = opts.lr_scheduler_power
    elif name in _MIN_LR:
        kwargs["num_cycles"] = opts.lr_scheduler_num_cycles / 2  # sd-scripts: num_cycles half-periods
        if opts.lr_scheduler_min_lr_ratio is not None:
            kwargs["min_lr_rate"] = opts.lr_scheduler_min_lr_ratio
    return kwargs


def scaled_step_rules(rules: str, num_processes: int) -> str:
    pairs, last = parse_step_rules(rules)
    return ",".join([f"{m}:{s * num_processes}" for m, s in pairs] + [str(last)])


def build_lr_scheduler(opts: OptimizerOptions, optimizer: torch.optim.Optimizer, *, max_steps: int,
                       num_processes: int = 1):
    """The schedule for ``max_steps`` optimizer steps, to be prepared by accelerate with ``num_processes``.

    Step counts the user gives are optimizer steps; accelerate steps the schedule once per process.
    """
    extra = dict(opts.lr_scheduler_args)
    if opts.lr_scheduler_type:
        try:
            return scheduler_class(opts.lr_scheduler_type)(optimizer, **extra)
        except (TypeError, ValueError) as e:
            raise UserError(f"--lr_scheduler_args do not fit --lr_scheduler_type {opts.lr_scheduler_type}: {e}") from None
    name = opts.lr_scheduler
    steps = schedule_steps(opts, max_steps, num_processes)
    try:
        if name == "adafactor":
            from transformers.optimization import AdafactorSchedule

            return AdafactorSchedule(optimizer, opts.learning_rate)
        if name == "piecewise_constant":
            from diffusers.optimization import get_piecewise_constant_schedule

            extra["step_rules"] = scaled_step_rules(str(extra["step_rules"]), num_processes)
            return get_piecewise_constant_schedule(optimizer, **extra)
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        schedule = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        return schedule(optimizer, **{**_schedule_kwargs(opts, steps, num_processes), **extra})
    except (TypeError, ValueError) as e:
        raise UserError(f"--lr_scheduler {name} with --lr_scheduler_args {extra}: {e}") from None
