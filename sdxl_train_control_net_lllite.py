"""Train a ControlNet-LLLite for SDXL.

    accelerate launch sdxl_train_control_net_lllite.py --config_file train.toml

Options: docs/training.md. The recipe: read options, check the dataset, load SDXL, cache latents
and text-encoder outputs, create the LLLite network, train.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import set_seed

from library import training
from library.caching import cache_latents, cache_text_encoder_outputs, validate_caching_options
from library.dataset import LLLiteDataset, create_dataloader
from library.dataset_config import build_dataset_configs
from library.debug_dataset import debug_dataset
from library.errors import UserError, run_cli
from library.model_loading import load_sdxl
from library.train_config import parse_training_args
from library.training_samples import make_sampler
from networks.control_net_lllite import ControlNetLLLite

logger = logging.getLogger("sdxl_train_control_net_lllite")


def main() -> None:
    args = parse_training_args()
    accelerator = training.create_accelerator(args)
    logging.basicConfig(level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.seed is not None:
        set_seed(args.seed)

    # 1. The dataset: every pairing, image and option problem is reported before any model loads.
    dataset_configs = build_dataset_configs(args)
    validate_caching_options(dataset_configs, cache_latents=args.cache_latents,
                             cache_text_encoder_outputs=args.cache_text_encoder_outputs)
    dataset = LLLiteDataset(dataset_configs, seed=args.seed or 0)
    logger.info("%s", dataset.summary())
    if args.debug_dataset:
        paths = debug_dataset(dataset, f"{args.output_dir}/debug_dataset")
        logger.info("wrote %d debug images to %s/debug_dataset", len(paths), args.output_dir)
        return

    # 2. The base model, frozen.
    wdtype = training.weight_dtype(args)
    vae_dtype = torch.float32 if args.no_half_vae or wdtype == torch.float16 else wdtype
    models = load_sdxl(args.pretrained_model_name_or_path, vae=args.vae, dtype=torch.float32, vae_dtype=vae_dtype)
    training.set_attention(models.unet, args)
    if models.v_prediction and not args.v_parameterization:
        logger.warning("the checkpoint is v-prediction but --v_parameterization is not set; setting it")
        args.v_parameterization = True

    # 3. Caches: each image and caption is encoded once (and reused across runs with *_to_disk).
    if args.cache_latents:
        models.vae.to(accelerator.device)
        cache_latents(dataset, training.vae_encode_fn(models, accelerator.device),
                      training.fingerprint(models.vae, models.vae.dtype), to_disk=args.cache_latents_to_disk,
                      batch_size=args.vae_batch_size, process_index=accelerator.process_index,
                      num_processes=accelerator.num_processes, wait_for_everyone=accelerator.wait_for_everyone,
                      show_progress=accelerator.is_local_main_process)
        models.vae.to("cpu")
    if args.cache_text_encoder_outputs:
        for te in (models.text_encoder1, models.text_encoder2):
            te.to(accelerator.device, dtype=wdtype)
        te_id = training.fingerprint(models.text_encoder2, training.fingerprint(models.text_encoder1), wdtype)
        cache_text_encoder_outputs(dataset, training.text_encode_fn(models), te_id,
                                   to_disk=args.cache_text_encoder_outputs_to_disk,
                                   process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                                   wait_for_everyone=accelerator.wait_for_everyone,
                                   show_progress=accelerator.is_local_main_process)
        for te in (models.text_encoder1, models.text_encoder2):
            te.to("cpu")

    # 4. The LLLite network: fresh, or continued from --network_weights.
    if args.network_weights:
        network = ControlNetLLLite.from_file(models.unet, args.network_weights, dropout=args.network_dropout or 0.0)
        if args.include_output_blocks and not network.has_output_blocks:
            raise UserError(f"--network_weights {args.network_weights} has no output-block modules, so it cannot "
                            "continue with --include_output_blocks; drop the option or start a fresh LLLite")
    else:
        network = ControlNetLLLite(models.unet, args.cond_emb_dim, args.network_dim, dropout=args.network_dropout or 0.0,
                                   include_output_blocks=args.include_output_blocks)

    # 5. Train.
    dataloader = create_dataloader(dataset, num_workers=args.max_data_loader_n_workers,
                                   persistent_workers=args.persistent_data_loader_workers)
    sampler = make_sampler(args, models, accelerator)
    final = training.train(args, accelerator, models, network, dataset, dataloader, sampler)
    if accelerator.is_main_process:
        logger.info("done: %s", final)


if __name__ == "__main__":
    run_cli(main)
