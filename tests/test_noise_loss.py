"""Noise and loss options (issue #13): each one checked against its definition on small tensors.

The definitions are sd-scripts' (library/train_util.py and custom_train_functions.py); the expected
values here are written from those formulas, not from this project's code.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from library.errors import UserError
from library.training import loss as dl
from library.training.options import build_parser
from library.training.loop import compute_loss

SDXL_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module")
def scheduler():
    return dl.training_noise_scheduler(SDXL_SCHEDULE, False, False)


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def loss_options(parser, *argv: str) -> dl.LossOptions:
    return dl.LossOptions.from_args(parser.parse_args(list(argv)))


# ---------------------------------------------------------------------------------------------- huber


def test_huber_schedules_give_the_defined_threshold_per_timestep(scheduler):
    t = torch.tensor([0, 250, 500, 999])
    ac = scheduler.alphas_cumprod[t].double()
    sigma = ((1 - ac) / ac).sqrt()
    snr = dl.huber_threshold(scheduler, t, dl.LossOptions(huber_schedule="snr", huber_c=0.1, huber_scale=3.0))
    assert torch.allclose(snr.double(), 0.9 / (1 + sigma) ** 2 + 0.1, rtol=1e-5)  # huber_scale is not used by snr
    assert 0.94 < snr[0] < 0.96 and 0.1 < snr[-1] < 0.11  # about 1 at t=0, about huber_c at t=999
    exp = dl.huber_threshold(scheduler, t, dl.LossOptions(huber_schedule="exponential", huber_c=0.1, huber_scale=2.0))
    assert torch.allclose(exp, torch.tensor([2.0, 2 * 0.1 ** 0.25, 2 * 0.1 ** 0.5, 2 * 0.1 ** 0.999]), rtol=1e-5)
    const = dl.huber_threshold(scheduler, t, dl.LossOptions(huber_schedule="constant", huber_c=0.1, huber_scale=2.0))
    assert torch.allclose(const, torch.full((4,), 0.2))


def test_huber_and_smooth_l1_use_the_per_timestep_threshold(scheduler):
    t = torch.tensor([0, 999])
    pred, target = torch.zeros(2, 4, 2, 2), torch.full((2, 4, 2, 2), 0.5)
    c = 0.1 ** (t.double() / 1000)  # exponential schedule, huber_scale 1
    for loss_type, expected in (("huber", 2 * c * (torch.sqrt(0.25 + c * c) - c)),
                                ("smooth_l1", 2 * (torch.sqrt(0.25 + c * c) - c))):
        opts = dl.LossOptions(loss_type=loss_type, huber_schedule="exponential", huber_c=0.1)
        noise = target  # epsilon prediction: the target is the noise
        got = dl.diffusion_loss(scheduler, pred, torch.zeros_like(pred), noise, t, opts)
        assert math.isclose(got.item(), expected.mean().item(), rel_tol=1e-5), loss_type
    l1 = dl.per_sample_loss(pred, target, dl.LossOptions(loss_type="l1"))
    assert torch.allclose(l1, torch.full((2,), 0.5))


# ---------------------------------------------------------------------------------------------- noise


def lag1_correlation(x: torch.Tensor) -> float:
    """Correlation of horizontally neighbouring values: about 0 for white noise."""
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_multires_noise_is_unit_std_low_frequency_noise():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(4, 4, 32, 32, generator=g)
    pyramid = dl.multires_noise(white.clone(), 6, 0.8, torch.Generator().manual_seed(1))
    assert pyramid.shape == white.shape
    assert math.isclose(pyramid.std().item(), 1.0, rel_tol=1e-5)
    assert abs(lag1_correlation(white)) < 0.05 and lag1_correlation(pyramid) > 0.2
    # the coarse levels move whole regions: the per-image, per-channel means spread far more than white noise's
    assert pyramid.mean(dim=(2, 3)).std() > 5 * white.mean(dim=(2, 3)).std()
    # discount 0 keeps only level 0 (a second full-size draw): white again
    flat = dl.multires_noise(white.clone(), 6, 0.0, torch.Generator().manual_seed(1))
    assert abs(lag1_correlation(flat)) < 0.05
    again = dl.multires_noise(white.clone(), 6, 0.8, torch.Generator().manual_seed(1))
    assert torch.equal(pyramid, again)  # seeded: the level sizes come from the generator too


def test_noise_offset_then_multires_in_sd_scripts_order():
    latents = torch.zeros(2, 4, 16, 16)
    latents[:, 0] = 2.0
    latents[:, 1] = -3.0
    opts = dl.LossOptions(noise_offset=0.1, adaptive_noise_scale=0.5, multires_noise_iterations=3)
    got = dl.sample_noise(latents, opts, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(latents.shape, generator=g)
    offset = torch.randn((2, 4, 1, 1), generator=g)
    strength = torch.tensor([0.1 + 0.5 * 2.0, 0.1 + 0.5 * 3.0, 0.1, 0.1]).view(1, 4, 1, 1)  # + 0.5 * |channel mean|
    expected = dl.multires_noise(base + strength * offset, 3, 0.3, g)
    assert torch.allclose(got, expected, atol=1e-6)


def test_offset_strength_random_and_adaptive():
    latents = torch.zeros(1, 2, 4, 4)
    latents[:, 0] = 1.0
    drawn = torch.stack([dl.offset_strength(latents, dl.LossOptions(noise_offset=0.2, noise_offset_random_strength=True),
                                            torch.Generator().manual_seed(s)) for s in range(40)])
    assert drawn.min() >= 0 and drawn.max() <= 0.2 and drawn.std() > 0.03  # uniform in [0, noise_offset]
    fixed = dl.offset_strength(latents, dl.LossOptions(noise_offset=0.2))
    assert fixed.item() == pytest.approx(0.2)
    # a negative adaptive scale can lower the strength, never below 0
    low = dl.offset_strength(latents, dl.LossOptions(noise_offset=0.2, adaptive_noise_scale=-1.0))
    assert torch.allclose(low.flatten(), torch.tensor([0.0, 0.2]))


class CapturingNetwork:
    """Stands in for LLLite + U-Net: records the noisy input and predicts zeros (the loss is then |target|^2)."""

    def __init__(self):
        self.inputs = []

    def __call__(self, cond, unet, noisy, timesteps, **kwargs):
        self.inputs.append(noisy.clone())
        return SimpleNamespace(sample=torch.zeros_like(noisy))


def cached_batch(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(7)
    size = torch.tensor([[64, 64]] * b, dtype=torch.float32)
    return {"latents": torch.randn(b, 4, 8, 8, generator=g), "text_hidden": torch.zeros(b, 77, 8),
            "text_pooled": torch.zeros(b, 8), "original_sizes_hw": size, "crop_top_lefts": torch.zeros(b, 2),
            "target_sizes_hw": size, "conditioning_images": torch.zeros(b, 3, 64, 64)}


def test_ip_noise_gamma_perturbs_the_input_and_not_the_target(scheduler):
    batch = cached_batch()
    runs = {}
    for gamma in (None, 0.5):
        net = CapturingNetwork()
        loss = compute_loss(batch, None, net, None, scheduler, dl.LossOptions(ip_noise_gamma=gamma),
                            torch.Generator().manual_seed(0), "cpu", torch.float32)
        runs[gamma] = (loss, net.inputs[0])
    (plain_loss, plain_in), (ip_loss, ip_in) = runs[None], runs[0.5]
    assert torch.equal(plain_loss, ip_loss)  # same noise and timesteps: the target did not change
    # the extra noise went through the schedule: sqrt(1 - alphabar_t) * gamma * N(0, 1) on top of the plain input
    g = torch.Generator().manual_seed(0)
    torch.randn(batch["latents"].shape, generator=g)
    t = dl.sample_timesteps(2, 1000, dl.LossOptions(), g)
    extra = 0.5 * torch.randn(batch["latents"].shape, generator=g)
    scale = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(ip_in - plain_in, scale * extra, atol=1e-5)


def test_ip_noise_random_strength_stays_within_gamma(scheduler):
    latents, noise, t = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.tensor([999])
    opts = dl.LossOptions(ip_noise_gamma=0.5, ip_noise_gamma_random_strength=True)
    sizes = [dl.noisy_latents(scheduler, latents, noise, t, opts, torch.Generator().manual_seed(s)).std().item()
             for s in range(20)]
    full = dl.noisy_latents(scheduler, latents, noise, t, dl.LossOptions(ip_noise_gamma=0.5),
                            torch.Generator().manual_seed(0)).std().item()
    assert max(sizes) < 1.3 * full and min(sizes) < 0.5 * full


# ---------------------------------------------------------------------------------------------- loss weights


def test_v_pred_like_loss_adds_the_defined_term(scheduler):
    t = torch.tensor([0, 300, 900])
    pred, noise = torch.zeros(3, 4, 2, 2), torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    latents = torch.zeros_like(pred)
    base = dl.per_sample_loss(pred, noise, dl.LossOptions())
    snr = (scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])).clamp(max=1000)  # 1175 at t=0 is capped
    got = dl.diffusion_loss(scheduler, pred, latents, noise, t, dl.LossOptions(v_pred_like_loss=0.2))
    expected = (base + 0.2 * base / (snr / (snr + 1))).mean()
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-5)


def test_v_prediction_weights(scheduler):
    t = torch.tensor([0, 500, 999])
    snr = (scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])).clamp(max=1000)
    scaled = dl.loss_weights(scheduler, t, dl.LossOptions(v_parameterization=True, scale_v_pred_loss_like_noise_pred=True))
    assert torch.allclose(scaled, snr / (snr + 1))
    debiased_v = dl.loss_weights(scheduler, t, dl.LossOptions(v_parameterization=True, debiased_estimation=True))
    assert torch.allclose(debiased_v, 1 / (snr + 1))
    debiased_eps = dl.loss_weights(scheduler, t, dl.LossOptions(debiased_estimation=True))
    assert torch.allclose(debiased_eps, 1 / snr.sqrt())
    both = dl.loss_weights(scheduler, t, dl.LossOptions(min_snr_gamma=5.0, debiased_estimation=True))
    raw = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    assert torch.allclose(both, torch.minimum(raw, torch.tensor(5.0)) / raw / snr.sqrt())


# ---------------------------------------------------------------------------------------------- options


def test_options_reach_loss_options(parser):
    opts = loss_options(parser, "--noise_offset", "0.05", "--noise_offset_random_strength", "--adaptive_noise_scale",
                        "0.01", "--multires_noise_iterations", "6", "--multires_noise_discount", "0.4",
                        "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength", "--v_pred_like_loss", "0.2",
                        "--loss_type", "smooth_l1", "--huber_schedule", "exponential", "--huber_scale", "2")
    assert (opts.noise_offset, opts.adaptive_noise_scale, opts.multires_noise_iterations) == (0.05, 0.01, 6)
    assert opts.noise_offset_random_strength and opts.ip_noise_gamma_random_strength
    assert (opts.multires_noise_discount, opts.ip_noise_gamma, opts.v_pred_like_loss) == (0.4, 0.1, 0.2)
    assert (opts.loss_type, opts.huber_schedule, opts.huber_scale) == ("smooth_l1", "exponential", 2.0)
    v = loss_options(parser, "--v_parameterization", "--scale_v_pred_loss_like_noise_pred")
    assert v.scale_v_pred_loss_like_noise_pred
    assert loss_options(parser).huber_schedule == "snr"  # sd-scripts' default


@pytest.mark.parametrize("argv, words", [
    (["--adaptive_noise_scale", "0.1"], ["--adaptive_noise_scale 0.1", "needs --noise_offset"]),
    (["--multires_noise_iterations", "-1"], ["--multires_noise_iterations -1", "at least 0"]),
    (["--multires_noise_discount", "1.5"], ["--multires_noise_discount 1.5", "at most 1"]),
    (["--ip_noise_gamma", "-0.1"], ["--ip_noise_gamma -0.1", "at least 0"]),
    (["--huber_schedule", "cosine"], ["--huber_schedule 'cosine'", "snr, exponential, constant"]),
    (["--huber_scale", "0"], ["--huber_scale 0", "above 0"]),
    (["--loss_type", "l3"], ["--loss_type 'l3'", "l2, l1, huber, smooth_l1"]),
    (["--v_pred_like_loss", "-1"], ["--v_pred_like_loss -1", "at least 0"]),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"], ["--v_pred_like_loss 0.1", "v-prediction"]),
    (["--v_pred_like_loss", "0.1", "--zero_terminal_snr"], ["--v_pred_like_loss 0.1", "--zero_terminal_snr"]),
    (["--scale_v_pred_loss_like_noise_pred"], ["--scale_v_pred_loss_like_noise_pred", "v-prediction only"]),
])
def test_bad_noise_and_loss_values_are_refused(parser, argv, words):
    with pytest.raises(UserError) as e:
        loss_options(parser, *argv)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_v_prediction_checkpoint_refuses_v_pred_like_loss(parser):
    # The training script turns v_parameterization on after loading a v-prediction checkpoint.
    opts = loss_options(parser, "--v_pred_like_loss", "0.1")
    with pytest.raises(UserError, match="v_pred_like_loss"):
        dataclasses.replace(opts, v_parameterization=True)
