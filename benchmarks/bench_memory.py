"""Peak memory and FLOPs of a full-size training step and inference step, counted on fake tensors (no GPU).

Every tensor is a ``FakeTensor`` (shape, dtype, strides, no data), so the full SDXL U-Net runs a
training step on a CPU in about half a minute with nothing computed or allocated. The count is the
peak of live tensor storage bytes over the step (``fake_memory.LiveBytes``): what the GPU's caching
allocator must hold at least. Not in it: the CUDA context, cuBLAS/cuDNN workspaces and allocator
rounding (docs/benchmarks.md states the allowance it adds for them).

Training runs the trainer's own code: ``library.training.models`` prepares the U-Net (attention,
``--fp8_base``, gradient checkpointing) and creates the network, accelerate's ``Accelerator``
prepares it as in the trainer (bf16 autocast on the network's forward), and each step is
``Trainer.micro_step`` (``compute_loss``, backward, gradient clipping, optimizer and scheduler
step). Left out: the device move (fake parameters cannot be moved; everything is built where it
runs) and the host-side loss check (fake tensors have no values). The second step is measured, so
the optimizer state exists; FLOPs are counted (``FlopCounterMode``) on a third step, after the
peak is read, because the counter holds tensors.

8-bit optimizers (bitsandbytes) cannot run on fake tensors: their state is counted from the
parameter count (1 byte per value for each of their states, plus one fp32 scale per block of 256,
and 32-bit state for tensors under 4096 values, as bitsandbytes does) and added to the peak of a
step whose optimizer keeps no state. The output says so.

With ``--reference PATH`` (a checkout of kohya-ss/sd-scripts) the same cases run on sd-scripts'
LLLite trainer model (``networks/control_net_lllite_for_train.py``) and generation path, each in
its own process (``reference_step.py``), and both are printed side by side with the ratio. The
reference is a benchmark input only. It needs ``einops`` importable.

    python benchmarks/bench_memory.py --reference ~/sd-scripts                   # the defaults below
    python benchmarks/bench_memory.py --batch_sizes 1 2 4 8 12 16 --gradient_checkpointing on --fp8_base both
    python benchmarks/bench_memory.py --tiny                                      # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from library.console_logging import take_over_console  # noqa: E402

take_over_console()  # before any third-party import: some libraries log while being imported

import torch  # noqa: E402

from fake_memory import (  # noqa: E402
    LiveBytes,
    count_flops,
    default_dtype,
    fake_mode,
    module_bytes,
    module_tensors,
)

GIB = 2**30
CONFIGS = ("sdxl", "tiny")
EIGHT_BIT_BLOCK = 256  # bitsandbytes' block size for optimizer state
EIGHT_BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors (min_8bit_size)
EIGHT_BIT_STATES = {"adamw8bit": 2, "pagedadamw8bit": 2, "lion8bit": 1, "pagedlion8bit": 1, "sgdnesterov8bit": 1,
                    "ademamix8bit": 3, "pagedademamix8bit": 3}


def unet_config(name: str) -> dict:
    from library.sdxl.loading import bundled_config

    if name == "tiny":
        from library.sdxl.tiny import tiny_configs

        return tiny_configs()["unet"]
    return bundled_config("unet")


def eight_bit_state_bytes(params, n_states: int) -> int:
    """Bytes of a bitsandbytes 8-bit optimizer's state for ``params`` (counted, not run)."""
    total = 0
    for p in params:
        n = p.numel()
        if n >= EIGHT_BIT_MIN_SIZE:
            total += n_states * (n + 4 * math.ceil(n / EIGHT_BIT_BLOCK))
        else:
            total += n_states * 4 * n
    return total


