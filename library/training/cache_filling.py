"""Fill the latent and text-encoder caches from the loaded models, then free the device for training.

``library/data/caching.py`` does the caching itself and never sees a model; this module hands it the
encoders and decides where the models live afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from library.data.caching import (
    CachingOptions,
    Processes,
    cache_latents,
    cache_text_encoder_outputs,
)
from library.data.dataset import LLLiteDataset
from library.sdxl.loading import SDXLModels
from library.sdxl.text_encoding import TextEncodingOptions, encode_prompts

logger = logging.getLogger(__name__)


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


def text_encode_fn(models: SDXLModels, **encode_options):
    def encode(captions: list[str]):
        return encode_prompts(models.text_encoder1, models.text_encoder2, models.tokenizer1, models.tokenizer2,
                              list(captions), **encode_options)

    return encode


def text_cache_id(encoders_id: str, encoding: TextEncodingOptions) -> str:
    """The text cache's ``te_id``: the encoders and every option the encoding depends on."""
    return f"{encoders_id};{encoding.cache_id()}"


def processes_of(accelerator) -> Processes:
    return Processes(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
                     accelerator.is_local_main_process)


def fill_caches(opts: CachingOptions, models: SDXLModels, dataset: LLLiteDataset, accelerator,
                weight_dtype: torch.dtype, keep_on_device: bool = False) -> None:
    """Encode what the options ask to cache; afterwards the encoders go back to the CPU
    unless ``keep_on_device`` (``--highvram``), and the device's cache is emptied.

    Captions are encoded with the dataset's ``text_encoding`` options (token length, clip skip,
    weighting), which are part of the text cache's id.
    """
    device = accelerator.device
    if opts.latents:
        models.vae.to(device)
        cache_latents(dataset, vae_encode_fn(models, device), fingerprint(models.vae, models.vae.dtype),
                      to_disk=opts.latents_to_disk, batch_size=opts.vae_batch_size, processes=processes_of(accelerator),
                      skip_check=opts.skip_check)
        release([models.vae], keep_on_device)
    if opts.text:
        for te in (models.text_encoder1, models.text_encoder2):
            te.to(device, dtype=weight_dtype)
        encoding = dataset.text_encoding
        te_id = text_cache_id(fingerprint(models.text_encoder2, fingerprint(models.text_encoder1), weight_dtype), encoding)
        cache_text_encoder_outputs(dataset, text_encode_fn(models, **encoding.encode_kwargs()), te_id,
                                   to_disk=opts.text_to_disk, processes=processes_of(accelerator))
        release([models.text_encoder1, models.text_encoder2], keep_on_device)


def release(modules: list[torch.nn.Module], keep_on_device: bool) -> bool:
    """Move idle modules to the CPU and give their memory back to the device. Returns whether it did."""
    if keep_on_device:
        return False
    for m in modules:
        m.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True
