"""``--sampler`` names -> diffusers schedulers built from the model's own scheduler config.

The family of tools names its samplers after the k-diffusion and diffusers ones. Each name maps to a
diffusers scheduler class plus a few settings; the noise schedule itself (betas, prediction type,
zero terminal SNR, timestep spacing) always comes from ``SDXLModels.scheduler_config`` so that
v-prediction checkpoints sample correctly. No sampler is written here.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

from library.errors import UserError

logger = logging.getLogger(__name__)

# name -> (diffusers class name, extra settings)
_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    # PRK warm-up steps are for the original PNDM paper; Stable Diffusion pipelines skip them.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # the first-order-data "dpmsolver" algorithm cannot step to sigma 0
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
# The k_ names of the family are the same samplers.
for _name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a"):
    _SAMPLERS["k_" + _name] = _SAMPLERS[_name]

SAMPLER_NAMES: tuple[str, ...] = tuple(_SAMPLERS)
DEFAULT_SAMPLER = "euler_a"
# Gradual Latent replaces the ancestral Euler step at the steps where the latents grow (as sd-scripts does).
ANCESTRAL_EULER = frozenset({"euler_a", "k_euler_a"})

# Schedule keys that describe the model (not the sampler): taken from the model's config.
_MODEL_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
    "steps_offset",
    "timestep_spacing",
    "rescale_betas_zero_snr",
    "trained_betas",
)


def normalize_sampler_name(name: str) -> str:
    """Lower-case a sampler name and check it; raises UserError listing the valid names."""
    key = str(name).strip().lower()
    if key not in _SAMPLERS:
        raise UserError(f"unknown sampler {name!r}. Choose one of: {', '.join(SAMPLER_NAMES)}.")
    return key


def build_scheduler(name: str, scheduler_config: Mapping[str, Any]):
    """A fresh diffusers scheduler for sampler ``name`` with the model's noise schedule."""
    import diffusers  # here, not at the top: option checks import this module and must stay fast

    key = normalize_sampler_name(name)
    class_name, extra = _SAMPLERS[key]
    try:
        cls = getattr(diffusers, class_name)
        accepted = set(inspect.signature(cls.__init__).parameters)
    except ImportError as e:  # LMS needs scipy
        raise UserError(f"sampler {name!r} needs a package that is not installed: {e}".strip()) from None
    config = {k: v for k, v in scheduler_config.items() if k in _MODEL_KEYS and k in accepted}
    if scheduler_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in accepted:
        logger.warning(
            "sampler %s cannot sample with a zero-terminal-SNR schedule; it uses the ordinary one "
            "(choose euler, euler_a, ddim or dpmsolver++ for this model)", key
        )
    if "clip_sample" in accepted:
        config["clip_sample"] = False  # latents are not clipped in SD/SDXL sampling
    if "set_alpha_to_one" in accepted:
        config["set_alpha_to_one"] = False
    config.update(extra)
    return cls(**config)


def step_accepts_generator(scheduler) -> bool:
    """Whether ``scheduler.step`` draws noise itself (ancestral/SDE samplers) and takes a generator."""
    return "generator" in inspect.signature(scheduler.step).parameters
