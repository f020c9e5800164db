"""The LLLite training loop on accelerate: one step, the end of a step, the end of an epoch.

Only the LLLite network trains; the U-Net, both text encoders and the VAE stay frozen. Each
micro-batch embeds the conditioning image, adds noise, runs the U-Net with SDXL's conditioning
and backpropagates; each optimizer step checks the loss once, steps, and hands over to the saver,
the sample drawer and the trackers. Saving decisions live in ``library/training/saving.py``.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from library.cli import Limit, Options, option, option_label
from library.errors import UserError
from library.sdxl.loading import SDXLModels
from library.sdxl.text_encoding import TextEncodingOptions, encode_prompts
from library.training.loss import (
    LossOptions,
    diffusion_loss,
    noisy_latents,
    sample_noise,
    sample_timesteps,
    training_noise_scheduler,
)
from library.training.accelerator import PrecisionOptions
from library.training.models import ModelOptions
from library.training.optimizers import OptimizerOptions, build_lr_scheduler, build_optimizer
from library.training.saving import (
    Progress,
    Saver,
    TrainingRNG,
    load_progress,
    run_metadata,
)
from library.training.tracking import log_values
from networks.control_net_lllite import ControlNetLLLite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions(Options):
    group = "training length"

    max_train_steps: int = option(1600, type=int, limit=Limit(1), help="optimizer steps to train, >= 1")
    max_train_epochs: int | None = option(type=int, limit=Limit(1),
                                          help="epochs to train, >= 1 (overrides --max_train_steps)")
    gradient_accumulation_steps: int = option(1, type=int, limit=Limit(1), help="batches per optimizer step, >= 1")
    seed: int | None = option(type=int, limit=Limit(0, 2**32 - 1),
                              help="seed for data order, noise and initial weights, 0 .. 2**32-1")


OPTIONS = (RunOptions,)


class NonFiniteLoss(UserError):
    pass


def sdxl_time_ids(batch: dict, device, dtype) -> torch.Tensor:
    """[original_h, original_w, crop_top, crop_left, target_h, target_w] per sample."""
    return torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1).to(device, dtype)


def compute_loss(batch, models: SDXLModels, network, unet, noise_scheduler, opts: LossOptions,
                 generator: torch.Generator, device, wdtype,
                 text_encoding: TextEncodingOptions = TextEncodingOptions()) -> torch.Tensor:
    """One batch: latents, text conditioning, noise, the U-Net with LLLite, and the weighted loss.

    ``text_encoding`` says how uncached captions are encoded; ``batch["alpha_masks"]``, when present,
    weights the loss per latent pixel.
    """
    if "latents" in batch:
        latents = batch["latents"].to(device, torch.float32)
    else:
        vae = models.vae
        with torch.no_grad():
            images = batch["images"].to(device, vae.dtype)
            dist = vae.encode(images).latent_dist
            eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
            latents = ((dist.mean + dist.std * eps) * vae.config.scaling_factor).float()
    if "text_hidden" in batch:
        hidden, pooled = batch["text_hidden"].to(device), batch["text_pooled"].to(device)
    else:
        hidden, pooled = encode_prompts(
            models.text_encoder1, models.text_encoder2, models.tokenizer1, models.tokenizer2, list(batch["captions"]),
            **text_encoding.encode_kwargs(),
        )
        hidden, pooled = hidden.to(device), pooled.to(device)

    noise = sample_noise(latents, opts, generator)
    timesteps = sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, opts, generator).to(device)
    noisy = noisy_latents(noise_scheduler, latents, noise, timesteps, opts, generator)
    added = {"text_embeds": pooled.to(wdtype), "time_ids": sdxl_time_ids(batch, device, wdtype)}
    cond = batch["conditioning_images"].to(device)
    pred = network(cond, unet, noisy.to(wdtype), timesteps, encoder_hidden_states=hidden.to(wdtype), added_cond_kwargs=added).sample
    mask = batch.get("alpha_masks")
    return diffusion_loss(noise_scheduler, pred, latents, noise, timesteps, opts,
                             mask=None if mask is None else mask.to(device))


SampleFn = Callable[[ControlNetLLLite, int, int], None]


class Trainer:
    """Everything one run needs, prepared once; ``run()`` trains and returns the final file."""

    def __init__(self, options, accelerator, models: SDXLModels, unet: torch.nn.Module, network: ControlNetLLLite,
                 dataloader, resolution: tuple[int, int], samples: SampleFn | None = None, uploader=None,
                 loss: LossOptions | None = None, resume_from: Path | None = None):
        """``loss``: the loss options after the checkpoint's markers (``TrainingSchedule.loss_options``);
        ``resume_from``: the state folder to continue, local or downloaded (default: the options')."""
        self.options = options
        self.resume_from = options.saving.resume if resume_from is None else resume_from
        self.accelerator = accelerator
        self.models = models
        self.unet = unet
        self.samples = samples
        self.device = accelerator.device
        self.wdtype = options.precision.weight_dtype
        self.loss_opts: LossOptions = options.loss if loss is None else loss

        if options.precision.full_bf16 or options.precision.full_fp16:
            network.to(self.wdtype)
        network.attach()
        network.train()
        self.params = [p for p in network.parameters() if p.requires_grad]
        opt = options.optimizer
        optimizer = build_optimizer(opt.name, self.params, opt.learning_rate, dict(opt.args))

        run = options.run
        n = accelerator.num_processes
        self.steps_per_epoch = max(1, math.ceil(len(dataloader) / n / run.gradient_accumulation_steps))
        self.max_steps = run.max_train_epochs * self.steps_per_epoch if run.max_train_epochs else run.max_train_steps
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        # token_warmup_step needs the training step of each batch and the run's length.
        dataloader.dataset.set_step_schedule(n * run.gradient_accumulation_steps, self.max_steps)
        lr_scheduler = build_lr_scheduler(opt, optimizer, max_steps=self.max_steps, num_processes=n)
        self.network, self.optimizer, self.dataloader, self.lr_scheduler = accelerator.prepare(
            network, optimizer, dataloader, lr_scheduler)
        self.raw_network: ControlNetLLLite = accelerator.unwrap_model(self.network)
        self.noise_scheduler = training_noise_scheduler(models.scheduler_config, self.loss_opts.v_parameterization,
                                                           self.loss_opts.zero_terminal_snr)
        self.rng = TrainingRNG(run.seed or 0, accelerator.process_index)
        self.progress = Progress()
        self.saver = Saver(options.saving, accelerator, self.network,
                           run_metadata(options, models, resolution, self.loss_opts), self.num_epochs, self.rng,
                           uploader, last_state=self.resume_from)
        self._pending = _StepStats(self.device)
        self._last_loss = float("nan")
        self._losses = _LossHistory(self.steps_per_epoch)
        self.bar = None

    # -- the recipe ------------------------------------------------------------------------------

    def run(self) -> Path:
        self.resume()
        self.log_plan()
        self.bar = tqdm(total=self.max_steps, initial=self.progress.global_step, desc="steps",
                        disable=not self.accelerator.is_local_main_process)
        with self.saver.explained():  # a failed write also names what is complete and how to continue
            try:
                if self.samples is not None and self.options.samples.at_first and self.progress.global_step == 0:
                    self.samples(self.raw_network, 0, self.progress.epoch)
                while not self.finished:
                    self.run_epoch()
            finally:
                self.bar.close()  # before any error message, so the message is the last line
            return self.finish()

    @property
    def finished(self) -> bool:
        return self.progress.global_step >= self.max_steps or self.progress.epoch > self.num_epochs

    def run_epoch(self) -> None:
        # accelerate's loaders pass their own epoch counter to dataset.set_epoch when iterated,
        # so the epoch is set through the loader (a resumed run's skipping loader included).
        loader = self.dataloader
        if self.progress.batches_in_epoch:
            loader = self.accelerator.skip_first_batches(self.dataloader, self.progress.batches_in_epoch)
        loader.set_epoch(self.progress.epoch)
        for batch in loader:
            self.progress.batches_in_epoch += 1
            self.micro_step(batch)
            if self.accelerator.sync_gradients:
                self.end_of_step()
                if self.progress.global_step >= self.max_steps:
                    return  # stopped inside the epoch: it has not ended
        self.end_of_epoch()

    def micro_step(self, batch: dict) -> None:
        """Forward and backward of one batch; on the last batch of an accumulation, the optimizer step."""
        acc = self.accelerator
        with acc.accumulate(self.network):
            self.raw_network.set_multiplier(batch["network_multiplier"])
            loss = compute_loss(batch, self.models, self.network, self.unet, self.noise_scheduler, self.loss_opts,
                                self.rng.generator, self.device, self.wdtype, self.options.data.text_encoding)
            self._pending.add(loss.detach())
            if acc.sync_gradients:
                # The one host synchronisation of the step, before the last backward: DeepSpeed steps inside it.
                self.check_finite()
            acc.backward(loss)
            if acc.sync_gradients:
                if self.options.optimizer.max_grad_norm:
                    acc.clip_grad_norm_(self.params, self.options.optimizer.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def end_of_step(self) -> None:
        p = self.progress
        p.global_step += 1
        self._losses.add(self._last_loss)
        # sd-scripts' names: the step's loss, its mean over the last epoch's worth of steps, the learning rate.
        logs = {"loss/current": self._last_loss, "loss/average": self._losses.moving_average,
                "lr": self.lr_scheduler.get_last_lr()[0]}
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self._last_loss:.4f}", lr=f"{logs['lr']:.2e}")
        log_values(self.accelerator, logs, p.global_step)
        self.saver.on_step_end(p, self.max_steps)
        if self.samples is not None and self.options.samples.due_after_step(p.global_step):
            self.samples(self.raw_network, p.global_step, p.epoch)

    def end_of_epoch(self) -> None:
        p = self.progress
        epoch = p.epoch
        p.epoch += 1
        p.batches_in_epoch = 0
        # At the epoch's last step (sd-scripts logs it at step epoch+1, which a step axis cannot show).
        log_values(self.accelerator, {"loss/epoch": self._losses.end_epoch()}, p.global_step)
        self.saver.on_epoch_end(epoch, p, self.max_steps)
        if self.samples is not None and self.options.samples.due_after_epoch(epoch):
            self.samples(self.raw_network, p.global_step, epoch)

    def finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.num_processes > 1:
            self.check_in_sync()
        if self._losses.epoch:  # the last epoch, whole or cut short by --max_train_steps (as sd-scripts logs it)
            log_values(acc, {"loss/epoch": self._losses.end_epoch()}, self.progress.global_step)
        final = self.saver.on_train_end(self.progress)
        drawn_now = self.options.samples.due_after_step(self.progress.global_step)
        if self.samples is not None and self.options.samples.at_end and not drawn_now:
            self.samples(self.raw_network, self.progress.global_step, self.progress.epoch)
        return final

    # -- helpers ---------------------------------------------------------------------------------

    def resume(self) -> None:
        folder = self.resume_from
        if folder is None:
            return
        try:
            self.accelerator.load_state(str(folder))
        except RuntimeError as e:
            if "state_dict" not in str(e):
                raise
            raise UserError(
                f"--resume {folder}: the saved LLLite does not fit this run's network "
                "(network_dim, cond_emb_dim and include_output_blocks must be as in the run that saved it): "
                + str(e).splitlines()[0]
            ) from None
        self.rng.load(folder)
        self.progress = load_progress(folder)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.progress.global_step,
                    self.progress.epoch, self.progress.batches_in_epoch)

    def log_plan(self) -> None:
        if self.accelerator.is_main_process:
            logger.info("training %d LLLite parameters: %d batches per epoch, %d epochs, %d steps, %d process(es)",
                        sum(p.numel() for p in self.params), len(self.dataloader), self.num_epochs, self.max_steps,
                        self.accelerator.num_processes)

    def check_in_sync(self) -> None:
        """Data-parallel processes must end with the same weights; the main process compares them."""
        from accelerate.utils import gather_object

        from library.training.cache_filling import fingerprint

        prints = gather_object([fingerprint(self.raw_network)])
        if self.accelerator.is_main_process:
            if len(set(prints)) > 1:
                logger.warning("the processes ended with different LLLite weights (fingerprints %s)", ", ".join(prints))
            else:
                logger.info("final LLLite weights fingerprint %s, equal on all %d processes", prints[0], len(prints))

    def check_finite(self) -> None:
        """Stop every process together on a NaN/inf loss, before it reaches the weights."""
        bad, mean = self._pending.collect(self.accelerator)
        self._last_loss = mean
        if not bad:
            return
        p = self.progress
        kept = f"The last good file is {self.saver.last_saved}." if self.saver.last_saved else "No LLLite file was written."
        raise NonFiniteLoss(
            f"the loss became {mean} at step {p.global_step + 1} (epoch {p.epoch}); training stopped before the bad "
            f"update, and nothing from this step was saved. {kept} Try a lower "
            f"{option_label(OptimizerOptions, 'learning_rate')}, {option_label(PrecisionOptions, 'mixed_precision')} bf16 "
            f"instead of fp16, or {option_label(ModelOptions, 'no_half_vae')}."
        )


