"""The LLLite training loop on accelerate: precision, caching, the step, saving and resuming.

Only the LLLite network trains; the U-Net, both text encoders and the VAE stay frozen. The loop
reads top to bottom: prepare the models, cache what can be cached, then for each batch embed the
conditioning image, add noise, run the U-Net with SDXL's conditioning, step the optimizer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from library import diffusion_loss as dl
from library.atomic_io import atomic_write_text
from library.errors import UserError
from library.model_loading import SDXLModels
from library.optimizers import build_lr_scheduler, build_optimizer, parse_optimizer_args
from networks.control_net_lllite import ControlNetLLLite

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    log_with = None
    if args.log_with:
        log_with = ["tensorboard", "wandb"] if args.log_with == "all" else [args.log_with]
        if not args.logging_dir:
            raise UserError(f"--log_with {args.log_with} needs --logging_dir (where the logs go)")
    # full_fp16 keeps fp16 weights, which accelerate's loss scaler refuses to unscale: run it without autocast.
    mixed = "no" if args.full_fp16 else args.mixed_precision
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=mixed,
            log_with=log_with,
            project_dir=args.logging_dir,
        )
    except (ValueError, ImportError) as e:
        raise UserError(f"could not set up training (--mixed_precision {args.mixed_precision}, --log_with {args.log_with}): {e}") from None
    return accelerator


def weight_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype of the frozen models: half when mixed precision is on."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)


def save_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, "fp32": torch.float32}.get(
        args.save_precision or "", None
    )


def set_attention(unet, args: argparse.Namespace) -> None:
    """SDPA is diffusers' default; xformers when asked for and usable."""
    if not args.xformers:
        return
    if not torch.cuda.is_available():
        raise UserError("--xformers needs a CUDA GPU; without one, drop --xformers (SDPA is used and is as fast)")
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as e:  # xformers raises several types when missing or mismatched
        raise UserError(f"--xformers: xformers is not usable ({e}). Run `pip install xformers` matching your torch, or drop --xformers.") from None


def fingerprint(module: torch.nn.Module, *extra: object) -> str:
    """A short id of a model's weights for cache invalidation (a sample of every tensor, not all bytes)."""
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for name, t in module.state_dict().items():
        flat = t.detach().flatten()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def vae_encode_fn(models: SDXLModels, device: torch.device):
    vae = models.vae
    scale = vae.config.scaling_factor

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device=device, dtype=vae.dtype)
        return (vae.encode(images).latent_dist.sample() * scale).float().cpu()

    return encode


def text_encode_fn(models: SDXLModels):
    from library.text_encoding import encode_prompts

    def encode(captions: list[str]):
        hidden, pooled = encode_prompts(
            models.text_encoder1, models.text_encoder2, models.tokenizer1, models.tokenizer2, list(captions)
        )
        return hidden, pooled

    return encode


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


class TrainingRNG:
    """The random stream of noise and timesteps, saved with the training state.

    It is separate from torch's global generator, which data loaders and libraries also draw
    from, so a resumed run draws exactly the noise the uninterrupted run would have.
    """

    def __init__(self, seed: int, process_index: int):
        self.process_index = process_index
        self.generator = torch.Generator().manual_seed(seed * 1000 + process_index)

    def _file(self, folder: Path) -> Path:
        return Path(folder) / f"noise_rng_{self.process_index}.pt"

    def save(self, folder: Path) -> None:
        """Each process saves its own stream (accelerate's custom objects are saved by the main process only)."""
        torch.save(self.generator.get_state(), self._file(folder))

    def load(self, folder: Path) -> None:
        path = self._file(folder)
        if not path.is_file():
            raise UserError(f"--resume {folder}: {path.name} is missing; was the state written with another number of processes?")
        self.generator.set_state(torch.load(path, weights_only=True))


@dataclass
class Progress:
    global_step: int = 0  # optimizer steps done
    epoch: int = 1  # current epoch, from 1
    batches_in_epoch: int = 0  # data-loader batches consumed in the current epoch


