"""Train a ControlNet-LLLite for SDXL.

    accelerate launch sdxl_train_control_net_lllite.py --config_file train.toml

Options: docs/training.md. The recipe: check every option, read the dataset, load SDXL, cache
latents and text-encoder outputs, create the LLLite network, train.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from library.console_logging import console_logging, take_over_console

take_over_console()  # before any third-party import: some libraries log while being imported

from accelerate.utils import set_seed  # noqa: E402

from library.atomic_io import make_output_folders, remove_empty  # noqa: E402
from library.data.dataset import LLLiteDataset, create_dataloader  # noqa: E402
from library.data.debug_dataset import debug_dataset  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.training.accelerator import create_accelerator  # noqa: E402
from library.training.cache_filling import fill_caches  # noqa: E402
from library.training.options import (  # noqa: E402
    TrainingOptions,
    output_folders,
    parse_training_options,
)
from library.training.fidelity import FidelityMeter  # noqa: E402
from library.training.hub_upload import download_state, make_uploader  # noqa: E402
from library.training.loop import Trainer  # noqa: E402
from library.training.loss import checkpoint_schedule  # noqa: E402
from library.training.models import create_network, load_base_model, prepare_unet  # noqa: E402
from library.training.samples import SampleDrawer, combine_hooks  # noqa: E402
from library.training.tracking import start_trackers  # noqa: E402

logger = logging.getLogger("sdxl_train_control_net_lllite")


def main(argv: Sequence[str] | None = None) -> None:
    # 1. Every option checked, then the output folders made, before anything is loaded.
    opts = parse_training_options(argv)
    created = make_output_folders(output_folders(opts))
    try:
        accelerator = create_accelerator(
            opts.precision, opts.distributed, log_with=list(opts.tracking.trackers) or None,
            project_dir=opts.tracking.run_dir, gradient_accumulation_steps=opts.run.gradient_accumulation_steps,
            batch_size=opts.data.datasets[0].batch_size, max_grad_norm=opts.optimizer.max_grad_norm)
        with console_logging(opts.console, quiet=not accelerator.is_local_main_process) as log_to_file:
            log_to_file()
            logger.debug("options: %s", opts)  # everything the run reads, for bug reports
            try:
                train(opts, accelerator)
            finally:
                accelerator.end_training()  # closes the trackers, also when the run fails
    except BaseException:
        remove_empty(created)  # a run that fails before writing anything leaves no empty folder behind
        raise


def train(opts: TrainingOptions, accelerator) -> None:
    """The recipe, once the options are checked and the folders exist."""
    if opts.run.seed is not None:
        set_seed(opts.run.seed)
    resume_from = opts.saving.resume
    if opts.hub.resume is not None:  # a state on the hub comes down before anything loads
        resume_from = download_state(opts.hub.resume, opts.hub.token, accelerator)

    # 2. The dataset: every pairing and image problem is reported before any model loads.
    dataset = LLLiteDataset(opts.data.datasets, seed=opts.run.seed or 0, text_encoding=opts.data.text_encoding)
    if opts.data.debug_dataset:
        if accelerator.is_main_process:
            paths = debug_dataset(dataset, opts.saving.output_dir / "debug_dataset")
            logger.info("wrote %d debug images to %s", len(paths), opts.saving.output_dir / "debug_dataset")
        return

    # 3. The frozen base model; a v-prediction (or zero-terminal-SNR) checkpoint trains as one.
    wdtype = opts.precision.weight_dtype
    models = load_base_model(opts.model, wdtype, accelerator.device)
    schedule = checkpoint_schedule(opts.loss, models)  # the checkpoint's markers, beside the options
    loss = schedule.loss_options(opts.loss)  # checked now, before the caches are filled
    # Samples and fidelity images are drawn with the schedule the run trains with (a copy: the loaded one stays).
    models = dataclasses.replace(models, scheduler_config=schedule.scheduler_config(models.scheduler_config))

    # 4. Caches: each image and caption is encoded once (and reused across runs with *_to_disk).
    fill_caches(opts.caching, models, dataset, accelerator, wdtype, keep_on_device=opts.model.highvram)

    # 5. The U-Net on the device and the LLLite network: fresh, or continued from --network_weights.
    unet = prepare_unet(models, opts.model, opts.attention, wdtype, accelerator.device)
    if not opts.caching.latents:
        models.vae.to(accelerator.device)
    if not opts.caching.text:
        for te in (models.text_encoder1, models.text_encoder2):
            te.to(accelerator.device, dtype=wdtype)
    network = create_network(opts.network, models.unet)

    # 6. Train.
    resolution = opts.data.datasets[0].resolution
    drawer = meter = None
    if opts.samples.prompts:
        drawer = SampleDrawer(opts.samples, models, accelerator, opts.saving.output_dir / "sample",
                              opts.saving.output_name, resolution, opts.run.seed, opts.data.text_encoding)
    if opts.fidelity.items:
        meter = FidelityMeter(opts.fidelity, models, accelerator, resolution, opts.samples.sampler,
                              opts.data.text_encoding)
    dataloader = create_dataloader(dataset, num_workers=opts.data.num_workers, persistent_workers=opts.data.persistent_workers)
    start_trackers(accelerator, opts.tracking)
    uploader = make_uploader(opts.hub, opts.saving.output_dir, accelerator)
    try:
        final = Trainer(opts, accelerator, models, unet, network, dataloader, resolution,
                        combine_hooks(drawer, meter), uploader=uploader, loss=loss, resume_from=resume_from).run()
    except BaseException:
        if uploader is not None:
            uploader.close(report=False)  # what was saved before the failure still goes up; the failure is the news
        raise
    if uploader is not None:
        uploader.close()  # waits for background uploads; a failed one ends the run with a clear error
    if accelerator.is_main_process:
        logger.info("done: %s", final)


if __name__ == "__main__":
    run_cli(main)