class _LossHistory:
    """Step losses for the trackers: the moving average over one epoch's worth of steps, and each epoch's mean."""

    def __init__(self, window: int):
        self.window: deque[float] = deque(maxlen=max(1, window))
        self.epoch: list[float] = []

    def add(self, loss: float) -> None:
        self.window.append(loss)
        self.epoch.append(loss)

    @property
    def moving_average(self) -> float:
        return sum(self.window) / len(self.window) if self.window else float("nan")

    def end_epoch(self) -> float:
        mean = sum(self.epoch) / len(self.epoch) if self.epoch else float("nan")
        self.epoch = []
        return mean


class _StepStats:
    """Loss of the micro-batches of one optimizer step, kept on the device until the step ends."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros((), device=self.device)
        self.nonfinite = torch.zeros((), device=self.device)
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.total = self.total + loss.float()
        self.nonfinite = self.nonfinite + (~torch.isfinite(loss)).float()
        self.count += 1

    def collect(self, accelerator) -> tuple[bool, float]:
        """(any non-finite loss on any process, mean loss of this process) with one transfer to the host."""
        stats = torch.stack([self.nonfinite, self.total / max(1, self.count)])
        if accelerator.num_processes > 1:
            stats[0] = accelerator.reduce(stats[0:1], reduction="sum")[0]
        bad, mean = stats.tolist()
        self.reset()
        return bad > 0, mean
