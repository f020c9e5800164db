"""alpha_mask (mask in the batch, cached with the latents, applied in the loss) and a dataset's network_multiplier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.caching import Processes, cache_latents
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.dataset import LLLiteDataset
from library.sdxl.loading import load_sdxl
from library.training import loss as dl
from library.training.loop import compute_loss
from networks.control_net_lllite import ControlNetLLLite
from tests.test_caching import FakeVAE
from tests.test_dataset import draw

QUIET = Processes(show_progress=False)


def make_rgba(root: Path, name: str = "a", size: tuple[int, int] = (64, 32)) -> None:
    """A 64x32 image whose left 24 columns are transparent, half-transparent up to column 32, opaque after."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "cond").mkdir(parents=True, exist_ok=True)
    rgb = np.asarray(draw(size, (40, 4, 60, 20), 40))
    alpha = np.full(size[::-1], 255, np.uint8)
    alpha[:, :24] = 0
    alpha[:, 24:32] = 128
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(root / "img" / f"{name}.png")
    draw(size, (40, 4, 60, 20), 0).save(root / "cond" / f"{name}.png")


def dataset(root: Path, resolution: tuple[int, int] = (64, 32), **kw) -> LLLiteDataset:
    sub = SubsetConfig(image_dir=root / "img", conditioning_data_dir=root / "cond", **kw)
    return LLLiteDataset([DatasetConfig(subsets=(sub,), resolution=resolution, batch_size=4)], seed=0)


EXPECTED = torch.tensor([0.0, 0.0, 0.0, 128 / 255, 1.0, 1.0, 1.0, 1.0])  # per 8-pixel column block


def test_alpha_mask_in_the_batch_and_the_cache(tmp_path):
    make_rgba(tmp_path)
    plain = dataset(tmp_path)
    assert "alpha_masks" not in plain[0]
    ds = dataset(tmp_path, alpha_mask=True, flip_aug=True, num_repeats=8)
    batch = ds[0]
    masks = batch["alpha_masks"]
    assert masks.shape == (4, 1, 4, 8)
    for s in range(4):
        want = EXPECTED.flip(0) if batch["flipped"][s] else EXPECTED
        torch.testing.assert_close(masks[s, 0], want.expand(4, 8), atol=1e-6, rtol=0)
    assert len(set(batch["flipped"].tolist())) == 2
    # the RGB the model sees is the same with and without the mask option
    assert torch.equal(dataset(tmp_path, alpha_mask=True)[0]["images"][0], plain[0]["images"][0])

    for to_disk in (False, True):
        cached = dataset(tmp_path, alpha_mask=True, flip_aug=True, num_repeats=8)
        cache_latents(cached, FakeVAE(), "vae", to_disk=to_disk, processes=QUIET)
        got = cached[0]
        assert "images" not in got
        torch.testing.assert_close(got["alpha_masks"], masks)
    vae = FakeVAE()  # the mask is part of the file: turning it off keeps the latents
    cache_latents(dataset(tmp_path, flip_aug=True), vae, "vae", to_disk=True, processes=QUIET)
    assert vae.calls == 0


def test_images_without_alpha_weigh_one(tmp_path):
    make_rgba(tmp_path, "a")
    draw((64, 32), (4, 4, 20, 20), 40).save(tmp_path / "img" / "b.png")  # RGB, no alpha channel
    draw((64, 32), (4, 4, 20, 20), 0).save(tmp_path / "cond" / "b.png")
    batch = dataset(tmp_path, alpha_mask=True)[0]
    by_name = {Path(p).name: batch["alpha_masks"][s, 0] for s, p in enumerate(batch["image_paths"])}
    assert torch.equal(by_name["b.png"], torch.ones(4, 8))
    assert by_name["a.png"].min() == 0


def test_mask_weights_the_loss_per_latent_pixel():
    pred, target = torch.zeros(2, 4, 2, 4), torch.ones(2, 4, 2, 4)
    target[1] = 3.0
    mask = torch.zeros(2, 1, 2, 4)
    mask[..., :2] = 1.0  # half of each image counts
    opts = dl.LossOptions()
    plain = dl.per_sample_loss(pred, target, opts)
    masked = dl.per_sample_loss(pred, target, opts, mask=mask)
    torch.testing.assert_close(plain, torch.tensor([1.0, 9.0]))
    torch.testing.assert_close(masked, plain / 2)  # sd-scripts: weighted, then averaged over every pixel
    torch.testing.assert_close(dl.per_sample_loss(pred, target, opts, mask=torch.ones(2, 1, 2, 4)), plain)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return load_sdxl(str(tiny_checkpoint))


def _loss(batch, models, network, seed: int = 0) -> torch.Tensor:
    scheduler = dl.training_noise_scheduler(models.scheduler_config, False, False)
    return compute_loss(batch, models, network, models.unet, scheduler, dl.LossOptions(), torch.Generator().manual_seed(seed),
                        "cpu", torch.float32)


def test_compute_loss_applies_the_batch_mask(tmp_path, models):
    make_rgba(tmp_path, size=(64, 64))
    batch = dataset(tmp_path, resolution=(64, 64))[0]
    network = ControlNetLLLite(models.unet, cond_emb_dim=8, network_dim=8).attach()
    try:
        with torch.no_grad():
            full = _loss(batch, models, network)
            zero = _loss({**batch, "alpha_masks": torch.zeros(1, 1, 8, 8)}, models, network)
            ones = _loss({**batch, "alpha_masks": torch.ones(1, 1, 8, 8)}, models, network)
            half = torch.ones(1, 1, 8, 8)
            half[..., 4:] = 0
            left = _loss({**batch, "alpha_masks": half}, models, network)
            right = _loss({**batch, "alpha_masks": 1 - half}, models, network)
    finally:
        network.detach()
    assert zero == 0 and full > 0
    torch.testing.assert_close(ones, full)
    torch.testing.assert_close(left + right, full)
    assert left != right


def test_network_multiplier_zero_gives_no_lllite_gradient(tmp_path, models):
    """The trainer sets the LLLite multiplier from batch["network_multiplier"] before each micro-step."""
    make_rgba(tmp_path, size=(64, 64))
    network = ControlNetLLLite(models.unet, cond_emb_dim=8, network_dim=8).attach()
    network.train()
    try:
        grads = {}
        for multiplier in (1.0, 0.0):
            sub = SubsetConfig(image_dir=tmp_path / "img", conditioning_data_dir=tmp_path / "cond")
            batch = LLLiteDataset([DatasetConfig(subsets=(sub,), resolution=(64, 64), network_multiplier=multiplier)])[0]
            assert batch["network_multipliers"].tolist() == [multiplier] and batch["network_multiplier"] == multiplier
            network.set_multiplier(batch["network_multiplier"])  # as Trainer.micro_step does
            network.zero_grad(set_to_none=True)
            _loss(batch, models, network).backward()
            grads[multiplier] = [p.grad for p in network.parameters() if p.requires_grad]
    finally:
        network.detach()
    assert any(g is not None and g.abs().sum() > 0 for g in grads[1.0])
    assert all(g is None or g.abs().sum() == 0 for g in grads[0.0])