class NoStateOptimizer(torch.optim.Optimizer):
    """Stands in for an 8-bit optimizer on fake tensors: updates nothing, keeps no state (counted apart)."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def training_batch(cfg: dict, batch: int, resolution: int) -> dict:
    """What the data loader yields with cached latents and text-encoder outputs, at real shapes."""
    from library.training.loop import sdxl_time_ids  # noqa: F401  (the trainer builds time ids from these keys)

    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    lat = resolution // 8
    size = torch.tensor([[resolution, resolution]] * batch, dtype=torch.float32)
    # latents and guides are float32 as the loader yields them; cached text outputs are in the weight dtype
    return {
        "latents": torch.randn(batch, 4, lat, lat, dtype=torch.float32),
        "text_hidden": torch.randn(batch, 77, cfg["cross_attention_dim"]),
        "text_pooled": torch.randn(batch, pooled),
        "original_sizes_hw": size, "crop_top_lefts": torch.zeros(batch, 2), "target_sizes_hw": size.clone(),
        "conditioning_images": torch.rand(batch, 3, resolution, resolution, dtype=torch.float32) * 2 - 1,
        "network_multiplier": 1.0,
    }


def count_training_step(config: str = "sdxl", batch: int = 1, resolution: int = 1024, gradient_checkpointing: bool = True,
                        fp8_base: bool = False, full_bf16: bool = False, optimizer: str = "AdamW",
                        cond_emb_dim: int = 32, network_dim: int = 64, flops: bool = True,
                        include_output_blocks: bool = False, measured_step: int = 2) -> dict:
    """Peak live bytes of step ``measured_step`` (the second: the optimizer state exists) and FLOPs of the
    step after it, of this project's training step on fake tensors."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from library.sdxl.loading import bundled_config
    from library.training import loss as dl
    from library.training.loop import Trainer
    from library.training.models import NetworkOptions, create_network, set_attention, store_weights_in_fp8
    from library.training.optimizers import OptimizerOptions, build_lr_scheduler, build_optimizer, canonical_optimizer

    wdtype = torch.bfloat16
    cfg = unet_config(config)
    eight_bit = EIGHT_BIT_STATES.get(canonical_optimizer(optimizer).lower())
    t0 = time.perf_counter()
    with fake_mode(wdtype):
        # prepare_unet's steps, in its order (the model is built in the weight dtype where it runs)
        unet = UNet2DConditionModel.from_config(cfg).eval().requires_grad_(False)
        set_attention(unet, "sdpa")
        if fp8_base:
            store_weights_in_fp8(unet, wdtype)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # Trainer.__init__: the network in fp32 (bf16 with --full_bf16), attached, in training mode
        with default_dtype(wdtype if full_bf16 else torch.float32):
            network = create_network(NetworkOptions(cond_emb_dim=cond_emb_dim, network_dim=network_dim,
                                                    include_output_blocks=include_output_blocks), unet)
        cond_graph = conditioning_graph_bytes(network, batch, resolution, wdtype)
        network.attach()
        network.train()
        params = [p for p in network.parameters() if p.requires_grad]
        opt_options = OptimizerOptions(name=optimizer)
        opt = NoStateOptimizer(params) if eight_bit else build_optimizer(optimizer, params, opt_options.learning_rate, {})
        acc = Accelerator(mixed_precision="bf16", device_placement=False)
        lr_scheduler = build_lr_scheduler(opt_options, opt, max_steps=10, num_processes=1)
        prepared_net, prepared_opt, prepared_sched = acc.prepare(network, opt, lr_scheduler)
        trainer = types.SimpleNamespace(
            accelerator=acc, network=prepared_net, raw_network=network, models=None, unet=unet,
            noise_scheduler=dl.training_noise_scheduler(bundled_config("scheduler"), False, False),
            loss_opts=dl.LossOptions(), rng=types.SimpleNamespace(generator=torch.Generator().manual_seed(0)),
            device=torch.device("cpu"), wdtype=wdtype, params=params, optimizer=prepared_opt, lr_scheduler=prepared_sched,
            options=types.SimpleNamespace(optimizer=opt_options,
                                          data=types.SimpleNamespace(text_encoding=_text_encoding_options())),
            _pending=_PendingLoss(), check_finite=lambda: None,  # the host-side loss check needs values
        )
        data = training_batch(cfg, batch, resolution)
        weights = module_bytes(unet, network)
        counter = LiveBytes()
        counter.track(module_tensors(unet, network))
        counter.track(v for v in data.values() if isinstance(v, torch.Tensor))
        with counter:
            for step in range(1, measured_step + 1):
                counter.set_phase(f"step {step}")
                counter.reset_peak()
                Trainer.micro_step(trainer, data)
        peak, after, peak_op = counter.peak, counter.live, counter.peak_op
        step_flops = count_flops(lambda: Trainer.micro_step(trainer, data)) if flops else None
    state_8bit = eight_bit_state_bytes(params, eight_bit) if eight_bit else 0
    return {
        "impl": "this project", "kind": "train", "config": config, "batch": batch, "resolution": resolution,
        "cond_emb_dim": cond_emb_dim, "network_dim": network_dim,
        "gradient_checkpointing": gradient_checkpointing, "fp8_base": fp8_base, "full_bf16": full_bf16,
        "optimizer": optimizer, "peak_bytes": peak + state_8bit, "peak_op": peak_op, "after_step_bytes": after + state_8bit,
        "weight_bytes": weights, "conditioning_graph_bytes": cond_graph, "optimizer_state_counted_bytes": state_8bit or None,
        "trainable_parameters": sum(p.numel() for p in params), "flops": step_flops,
        "seconds": time.perf_counter() - t0,
    }


