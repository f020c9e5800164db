"""Start-up: time to load an SDXL checkpoint, and to build, load and attach an LLLite file.

Without ``--checkpoint``, a single-file checkpoint with random weights is written first (U-Net of
``--config``; for ``mid`` the VAE is SDXL's and the text encoders are the tiny test ones, for
``sdxl`` everything is full size) in ``--save_dtype``, and an LLLite file (C, R) beside it. The
files were just written, so they are in the page cache: the figures are warm-cache load times.

Timed, each ``--repeats`` times (median):

* ``load_checkpoint``: ``library.sdxl.loading.load_sdxl`` (read, convert, build) to the CPU in ``--dtype``;
* ``unet_to_device``: moving that U-Net to ``--device``;
* ``lllite_load_attach``: ``ControlNetLLLite.from_file`` on that U-Net, ``.to(device)``, ``attach()``;
* ``lllite_embed``: ``set_cond_image`` for one guide image (once per image in generation).

    python benchmarks/bench_startup.py
    python benchmarks/bench_startup.py --config sdxl --device cuda --dtype bf16 --checkpoint sd_xl_base_1.0.safetensors
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets sys.path)
import torch
from common import (
    DTYPES,
    add_common_args,
    machine_info,
    print_table,
    resolve_common,
    summary,
    sync,
    unet_config,
    write_json,
)


def write_random_checkpoint(path: Path, config: str, save_dtype: torch.dtype) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.sdxl.loading import (
        build_text_encoder,
        build_unet,
        build_vae,
        bundled_config,
        save_sdxl_single_file,
    )
    from library.sdxl.tiny import tiny_configs

    torch.manual_seed(0)
    unet_cfg = unet_config(config)
    if config == "sdxl":
        vae_cfg, te1_cfg, te2_cfg = bundled_config("vae"), bundled_config("text_encoder"), bundled_config("text_encoder_2")
    elif config == "mid":
        tiny = tiny_configs()
        vae_cfg, te1_cfg, te2_cfg = bundled_config("vae"), tiny["text_encoder"], tiny["text_encoder_2"]
    else:
        tiny = tiny_configs()
        vae_cfg, te1_cfg, te2_cfg = tiny["vae"], tiny["text_encoder"], tiny["text_encoder_2"]
    models = (
        build_unet(unet_cfg, dtype=save_dtype),
        build_vae(vae_cfg, dtype=save_dtype),
        build_text_encoder(te1_cfg, CLIPTextModel, dtype=save_dtype),
        build_text_encoder(te2_cfg, CLIPTextModelWithProjection, dtype=save_dtype),
    )
    save_sdxl_single_file(path, *models)


def build_parser() -> argparse.ArgumentParser:
    """The options, for main and for tests that parse a documented command without running it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_repeats=3)
    p.add_argument("--checkpoint", default=None, help="an SDXL single file / diffusers folder to load (default: write a random one)")
    p.add_argument("--lllite", default=None, help="an LLLite file to load (default: write a random one for the U-Net)")
    p.add_argument("--save_dtype", choices=("fp32", "bf16", "fp16"), default="fp16",
                   help="dtype of the random checkpoint written when no --checkpoint is given")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    resolve_common(args)
    device, dtype = args.torch_device, args.torch_dtype

    from library.sdxl.loading import load_sdxl
    from networks.control_net_lllite import ControlNetLLLite

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = str(Path(tmp) / f"random_{args.config}.safetensors")
            t0 = time.perf_counter()
            write_random_checkpoint(Path(ckpt), args.config, DTYPES[args.save_dtype])
            print(f"wrote a random {args.config} checkpoint in {time.perf_counter() - t0:.1f} s: "
                  f"{Path(ckpt).stat().st_size / 2**30:.2f} GiB")
        lllite = args.lllite
        times: dict[str, list[float]] = {k: [] for k in ("load_checkpoint", "unet_to_device", "lllite_load_attach", "lllite_embed")}
        guide = torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1
        for r in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            models = load_sdxl(ckpt, dtype=dtype)
            t1 = time.perf_counter()
            unet = models.unet.to(device)
            sync(device)
            t2 = time.perf_counter()
            if lllite is None:
                lllite = str(Path(tmp) / "random_lllite.safetensors")
                ControlNetLLLite(unet, args.cond_emb_dim, args.network_dim).save(lllite)
            sync(device)
            t3 = time.perf_counter()
            net = ControlNetLLLite.from_file(unet, lllite, dtype=dtype).to(device).attach()
            sync(device)
            t4 = time.perf_counter()
            with torch.no_grad():
                net.set_cond_image(guide.to(device))
            sync(device)
            t5 = time.perf_counter()
            if r >= args.warmup:
                for k, dt in zip(times, (t1 - t0, t2 - t1, t4 - t3, t5 - t4)):
                    times[k].append(dt)
            net.detach()
            del net, unet, models
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        lllite_size = Path(lllite).stat().st_size
        ckpt_size = Path(ckpt).stat().st_size if Path(ckpt).is_file() else None

    results = {
        "benchmark": "startup",
        "machine": machine_info(device),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("torch_")},
        "checkpoint_bytes": ckpt_size,
        "lllite_bytes": lllite_size,
        "times": {k: summary(v) for k, v in times.items()},
    }
    print(f"# start-up, --config {args.config}, {args.dtype} on {args.device}, LLLite C={args.cond_emb_dim} "
          f"R={args.network_dim} ({lllite_size / 2**20:.1f} MiB), median of {args.repeats} after {args.warmup} warm-up")
    print_table(["phase", "median s", "min-max s"],
                [[k, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}-{s['max_s']:.3f}"] for k, s in results["times"].items()])
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
