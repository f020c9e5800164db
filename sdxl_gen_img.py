#!/usr/bin/env python
"""Generate SDXL images with ControlNet-LLLite models (one or several stacked), LoRA and prompt files.

    python sdxl_gen_img.py --ckpt sdxl.safetensors --control_net_lllite_models canny.safetensors \
        --guide_image_path edges.png --prompt "a castle on a hill --n blurry --d 42" --outdir out

See docs/generation.md for every option and worked examples. The recipe in main():

1. every option is checked and turned into typed objects (library/generation/options.py);
2. the prompt lines and images are read, and every image is planned and checked (library/generation/jobs.py);
3. the output folders are created;
4. only then do the models and networks load (library/generation/model_setup.py) and the images get drawn
   (library/generation/pipeline.py) and saved.

Any mistake a user can fix stops the run with exit code 2 and one line that names it, before step 4.
"""

from __future__ import annotations

import logging

from library.console_logging import ConsoleLogOptions, console_logging, take_over_console

take_over_console()  # before any third-party import: some libraries log while being imported

from library.atomic_io import remove_empty  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402
from library.generation.jobs import (  # noqa: E402
    Job,
    Planner,
    Writer,
    batches,
    check_waiting_settings,
    collect_images,
    read_interactive,
    read_prompt_specs,
)
from library.generation.options import (  # noqa: E402
    GenOptions,
    build_parser,
    options_summary,
    prepare_folders,
    resolve,
)
from library.generation.model_setup import (  # noqa: E402
    LoraMultipliers,
    check_weight_files,
    load_models,
    load_networks,
    pick_device,
    show_meta,
)

logger = logging.getLogger("sdxl_gen_img")


def plan(opts: GenOptions) -> tuple[Planner, list[Job]]:
    """Read the prompt lines and images and plan every image; every check that needs no model happens here."""
    specs = read_prompt_specs(opts.inputs)
    planner = Planner(opts, collect_images(opts.inputs, specs))
    jobs = planner.plan(specs)
    check_waiting_settings(opts, jobs)
    check_weight_files(opts)
    return planner, jobs


def draw(opts: GenOptions, planner: Planner, jobs: list[Job]) -> None:
    """Load the models and networks, then draw and save ``jobs`` and any interactive lines."""
    from library.generation.pipeline import generate
    from library.generation.prompt_lines import parse_prompt_line

    device = pick_device(opts.model.device)
    models = load_models(opts.model, device)
    lllites, loras = load_networks(opts, models, device)
    multipliers = LoraMultipliers(loras, opts.loras)
    writer = Writer(opts.output, options_summary(opts))

    def run(batch_jobs: list[Job]) -> None:
        for batch in batches(batch_jobs, opts.draw.batch_size):
            multipliers.apply(batch[0].request)
            pictures = generate(models, lllites, [j.request for j in batch], device=device,
                                progress=opts.draw.progress, vae_batch_size=opts.draw.vae_batch_size,
                                vae_slices=opts.draw.vae_slices, first_pass=writer.first_pass_saver(batch))
            for job, picture in zip(batch, pictures):
                writer.save(job, picture)

    run(jobs)  # every image was planned first: a bad guide image failed before the first step
    if opts.inputs.interactive:
        for n, line in enumerate(read_interactive(), start=1):
            try:
                run(planner.jobs([parse_prompt_line(line, f"interactive line {n}")]))
            except UserError as e:
                logger.error("%s", e)


def main(argv: list[str] | None = None) -> None:
    args = build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    with console_logging(ConsoleLogOptions.from_args(args)) as log_to_file:
        opts = resolve(args)
        pick_device(opts.model.device)
        planner, jobs = plan(opts)
        created = prepare_folders(opts)
        try:
            log_to_file()
            show_meta(opts)
            draw(opts, planner, jobs)
        except BaseException:
            remove_empty(created)  # a failed run leaves no empty output folder behind
            raise


if __name__ == "__main__":
    run_cli(main)
