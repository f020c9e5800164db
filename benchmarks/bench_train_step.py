"""Training: time and peak memory of one step, for the U-Net alone and for the U-Net with LLLite.

The LLLite case is the trainer's step: a frozen U-Net in the weight dtype, the LLLite network in
fp32 (bf16 with ``--full_bf16``), autocast when the weight dtype is half (as accelerate does for
``--mixed_precision bf16``), cached latents and text-encoder outputs (random tensors of the real
shapes), ``library.training.loop.compute_loss`` (noise, timesteps, the ControlNetLLLite forward, the
loss), backward, and an AdamW / AdamW8bit step from ``library.training.optimizers``.

The U-Net-alone case runs the same forward and a backward to the input latents (what a frozen
U-Net costs when something upstream needs gradients), with no optimizer: the difference is what
LLLite adds.

Each case runs in its own process, so that peak memory is that case's alone: on a GPU
``torch.cuda.max_memory_allocated``; on the CPU the rise of the process's peak resident set
(VmHWM in /proc/self/status) over the resident set after set-up, labelled as such.

    python benchmarks/bench_train_step.py --sweep                   # CPU, mid-size, 256 px: gc off/on x unet/lllite
    python benchmarks/bench_train_step.py --config sdxl --device cuda --dtype bf16 --resolution 1024 \\
        --gradient_checkpointing --optimizer adamw8bit --repeats 20 --warmup 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types

import common  # noqa: F401  (sets sys.path)
import torch
from common import (
    DEFAULT_PEAK_TFLOPS,
    TRAIN_STEP_TFLOP_1024,
    add_common_args,
    build_random_unet,
    gib,
    machine_info,
    print_table,
    proc_status_kib,
    resolve_common,
    summary,
    text_dims,
    timed,
    unet_config,
    write_json,
)

MODELS = ("unet", "lllite")


class _UNetOnly:
    """Stands in for the network: the same U-Net call, with gradients flowing back to the input."""

    def __call__(self, cond, unet, sample, *args, **kwargs):
        return unet(sample.detach().requires_grad_(True), *args, **kwargs)


class _Autocast:
    """What accelerate's prepare does to the network's forward under --mixed_precision bf16/fp16."""

    def __init__(self, fn, device_type: str, dtype: torch.dtype | None):
        self.fn, self.device_type, self.dtype = fn, device_type, dtype

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            out = self.fn(*args, **kwargs)
        return types.SimpleNamespace(sample=out.sample.float())


def run_case(args: argparse.Namespace) -> dict:
    """One (model, gradient checkpointing, dtype) case in this process."""
    from library.sdxl.loading import bundled_config
    from library.training import loss as dl
    from library.training.loop import compute_loss
    from library.training.optimizers import build_optimizer
    from networks.control_net_lllite import ControlNetLLLite

    device, wdtype = args.torch_device, args.torch_dtype
    cuda = device.type == "cuda"
    cfg = unet_config(args.config)
    unet = build_random_unet(cfg, device, wdtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)

    optimizer = None
    n_trainable = 0
    if args.model == "lllite":
        net = ControlNetLLLite(unet, args.cond_emb_dim, args.network_dim).to(device)
        if args.full_bf16:
            net.to(wdtype)
        net.attach().train()
        params = [p for p in net.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in params)
        optimizer = build_optimizer(args.optimizer, params, 1e-4, {})
        network = net
    else:
        network = _UNetOnly()
    half = wdtype if wdtype != torch.float32 else None
    network_call = _Autocast(network, device.type, half)
    if args.torch_compile:
        unet = torch.compile(unet, backend=args.dynamo_backend)  # as the trainer's --torch_compile --dynamo_backend

    g = torch.Generator().manual_seed(0)
    b, res = args.batch, args.resolution
    hid_w, pool_w = text_dims(cfg)
    size = torch.tensor([[res, res]] * b, dtype=torch.float32)
    batch = {  # what the cached-latents / cached-text data loader yields
        "latents": torch.randn(b, 4, res // 8, res // 8, generator=g).to(device),
        "text_hidden": torch.randn(b, 77, hid_w, generator=g).to(device),
        "text_pooled": torch.randn(b, pool_w, generator=g).to(device),
        "original_sizes_hw": size, "crop_top_lefts": torch.zeros(b, 2), "target_sizes_hw": size,
        "conditioning_images": (torch.rand(b, 3, res, res, generator=g) * 2 - 1).to(device),
    }
    scheduler = dl.training_noise_scheduler(bundled_config("scheduler"), False, False)
    opts = dl.LossOptions()
    rng = torch.Generator().manual_seed(1)

    def step() -> None:
        loss = compute_loss(batch, None, network_call, unet, scheduler, opts, rng, device, wdtype)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.synchronize(device)
        static = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = proc_status_kib("VmRSS")
    for _ in range(args.warmup):
        step()
    times = [timed(step, device) for _ in range(args.repeats)]
    out = {
        "model": args.model, "gradient_checkpointing": args.gradient_checkpointing, "dtype": args.dtype,
        "compile": args.dynamo_backend if args.torch_compile else None,
        "step": summary(times), "trainable_parameters": n_trainable,
    }
    if cuda:
        out["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
        out["peak_gpu_memory_reserved_gib"] = gib(torch.cuda.max_memory_reserved(device))
        out["static_gpu_memory_gib"] = gib(static)
        if args.config == "sdxl":
            tflop = TRAIN_STEP_TFLOP_1024 * (res * res / 1024**2) * b
            out["model_tflop_per_step"] = tflop
            out["mfu"] = tflop / out["step"]["median_s"] / args.peak_tflops
    else:
        hwm = proc_status_kib("VmHWM")
        if hwm is not None and rss_before is not None:
            out["cpu_peak_rss_rise_gib"] = (hwm - rss_before) / 2**20
            out["cpu_rss_after_setup_gib"] = rss_before / 2**20
    return out


def case_list(args: argparse.Namespace) -> list[dict]:
    gcs = [False, True] if args.sweep else [args.gradient_checkpointing]
    dtypes = args.sweep_dtypes or [args.dtype]
    compiles = [False, True] if args.sweep_compile else [args.torch_compile]
    return [{"model": m, "gradient_checkpointing": gc, "dtype": d, "compile": c}
            for d in dtypes for gc in gcs for m in args.models for c in compiles]


def build_parser() -> argparse.ArgumentParser:
    """The options, for main and for tests that parse a documented command without running it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_repeats=5)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--sweep", action="store_true", help="run with and without gradient checkpointing")
    p.add_argument("--sweep_dtypes", nargs="+", choices=("fp32", "bf16", "fp16"), default=None,
                   help="run each of these weight dtypes (overrides --dtype)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="unet: the U-Net alone; lllite: the U-Net with LLLite (the trainer's step)")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    p.add_argument("--full_bf16", action="store_true", help="LLLite weights in the weight dtype too (--full_bf16)")
    p.add_argument("--peak_tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="the device's peak for MFU (default 790: H100, bf16 dense, as our targets use)")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--torch_compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--dynamo_backend", default="inductor", help="torch.compile backend (as the trainer's --dynamo_backend)")
    p.add_argument("--sweep_compile", action="store_true", help="run each case with and without --torch_compile")
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)  # one case, in a child process
    p.add_argument("--_case_out", help=argparse.SUPPRESS)
    p.add_argument("--_gc", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_compile", type=int, help=argparse.SUPPRESS)
    p.add_argument("--in_process", action="store_true",
                   help="run every case in this process (fast start; peak memory is then not per case)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    resolve_common(args)
    if args.tiny:
        args.in_process = True

    if args.model:  # child: one case
        args.gradient_checkpointing = bool(args._gc)
        if args._compile is not None:
            args.torch_compile = bool(args._compile)
        write_json(args._case_out, run_case(args))
        return {}

    cases = []
    for c in case_list(args):
        if args.in_process:
            sub = argparse.Namespace(**vars(args))
            sub.model, sub.gradient_checkpointing, sub.dtype = c["model"], c["gradient_checkpointing"], c["dtype"]
            sub.torch_compile = c["compile"]
            resolve_common(sub)
            cases.append(run_case(sub))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "case.json")
            # the child parses the same options; the ones after them pick its case (last one wins)
            child = list(argv if argv is not None else sys.argv[1:])
            child += ["--model", c["model"], "--dtype", c["dtype"], "--_gc", str(int(c["gradient_checkpointing"])),
                      "--_compile", str(int(c["compile"])), "--_case_out", out]
            subprocess.run([sys.executable, os.path.abspath(__file__), *child], check=True)
            with open(out) as f:
                cases.append(json.load(f))

    results = {
        "benchmark": "train_step",
        "machine": machine_info(args.torch_device),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith(("torch_", "_")) and k != "model"},
        "cases": cases,
    }
    cuda = args.torch_device.type == "cuda"
    mem_label = "peak GPU memory GiB (max_memory_allocated)" if cuda else "CPU peak RSS rise GiB (VmHWM - VmRSS after set-up)"
    headers = ["model", "grad ckpt", "dtype", "compiled", "median s/step", "min-max s", mem_label]
    if cuda and args.config == "sdxl":
        headers.append(f"MFU ({TRAIN_STEP_TFLOP_1024:g} TFLOP/step at 1024², peak {args.peak_tflops:g} TFLOP/s)")
    rows = []
    for c in cases:
        s = c["step"]
        mem = c.get("peak_gpu_memory_gib") if cuda else c.get("cpu_peak_rss_rise_gib")
        row = [c["model"] if c["model"] == "unet" else "unet+lllite", "on" if c["gradient_checkpointing"] else "off",
               c["dtype"], c.get("compile") or "no", f"{s['median_s']:.3f}", f"{s['min_s']:.3f}-{s['max_s']:.3f}",
               "n/a" if mem is None else f"{mem:.2f}"]
        if "mfu" in c:
            row.append(f"{c['mfu'] * 100:.1f} %")
        rows.append(row)
    print(f"# training step, --config {args.config} {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"{args.device}, optimizer {args.optimizer}, C={args.cond_emb_dim} R={args.network_dim}"
          f"{', full_bf16' if args.full_bf16 else ''}, median of {args.repeats} after {args.warmup} warm-up, "
          f"{'all cases in one process' if args.in_process else 'one process per case'}")
    print_table(headers, rows)
    by = {(c["model"], c["gradient_checkpointing"], c["dtype"], bool(c.get("compile"))): c for c in cases}
    for (m, gc, d, comp), c in by.items():
        base = by.get(("unet", gc, d, comp))
        if m == "lllite" and base:
            print(f"LLLite adds {(c['step']['median_s'] / base['step']['median_s'] - 1) * 100:+.1f} % to the step "
                  f"(grad ckpt {'on' if gc else 'off'}, {d}{', compiled' if comp else ''})")
        plain = by.get((m, gc, d, False))
        if comp and plain:
            print(f"torch.compile ({args.dynamo_backend}): {plain['step']['median_s'] / c['step']['median_s']:.2f}x the "
                  f"speed of the plain step ({m}, grad ckpt {'on' if gc else 'off'}, {d})")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
