"""Shared pieces of the benchmark scripts: model configs, inputs, timing, memory and reporting.

The scripts time random-weight models: speed and memory do not depend on the weights, so no
checkpoint is needed. ``--config mid`` is an SDXL-shaped U-Net small enough for a 2-core CPU,
``--config sdxl`` is the real SDXL base U-Net (for a GPU), ``--config tiny`` is the test model
(smoke tests only; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as ``python benchmarks/x.py`` from anywhere
    sys.path.insert(0, str(ROOT))

from library.console_logging import take_over_console  # noqa: E402

take_over_console()  # the console rule, before any third-party import (the float32-modules notice is debug-only)

import torch  # noqa: E402

from library.sdxl.loading import build_unet, bundled_config  # noqa: E402

# Model FLOPs of SDXL's U-Net (2.57 B parameters), per image at 1024x1024:
FWD_TFLOP_1024 = 6.76  # one forward pass
TRAIN_STEP_TFLOP_1024 = 20.0  # forward + backward to activations + recomputed forward (gradient checkpointing)
DEFAULT_PEAK_TFLOPS = 790.0  # the peak our targets use for one H100 (bf16)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIGS = ("mid", "sdxl", "tiny")
DEFAULT_RESOLUTION = {"sdxl": 1024, "mid": 256, "tiny": 64}


def unet_config(name: str) -> dict:
    """The U-Net config of ``name``: ``sdxl``, ``mid`` or ``tiny``."""
    cfg = bundled_config("unet")
    if name == "sdxl":
        return cfg
    if name == "mid":
        # SDXL's layout (3 levels, attention on the last two, 2 resnets per level, 2048-wide text,
        # 64-wide heads where there is attention) at half the width and with 2 instead of 10
        # transformer layers at the deepest level: ~1/12 of the compute per pixel.
        cfg.update(block_out_channels=[160, 320, 640], attention_head_dim=[5, 5, 10],
                   transformer_layers_per_block=[1, 1, 2])
        return cfg
    if name == "tiny":
        from library.sdxl.tiny import tiny_configs

        return tiny_configs()["unet"]
    raise SystemExit(f"unknown --config {name!r}; choose from {', '.join(CONFIGS)}")


def text_dims(cfg: dict) -> tuple[int, int]:
    """(hidden width, pooled width) of the cached text-encoder outputs this U-Net takes."""
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return cfg["cross_attention_dim"], pooled


def build_random_unet(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A frozen, eval-mode U-Net with random weights, initialised directly on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = build_unet(cfg, dtype=torch.float32)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def add_common_args(p: argparse.ArgumentParser, default_repeats: int = 5) -> None:
    p.add_argument("--config", choices=CONFIGS, default="mid",
                   help="U-Net size: mid (CPU, SDXL-shaped, smaller), sdxl (the real one, for a GPU), tiny (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the frozen U-Net (bf16: also autocast, as --mixed_precision bf16 does)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (latents are 1/8); default 1024 for sdxl, 256 for mid, 64 for tiny")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cond_emb_dim", type=int, default=32)
    p.add_argument("--network_dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=default_repeats, help="timed runs per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--tiny", action="store_true", help="smoke test: --config tiny, 64 px, 1 repeat, no warmup, 1 thread")


def resolve_common(args: argparse.Namespace) -> None:
    if args.tiny:
        args.config, args.resolution, args.repeats, args.warmup = "tiny", 64, 1, 0
        args.threads = args.threads or 1  # tiny ops: thread start-up and contention would dominate
    if args.resolution is None:
        args.resolution = DEFAULT_RESOLUTION[args.config]
    if args.resolution % 8:
        raise SystemExit("--resolution must be a multiple of 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.torch_device = torch.device(args.device)
    args.torch_dtype = DTYPES[args.dtype]


# -- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary(times: Sequence[float]) -> dict:
    """Median, min, max (seconds) of a list of timings."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


# -- memory ------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` value in KiB (VmRSS, VmHWM); None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**30


# -- machine and reporting ---------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))


def fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table on stdout (so it can be pasted into docs/benchmarks.md)."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