def conditioning_graph_bytes(network, batch: int, resolution: int, autocast_dtype: torch.dtype) -> int:
    """Bytes that all modules' ``conditioning1`` graphs hold for ``batch`` guides under autograd and autocast.

    What embedding every guide before the U-Net call (outside the checkpointed blocks) keeps alive
    until backward, each module with its own autocast copy of the guide. Call inside ``fake_mode``.
    """
    guide = torch.rand(batch, 3, resolution, resolution, dtype=torch.float32)  # as the data loader yields it
    counter = LiveBytes()
    with counter, torch.autocast("cpu", dtype=autocast_dtype):
        before = counter.live
        embeddings = [m.conditioning1(guide) for _, m in network.lllite_modules()]
        held = counter.live - before
    del embeddings
    return held


def _text_encoding_options():
    from library.sdxl.text_encoding import TextEncodingOptions

    return TextEncodingOptions()


class _PendingLoss:
    """The trainer's per-step loss sum, kept on the device (what ``_StepStats.add`` does)."""

    def __init__(self):
        self.total = None

    def add(self, loss: torch.Tensor) -> None:
        self.total = loss.float() if self.total is None else self.total + loss.float()


def count_inference_step(config: str = "sdxl", resolution: int = 1024, n_lllite: int = 1, cond_emb_dim: int = 32,
                         network_dim: int = 64, flops: bool = True) -> dict:
    """Peak live bytes of one CFG denoising step (batch 2) with ``n_lllite`` LLLites, guides embedded once."""
    from diffusers import UNet2DConditionModel

    from library.training.models import set_attention
    from networks.control_net_lllite import ControlNetLLLite

    dtype = torch.bfloat16
    cfg = unet_config(config)
    t0 = time.perf_counter()
    with fake_mode(dtype), torch.no_grad():
        unet = UNet2DConditionModel.from_config(cfg).eval().requires_grad_(False)
        set_attention(unet, "sdpa")
        nets = [ControlNetLLLite(unet, cond_emb_dim, network_dim).eval().requires_grad_(False) for _ in range(n_lllite)]
        for n in nets:
            n.attach()
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        lat = resolution // 8
        x = torch.randn(2, 4, lat, lat)
        hidden = torch.randn(2, 77, cfg["cross_attention_dim"])
        added = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.tensor([[resolution] * 2 + [0, 0] + [resolution] * 2] * 2)}
        guide = torch.rand(1, 3, resolution, resolution, dtype=dtype)
        t = torch.tensor(500)
        counter = LiveBytes()
        counter.track(module_tensors(unet, *nets))
        counter.track([x, hidden, guide, t, *added.values()])
        weights = module_bytes(unet, *nets)
        with counter:
            counter.set_phase("embed guides")
            for n in nets:
                n.set_cond_image(guide)  # once per image
            held = counter.live
            counter.set_phase("denoising step")
            unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added)
            unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added)  # a second step reuses the embeddings
        peak = counter.peak
        step_flops = count_flops(lambda: unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added)) if flops else None
    return {"impl": "this project", "kind": "infer", "config": config, "resolution": resolution, "n_lllite": n_lllite,
            "peak_bytes": peak, "weight_bytes": weights, "held_after_embedding_bytes": held, "flops": step_flops,
            "seconds": time.perf_counter() - t0}


# -- cases, each in its own process ------------------------------------------------------------