def training_metadata(args: argparse.Namespace, models: SDXLModels, network: ControlNetLLLite, progress: Progress) -> dict:
    res = args.resolution or "1024"
    w, _, h = str(res).replace(" ", "").partition(",")
    return {
        "modelspec.resolution": f"{w}x{h or w}",
        "modelspec.prediction_type": "v" if args.v_parameterization else "epsilon",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": models.name,
        "ss_learning_rate": str(args.learning_rate),
        "ss_optimizer": args.optimizer_type,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_bf16": str(bool(args.full_bf16)),
        "ss_network_dropout": str(args.network_dropout),
        "ss_resolution": str(res),
        "ss_steps": str(progress.global_step),
        "ss_epoch": str(progress.epoch),
        "ss_seed": str(args.seed),
        "ss_noise_offset": str(args.noise_offset),
        "ss_min_snr_gamma": str(args.min_snr_gamma),
        "ss_v_parameterization": str(bool(args.v_parameterization)),
        "ss_training_finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


class Saver:
    """Names, writes and prunes LLLite files and training states (main process writes)."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator):
        self.args = args
        self.accelerator = accelerator
        self.out = Path(args.output_dir)
        self.ext = args.save_model_as

    def model_path(self, tag: str | None) -> Path:
        return self.out / (f"{self.args.output_name}-{tag}.{self.ext}" if tag else f"{self.args.output_name}.{self.ext}")

    def save_model(self, network: ControlNetLLLite, tag: str | None, metadata: dict) -> Path | None:
        path = self.model_path(tag)
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(network)
            unwrapped.save(path, dtype=save_dtype(self.args), metadata=metadata)
            logger.info("saved %s", path)
        return path

    def prune_epochs(self, epoch: int) -> None:
        keep = self.args.save_last_n_epochs
        if not keep or not self.accelerator.is_main_process:
            return
        for old in range(1, epoch - keep + 1):
            for path in (self.model_path(f"{old:06d}"), self.out / f"{self.args.output_name}-{old:06d}-state"):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                else:
                    continue
                logger.info("removed %s (--save_last_n_epochs %d)", path, keep)

    def save_state(self, tag: str | None, progress: Progress, rng: TrainingRNG) -> None:
        """accelerate state (weights, optimizer, scheduler, RNG) + our position, renamed into place when complete."""
        name = f"{self.args.output_name}-{tag}-state" if tag else f"{self.args.output_name}-state"
        final = self.out / name
        tmp = self.out / f".{name}.tmp"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        rng.save(tmp)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_write_text(tmp / STATE_FILE, json.dumps(progress.__dict__))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            logger.info("saved training state %s", final)
        self.accelerator.wait_for_everyone()


def load_progress(state_dir: str) -> Progress:
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume {state_dir}: {STATE_FILE} is missing; this is not a complete state folder written by --save_state")
    return Progress(**json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def sdxl_time_ids(batch: dict, device, dtype) -> torch.Tensor:
    """[original_h, original_w, crop_top, crop_left, target_h, target_w] per sample."""
    return torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1).to(device, dtype)


class NonFiniteLoss(UserError):
    pass


def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    models: SDXLModels,
    network: ControlNetLLLite,
    dataset,
    dataloader,
    sampler=None,
) -> Path | None:
    """Train ``network`` and return the path of the final LLLite file."""
    device = accelerator.device
    wdtype = weight_dtype(args)
    unet = models.unet
    caches_on = args.cache_latents and args.cache_text_encoder_outputs

    # Frozen models: half precision when mixed precision is on; out of the GPU when caches make them idle.
    unet.to(device, dtype=wdtype)
    unet.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.torch_compile:
        # The LLLite hooks sit on linears inside the U-Net, so dynamo traces them with it.
        unet = torch.compile(unet)
    if not args.cache_latents:
        models.vae.to(device)
    if not args.cache_text_encoder_outputs:
        models.text_encoder1.to(device, dtype=wdtype)
        models.text_encoder2.to(device, dtype=wdtype)
    if caches_on:
        logger.info("latents and text-encoder outputs are cached: VAE and text encoders stay on the CPU")

    if args.full_bf16 or args.full_fp16:
        network.to(wdtype)
    network.attach()
    network.train()

    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optimizer_type, params, args.learning_rate, parse_optimizer_args(args.optimizer_args))

    steps_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.max_train_epochs:
        args.max_train_steps = args.max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / max(1, steps_per_epoch))
    lr_scheduler = build_lr_scheduler(
        args.lr_scheduler,
        optimizer,
        warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        total_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_scheduler_num_cycles,
        power=args.lr_scheduler_power,
    )
    network, optimizer, dataloader, lr_scheduler = accelerator.prepare(network, optimizer, dataloader, lr_scheduler)
    raw_network: ControlNetLLLite = accelerator.unwrap_model(network)

    noise_scheduler = dl.training_noise_scheduler(models.scheduler_config, args.v_parameterization, args.zero_terminal_snr)
    loss_opts = dl.LossOptions(
        v_parameterization=args.v_parameterization,
        noise_offset=args.noise_offset,
        min_timestep=args.min_timestep,
        max_timestep=args.max_timestep,
        min_snr_gamma=args.min_snr_gamma,
        debiased_estimation=args.debiased_estimation_loss,
        loss_type=args.loss_type,
        huber_c=args.huber_c,
    )
    saver = Saver(args, accelerator)
    progress = Progress()
    rng = TrainingRNG(args.seed or 0, accelerator.process_index)
    if args.resume:
        try:
            accelerator.load_state(args.resume)
        except RuntimeError as e:
            if "state_dict" not in str(e):
                raise
            raise UserError(
                f"--resume {args.resume}: the saved LLLite does not fit this run's network "
                "(network_dim, cond_emb_dim and include_output_blocks must be as in the run that saved it): "
                + str(e).splitlines()[0]
            ) from None
        rng.load(Path(args.resume))
        progress = load_progress(args.resume)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", args.resume, progress.global_step, progress.epoch, progress.batches_in_epoch)

    if accelerator.is_main_process:
        logger.info(
            "training %d LLLite parameters: %d batches per epoch, %d epochs, %d steps, %d process(es)",
            sum(p.numel() for p in params), len(dataloader), num_epochs, args.max_train_steps, accelerator.num_processes,
        )
        if args.log_with:
            accelerator.init_trackers(args.log_prefix or "lllite", config={k: str(v) for k, v in vars(args).items()})

    last_saved: Path | None = None
    bar = tqdm(total=args.max_train_steps, initial=progress.global_step, desc="steps", disable=not accelerator.is_local_main_process)
    if sampler is not None and args.sample_at_first and progress.global_step == 0:
        sampler(raw_network, progress.global_step, progress.epoch)

    while progress.global_step < args.max_train_steps and progress.epoch <= num_epochs:
        # accelerate's loaders pass their own epoch counter to dataset.set_epoch when iterated,
        # so the epoch is set through the loader (a resumed run's skipping loader included).
        loader = dataloader
        if progress.batches_in_epoch:
            loader = accelerator.skip_first_batches(dataloader, progress.batches_in_epoch)
        loader.set_epoch(progress.epoch)
        for batch in loader:
            progress.batches_in_epoch += 1
            with accelerator.accumulate(network):
                loss = compute_loss(batch, models, network, unet, noise_scheduler, loss_opts, rng.generator, device, wdtype)
                check_finite(loss, accelerator, progress, last_saved)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            progress.global_step += 1
            bar.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            if args.log_with:
                accelerator.log(logs, step=progress.global_step)
            if args.save_every_n_steps and progress.global_step % args.save_every_n_steps == 0 and progress.global_step < args.max_train_steps:
                tag = f"step{progress.global_step:08d}"
                last_saved = saver.save_model(network, tag, training_metadata(args, models, raw_network, progress))
                if args.save_state:
                    saver.save_state(tag, progress, rng)
            if sampler is not None and args.sample_every_n_steps and progress.global_step % args.sample_every_n_steps == 0:
                sampler(raw_network, progress.global_step, progress.epoch)
            if progress.global_step >= args.max_train_steps:
                break
        else:
            # a whole epoch ended
            epoch = progress.epoch
            progress.epoch += 1
            progress.batches_in_epoch = 0
            if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and epoch < num_epochs and progress.global_step < args.max_train_steps:
                tag = f"{epoch:06d}"
                last_saved = saver.save_model(network, tag, training_metadata(args, models, raw_network, progress))
                if args.save_state:
                    saver.save_state(tag, progress, rng)
                saver.prune_epochs(epoch)
            if sampler is not None and args.sample_every_n_epochs and epoch % args.sample_every_n_epochs == 0:
                sampler(raw_network, progress.global_step, epoch)
            continue
        break
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        # every process prints it: equal fingerprints show that the processes stayed in sync
        print(f"process {accelerator.process_index}/{accelerator.num_processes}: final LLLite weights "
              f"fingerprint {fingerprint(raw_network)}", flush=True)
    final = saver.save_model(network, None, training_metadata(args, models, raw_network, progress))
    if args.save_state:
        saver.save_state(None, progress, rng)
    sampled_now = bool(args.sample_every_n_steps and progress.global_step % args.sample_every_n_steps == 0)
    if sampler is not None and (args.sample_every_n_steps or args.sample_every_n_epochs) and not sampled_now:
        sampler(raw_network, progress.global_step, progress.epoch)
    accelerator.end_training()
    return final


def compute_loss(batch, models: SDXLModels, network, unet, noise_scheduler, opts: dl.LossOptions,
                 generator: torch.Generator, device, wdtype) -> torch.Tensor:
    """One batch: latents, text conditioning, noise, the U-Net with LLLite, and the weighted loss."""
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
        from library.text_encoding import encode_prompts

        hidden, pooled = encode_prompts(
            models.text_encoder1, models.text_encoder2, models.tokenizer1, models.tokenizer2, list(batch["captions"])
        )
        hidden, pooled = hidden.to(device), pooled.to(device)

    noise = dl.sample_noise(latents, opts.noise_offset, generator)
    timesteps = dl.sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, opts, generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    added = {"text_embeds": pooled.to(wdtype), "time_ids": sdxl_time_ids(batch, device, wdtype)}
    cond = batch["conditioning_images"].to(device)
    pred = network(cond, unet, noisy.to(wdtype), timesteps, encoder_hidden_states=hidden.to(wdtype), added_cond_kwargs=added).sample
    return dl.diffusion_loss(noise_scheduler, pred, latents, noise, timesteps, opts)


def check_finite(loss: torch.Tensor, accelerator: Accelerator, progress: Progress, last_saved: Path | None) -> None:
    """Stop every process together on a NaN/inf loss, before it reaches the weights."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        where = f"step {progress.global_step + 1} (epoch {progress.epoch})"
        kept = f"The last good file is {last_saved}." if last_saved else "No LLLite file was written."
        raise NonFiniteLoss(
            f"the loss became {loss.item()} at {where}; training stopped before the bad update, and nothing from this "
            f"step was saved. {kept} Try a lower --learning_rate, --mixed_precision bf16 instead of fp16, "
            "or --no_half_vae."
        )

