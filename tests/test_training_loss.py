"""The training step itself: on a fixed batch with fixed noise, the LLLite loss falls."""

from __future__ import annotations

import torch

from library.data.dataset_config import load_dataset_config
from library.data.dataset import LLLiteDataset
from library.sdxl.loading import load_sdxl
from library.training import loss as dl
from library.training.loop import compute_loss
from networks.control_net_lllite import ControlNetLLLite
from tests.conftest import make_shape_dataset


def test_loss_falls_on_a_fixed_batch(tmp_path, tiny_checkpoint):
    models = load_sdxl(str(tiny_checkpoint))
    dataset = LLLiteDataset(load_dataset_config(make_shape_dataset(tmp_path, n=2)), seed=0)
    dataset.set_epoch(1)
    batch = dataset[0]
    network = ControlNetLLLite(models.unet, cond_emb_dim=8, network_dim=16).attach()
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    scheduler = dl.training_noise_scheduler(models.scheduler_config, False, False)
    opts = dl.LossOptions()
    losses = []
    for _ in range(25):
        generator = torch.Generator().manual_seed(0)  # the same noise and timesteps every step
        loss = compute_loss(batch, models, network, models.unet, scheduler, opts, generator, "cpu", torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_loss_options():
    scheduler = dl.training_noise_scheduler({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                             "beta_schedule": "scaled_linear"}, False, zero_terminal_snr=True)
    assert scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR
    t = torch.tensor([10, 500, 990])
    w = dl.loss_weights(scheduler, t, dl.LossOptions(min_snr_gamma=5.0))
    snr = dl.snr(scheduler, t)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr.clamp(min=1e-8))
    g = torch.Generator().manual_seed(0)
    ts = dl.sample_timesteps(1000, 1000, dl.LossOptions(min_timestep=100, max_timestep=200), g)
    assert ts.min() >= 100 and ts.max() < 200
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    huber = dl.per_sample_loss(pred, target, dl.LossOptions(loss_type="huber", huber_c=0.1))
    assert torch.allclose(huber, torch.full((2,), 2 * 0.1 * ((1 + 0.01) ** 0.5 - 0.1)))
    noise = dl.sample_noise(torch.zeros(3, 4, 8, 8), dl.LossOptions(noise_offset=0.1), torch.Generator().manual_seed(1))
    assert noise.shape == (3, 4, 8, 8)