def run_case_process(case: dict, reference: str | None) -> dict:
    """One case in a fresh process: counts do not mix, and sd-scripts' ``library`` never meets ours."""
    if case["impl"] == "reference":
        cmd = [sys.executable, str(BENCH / "reference_step.py"), reference, json.dumps(case)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_case", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise SystemExit(f"case {case} failed (exit {proc.returncode}):\n{tail}")


def run_case(case: dict) -> dict:
    c = dict(case)
    kind, c = c.pop("kind"), {k: v for k, v in c.items() if k != "impl"}
    return count_training_step(**c) if kind == "train" else count_inference_step(**c)


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


def _tflop(n) -> str:
    return "n/a" if n is None else f"{n / 1e12:.2f}"


def print_training(rows: list[tuple[dict, dict | None]]) -> None:
    print("\n### Training step (second step: optimizer state exists), counted on fake tensors\n")
    head = ["batch", "grad ckpt", "fp8_base", "full_bf16", "optimizer", "weights GiB", "peak GiB", "above weights GiB",
            "TFLOP/step", "peak at (op)", "conditioning graphs GiB"]
    n_ours = len(head)
    if any(r for _, r in rows):
        head += ["sd-scripts peak GiB", "sd-scripts above weights GiB", "sd-scripts TFLOP/step",
                 "peak ratio", "above-weights ratio", "FLOP ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for ours, ref in rows:
        above = ours["peak_bytes"] - ours["weight_bytes"]
        cells = [ours["batch"], "on" if ours["gradient_checkpointing"] else "off", "on" if ours["fp8_base"] else "off",
                 "on" if ours["full_bf16"] else "off", ours["optimizer"] + (" (state counted)" if ours["optimizer_state_counted_bytes"] else ""),
                 _gib(ours["weight_bytes"]), _gib(ours["peak_bytes"]), _gib(above), _tflop(ours["flops"]),
                 ours["peak_op"], _gib(ours["conditioning_graph_bytes"])]
        if len(head) > n_ours:
            if ref is None or "peak_bytes" not in ref:
                why = (ref or {}).get("note", "not run")
                cells += [why, "", "", "", "", ""]
            else:
                ref_above = ref["peak_bytes"] - ref["weight_bytes"]
                cells += [_gib(ref["peak_bytes"]), _gib(ref_above), _tflop(ref["flops"]),
                          _ratio(ours["peak_bytes"], ref["peak_bytes"]), _ratio(above, ref_above), _ratio(ours["flops"], ref["flops"])]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print("\n\"conditioning graphs\": what all modules' conditioning1 graphs hold for the batch's guides when each "
          "module embeds them under autograd and autocast and keeps the result until backward (embedding before the "
          "U-Net call, outside the checkpointed blocks). Under autograd the embedding now runs inside each block.")
    if any(o["optimizer_state_counted_bytes"] for o, _ in rows):
        print("\n8-bit optimizer: bitsandbytes cannot run on fake tensors; its state is counted from the parameter "
              "count (1 byte per value per state, an fp32 scale per 256 values, 32-bit state under 4096 values) and "
              "added to the peak of a step whose optimizer keeps no state.")


def print_inference(rows: list[tuple[dict, dict | None]]) -> None:
    print("\n### Inference: one denoising step, CFG batch 2, guides embedded once per image\n")
    head = ["LLLites", "weights GiB", "peak GiB", "above weights GiB", "TFLOP/step"]
    if any(r for _, r in rows):
        head += ["sd-scripts peak GiB", "sd-scripts above weights GiB", "sd-scripts TFLOP/step", "peak ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for ours, ref in rows:
        cells = [ours["n_lllite"], _gib(ours["weight_bytes"]), _gib(ours["peak_bytes"]),
                 _gib(ours["peak_bytes"] - ours["weight_bytes"]), _tflop(ours["flops"])]
        if len(head) > 5:
            if ref is None:
                cells += ["not run", "", "", ""]
            else:
                cells += [_gib(ref["peak_bytes"]), _gib(ref["peak_bytes"] - ref["weight_bytes"]), _tflop(ref["flops"]),
                          _ratio(ours["peak_bytes"], ref["peak_bytes"])]
        print("| " + " | ".join(str(c) for c in cells) + " |")


CARDS_GIB = (8, 12, 16, 24)
ALLOWANCE_GIB = 0.75  # CUDA context (0.3-0.8 GiB with current drivers and lazy module loading) and workspaces
ALLOWANCE_SHARE = 0.10  # allocator rounding and fragmentation, as a share of the counted peak
H100_TFLOPS = 790.0  # bf16 peak used by docs/benchmarks.md's targets (benchmarks/common.py)
H100_UTILISATION = 0.30  # the training-speed target's utilisation


def largest_batch(points: dict[int, int], card_gib: float) -> int:
    """Largest batch whose counted peak, plus the allowance, fits ``card_gib``: the line through the counts."""
    (b0, p0), (b1, p1) = min(points.items()), max(points.items())
    slope = (p1 - p0) / (b1 - b0)
    budget = (card_gib - ALLOWANCE_GIB) / (1 + ALLOWANCE_SHARE) * GIB
    if p0 - slope * (b0 - 1) > budget:
        return 0
    return int((budget - (p0 - slope * b0)) // slope)


def print_fits(rows: list[tuple[dict, dict | None]]) -> None:
    """The largest batch per card size, with gradient checkpointing, for each implementation and --fp8_base."""
    series: dict[str, dict[int, int]] = {}
    flops: dict[str, float] = {}
    for ours, ref in rows:
        for r, name in ((ours, "this project"), (ref, "sd-scripts")):
            if not r or "peak_bytes" not in r or not r["gradient_checkpointing"]:
                continue
            key = f"{name}, --fp8_base" if r.get("fp8_base") else name
            series.setdefault(key, {})[r["batch"]] = r["peak_bytes"]
            if r.get("flops"):
                flops.setdefault(key, r["flops"] / r["batch"])
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return
    print(f"\n### What fits: largest batch at {rows[0][0]['resolution']}px with gradient checkpointing\n")
    print(f"Counted peak x {1 + ALLOWANCE_SHARE:.2f} + {ALLOWANCE_GIB} GiB (CUDA context, workspaces, allocator) "
          "must fit the card; the counts lie on a line in the batch size, extended past the largest batch counted.\n")
    head = ["trainer"] + [f"{c} GB card" for c in CARDS_GIB] + ["GiB per extra image", "est. H100 ms/step, batch 1"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for key, points in series.items():
        (b0, p0), (b1, p1) = min(points.items()), max(points.items())
        cells = [key] + [str(largest_batch(points, c)) if largest_batch(points, c) else "does not fit" for c in CARDS_GIB]
        cells.append(f"{(p1 - p0) / (b1 - b0) / GIB:.3f}")
        f = flops.get(key)
        cells.append("n/a" if f is None else f"{f / (H100_TFLOPS * 1e12 * H100_UTILISATION) * 1e3:.0f} (estimate)")
        print("| " + " | ".join(cells) + " |")
    print(f"\nH100 step time: an estimate, not a measurement: counted FLOPs per step at {H100_UTILISATION:.0%} of "
          f"{H100_TFLOPS:.0f} TFLOP/s (bf16). Measured GPU figures: not measured (no GPU was lent).")


def report(train_rows: list, infer_rows: list) -> None:
    first = (train_rows or infer_rows)[0][0]
    net = (f"LLLite C={first.get('cond_emb_dim', 32)} R={first.get('network_dim', 64)} in "
           f"{'bf16' if first.get('full_bf16') else 'fp32'}")
    print(f"\nCounted on fake tensors: {first['config']} U-Net in bf16, {net} under bf16 autocast, "
          f"{first['resolution']}x{first['resolution']}, SDPA attention. Peak = live tensor storage bytes; CUDA context, "
          "workspaces and allocator rounding are not included. GiB = 2^30 bytes.")
    if train_rows:
        print_training(train_rows)
        print_fits(train_rows)
    if infer_rows:
        print_inference(infer_rows)


def build_parser() -> argparse.ArgumentParser:
    """The options, for main and for tests that parse a documented command without running it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, default="sdxl", help="sdxl (full size, the default) or tiny (smoke test)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 1024; 64 for tiny)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--gradient_checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"],
                   help="with and/or without; without runs batch 1 only unless --all_batches_without_checkpointing")
    p.add_argument("--all_batches_without_checkpointing", action="store_true")
    p.add_argument("--fp8_base", choices=("off", "on", "both"), default="off")
    p.add_argument("--full_bf16", action="store_true", help="LLLite weights in bf16 (sd-scripts' trainer always casts them so)")
    p.add_argument("--optimizer", default="AdamW", help="an --optimizer_type name: AdamW, AdamW8bit (state counted), ...")
    p.add_argument("--cond_emb_dim", type=int, default=32)
    p.add_argument("--network_dim", type=int, default=64)
    p.add_argument("--no_inference", action="store_true", help="skip the inference cases")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count (a third step per case)")
    p.add_argument("--flops_all_batches", action="store_true",
                   help="count FLOPs at every batch size (default: the first only; they grow linearly with the batch)")
    p.add_argument("--jobs", type=int, default=1, help="cases counted at once, each in its own process")
    p.add_argument("--reference", metavar="PATH", default=None,
                   help="a kohya-ss/sd-scripts checkout: count the same cases on its LLLite trainer and generation path")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--tiny", action="store_true", help="smoke test: --config tiny, 64 px, batches 1 2")
    p.add_argument("--report", nargs="+", metavar="JSON", default=None,
                   help="print the tables of earlier runs' --json files (together) instead of counting")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)

    if args._case:
        print("RESULT " + json.dumps(run_case(json.loads(args._case))), flush=True)
        return {}
    if args.report:
        loaded = [json.loads(Path(f).read_text()) for f in args.report]
        train = [(r["ours"], r["reference"]) for d in loaded for r in d["train"]]
        infer = [(r["ours"], r["reference"]) for d in loaded for r in d["infer"]]
        report(train, infer)
        return {"train": train, "infer": infer}
    if args.tiny:
        args.config, args.resolution = "tiny", args.resolution or 64
        if args.batch_sizes == [1, 4, 8]:
            args.batch_sizes = [1, 2]
    resolution = args.resolution or (64 if args.config == "tiny" else 1024)
    if resolution % 64:
        raise SystemExit(f"--resolution {resolution}: give a multiple of 64 (the U-Net halves the latents three times)")
    if args.reference and not (Path(args.reference) / "networks" / "control_net_lllite_for_train.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no networks/control_net_lllite_for_train.py there; "
                         "give the folder of a kohya-ss/sd-scripts checkout")
    common = {"config": args.config, "resolution": resolution, "cond_emb_dim": args.cond_emb_dim,
              "network_dim": args.network_dim, "flops": not args.no_flops}
    fp8s = {"off": [False], "on": [True], "both": [False, True]}[args.fp8_base]
    train_cases = []
    for gc in args.gradient_checkpointing:
        batches = args.batch_sizes if gc == "on" or args.all_batches_without_checkpointing else args.batch_sizes[:1]
        for fp8 in fp8s:
            for b in batches:
                train_cases.append(dict(common, kind="train", batch=b, gradient_checkpointing=gc == "on", fp8_base=fp8,
                                        full_bf16=args.full_bf16, optimizer=args.optimizer,
                                        flops=common["flops"] and (b == batches[0] or args.flops_all_batches)))
    infer_cases = [] if args.no_inference else [dict(common, kind="infer", n_lllite=n) for n in (0, 1, 2)]

    t0 = time.perf_counter()
    jobs = []  # (row index, side, case)
    for i, case in enumerate(train_cases + infer_cases):
        jobs.append((i, 0, dict(case, impl="ours")))
        if args.reference and not case.get("fp8_base"):
            jobs.append((i, 1, dict(case, impl="reference")))
    results: dict[tuple[int, int], dict] = {}

    def work(job):
        i, side, case = job
        res = run_case_process(case, args.reference if side else None)
        print(f"counted: {json.dumps(res)}", file=sys.stderr, flush=True)
        return (i, side), res

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for key, res in pool.map(work, jobs):
            results[key] = res
    rows = []
    for i, case in enumerate(train_cases + infer_cases):
        ref = results.get((i, 1))
        if args.reference and case.get("fp8_base"):
            ref = {"note": "n/a: sd-scripts' LLLite trainer has no --fp8_base"}
        rows.append((results[(i, 0)], ref))
    train_rows, infer_rows = rows[:len(train_cases)], rows[len(train_cases):]

    report(train_rows, infer_rows)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    result = {"train": [{"ours": o, "reference": r} for o, r in train_rows],
              "infer": [{"ours": o, "reference": r} for o, r in infer_rows],
              "torch": torch.__version__}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
