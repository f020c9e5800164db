"""Loading a full-size SDXL single file: time, and peak anonymous host memory against the models' size.

A single-file SDXL checkpoint with random weights is written in the plain sgm layout (``--save_dtype``,
fp16 by default: 6.9 GB, 2,513 tensors), once per text-encoder-1 key layout (``text_model`` keys as
transformers 4 writes them, and without ``text_model.`` as tools on transformers 5 write them). Each
file is loaded with ``library.sdxl.loading.load_sdxl`` in each ``--dtypes``, each load in a fresh
process, and then deleted. Only one file exists at a time (about 8 GB of disk with fp16).

Memory is the loading process's anonymous resident memory (``RssAnon`` in ``/proc/<pid>/status``):
what loading really takes from the machine. Pages of the memory-mapped file are left out: they are
page cache, which the kernel can drop at any time. The parent samples it about every millisecond
during the load; the figure is the peak rise above the process's memory before loading (Python,
torch and the libraries), divided by the bytes of the loaded models' parameters and buffers. The
files were just written, so they are read from the page cache (a warm-cache load time).

    python benchmarks/bench_load.py --work_dir /tmp --json load_sdxl.json
    python benchmarks/bench_load.py --work_dir /tmp --modes mmap no_mmap    # also --disable_mmap
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (sets sys.path)
import torch
from common import machine_info, print_table, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TE1_LAYOUTS = ("text_model", "no_text_model")
MODES = ("mmap", "no_mmap")
RATIO_LIMIT = 1.15
GB = 1e9  # decimal gigabytes, as file sizes are quoted


def _status_kib(pid: int | str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- the child processes -----------------------------------------------------------------------


def _configs(config: str) -> dict[str, dict]:
    from library.sdxl.loading import bundled_config
    from library.sdxl.tiny import tiny_configs

    if config == "tiny":
        return tiny_configs()
    return {c: bundled_config(c) for c in ("unet", "vae", "text_encoder", "text_encoder_2")}


def write_random_checkpoint(path: Path, config: str, te1_layout: str, save_dtype: torch.dtype, seed: int = 0) -> int:
    """Write an SDXL single file with random weights (N(0, 0.02)); returns the number of tensors.

    The key names and shapes come from the real models built on the meta device (no memory), so only
    the written tensors themselves are ever held.
    """
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.sdxl import keys as sdxl_keys
    from library.sdxl.loading import (
        build_text_encoder,
        build_unet,
        build_vae,
        sgm_state_dict,
    )
    from library.sdxl.weights_io import write_weights

    cfg = _configs(config)
    with init_empty_weights():
        models = (
            build_unet(cfg["unet"]),
            build_vae(cfg["vae"]),
            build_text_encoder(cfg["text_encoder"], CLIPTextModel),
            build_text_encoder(cfg["text_encoder_2"], CLIPTextModelWithProjection),
        )
    shapes = {k: v.shape for k, v in sgm_state_dict(*models).items()}
    del models
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    te1 = sdxl_keys.TE1_PREFIX + "text_model."
    for key, shape in shapes.items():
        if te1_layout == "no_text_model" and key.startswith(te1):
            key = sdxl_keys.TE1_PREFIX + key[len(te1):]
        tensors[key] = torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=g).to(save_dtype)
    write_weights(path, tensors)
    return len(tensors)


def _child_load(path: str, dtype: str, disable_mmap: bool) -> None:
    """Runs in a fresh process: reports its memory before loading, waits for the parent, loads, reports."""
    import itertools

    from library.sdxl.loading import load_sdxl

    baseline = _status_kib("self", "RssAnon")
    print(json.dumps({"ready": True, "baseline_anon_kib": baseline}), flush=True)
    sys.stdin.readline()  # the parent samples from here on
    t0 = time.perf_counter()
    models = load_sdxl(path, dtype=DTYPES[dtype], disable_mmap=disable_mmap)
    seconds = time.perf_counter() - t0
    parts = (models.unet, models.vae, models.text_encoder1, models.text_encoder2)
    size = sum(t.numel() * t.element_size() for m in parts for t in itertools.chain(m.parameters(), m.buffers()))
    params = sum(p.numel() for m in parts for p in m.parameters())
    print(json.dumps({
        "load_s": seconds,
        "models_bytes": size,
        "parameters": params,
        "baseline_anon_kib": baseline,
        "after_anon_kib": _status_kib("self", "RssAnon"),
        "vm_hwm_kib": _status_kib("self", "VmHWM"),
    }), flush=True)


# -- the parent --------------------------------------------------------------------------------


def _run(args: list[str], threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


def measure_load(path: Path, dtype: str, disable_mmap: bool, threads: int, interval_s: float = 0.001) -> dict:
    """Load ``path`` in a fresh process, sampling its anonymous memory from outside."""
    args = ["--_child_load", str(path), "--dtypes", dtype, "--threads", str(threads)] + (["--_disable_mmap"] if disable_mmap else [])
    proc = _run(args, threads)
    ready = json.loads(proc.stdout.readline())
    proc.stdin.write("go\n")
    proc.stdin.flush()
    peak, samples = ready["baseline_anon_kib"], 0
    while proc.poll() is None:
        value = _status_kib(proc.pid, "RssAnon")
        if value is not None:
            peak, samples = max(peak, value), samples + 1
        time.sleep(interval_s)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        raise SystemExit(f"loading {path} in {dtype} failed (exit status {proc.returncode})")
    result = json.loads(out[-1])
    rise = (peak - result["baseline_anon_kib"]) * 1024
    result.update(peak_anon_kib=peak, samples=samples, peak_anon_rise_bytes=rise, ratio=rise / result["models_bytes"])
    return result


def build_parser() -> argparse.ArgumentParser:
    """The options, for main and for tests that parse a documented command without running it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="/tmp", help="where the checkpoint is written (and deleted afterwards)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"], help="load dtypes")
    p.add_argument("--te1_layouts", nargs="+", choices=TE1_LAYOUTS, default=list(TE1_LAYOUTS),
                   help="text encoder 1 key layouts to write (with / without 'text_model.')")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["mmap"],
                   help="mmap (default loading) and/or no_mmap (disable_mmap=True)")
    p.add_argument("--save_dtype", choices=list(DTYPES), default="fp16", help="dtype of the written file")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in the loading process")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--tiny", action="store_true", help="smoke test: the tiny test model instead of full-size SDXL")
    p.add_argument("--_child_load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_disable_mmap", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_child_write", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_layout", default="text_model", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    config = "tiny" if args.tiny else "sdxl"

    torch.set_num_threads(args.threads)
    if args._child_load:
        _child_load(args._child_load, args.dtypes[0], args._disable_mmap)
        return {}
    if args._child_write:
        n = write_random_checkpoint(Path(args._child_write), "tiny" if args.tiny else "sdxl", args._layout, DTYPES[args.save_dtype])
        print(json.dumps({"tensors": n}), flush=True)
        return {}

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from library.sdxl.loading import bundled_config  # noqa: F401  (fail early on a broken checkout)

    rows, cases = [], []
    for layout in args.te1_layouts:
        path = work / f"bench_load_{config}_{layout}.safetensors"
        free = shutil.disk_usage(work).free
        if not args.tiny and free < 8 * GB * DTYPES[args.save_dtype].itemsize / 2:
            raise SystemExit(f"{work} has {free / GB:.1f} GB free; the {args.save_dtype} checkpoint needs about "
                             f"{7 * DTYPES[args.save_dtype].itemsize / 2:.0f} GB. Give --work_dir on a larger disk.")
        t0 = time.perf_counter()
        # Written in a separate process so that this one stays small while the loads are measured.
        writer = _run(["--_child_write", str(path), "--_layout", layout, "--save_dtype", args.save_dtype,
                       "--threads", str(args.threads)] + (["--tiny"] if args.tiny else []), args.threads)
        writer.stdin.close()
        out = writer.stdout.read().strip().splitlines()
        if writer.wait() != 0 or not out:
            raise SystemExit(f"writing {path} failed (exit status {writer.returncode})")
        tensors = json.loads(out[-1])["tensors"]
        file_bytes = path.stat().st_size
        print(f"wrote {path} ({layout}): {tensors} tensors, {file_bytes / GB:.2f} GB in {time.perf_counter() - t0:.0f} s",
              flush=True)
        try:
            for dtype in args.dtypes:
                for mode in args.modes:
                    need = file_bytes / DTYPES[args.save_dtype].itemsize * DTYPES[dtype].itemsize * RATIO_LIMIT + 1 * GB
                    avail = _mem_available_bytes()
                    if not args.tiny and avail is not None and avail < need:
                        print(f"skipped {layout} {dtype} {mode}: {avail / GB:.1f} GB available, about {need / GB:.1f} GB needed")
                        continue
                    r = measure_load(path, dtype, mode == "no_mmap", args.threads)
                    r.update(te1_layout=layout, dtype=dtype, mode=mode, file_bytes=file_bytes, tensors=tensors)
                    cases.append(r)
                    rows.append([layout, dtype, mode, f"{r['load_s']:.1f}", f"{r['models_bytes'] / GB:.2f}",
                                 f"{r['peak_anon_rise_bytes'] / GB:.2f}", f"{r['ratio']:.3f}",
                                 f"{r['peak_anon_kib'] * 1024 / GB:.2f}", f"{r['after_anon_kib'] * 1024 / GB:.2f}"])
                    print(f"  {dtype} {mode}: {r['load_s']:.1f} s, peak anon +{r['peak_anon_rise_bytes'] / GB:.2f} GB "
                          f"for {r['models_bytes'] / GB:.2f} GB of models (ratio {r['ratio']:.3f})", flush=True)
        finally:
            if not args.keep:
                path.unlink(missing_ok=True)

    over = [c for c in cases if c["ratio"] > RATIO_LIMIT]
    results = {
        "benchmark": "load",
        "config": config,
        "machine": machine_info(torch.device("cpu")),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "ratio_limit": RATIO_LIMIT,
        "cases": cases,
    }
    print(f"\n# load_sdxl, {config} single file saved in {args.save_dtype}, {args.threads} thread(s); GB = 10^9 bytes")
    print_table(["text encoder 1 keys", "load dtype", "read", "load s", "models GB", "peak anon rise GB",
                 "ratio", "peak anon GB", "anon after load GB"], rows)
    if args.tiny:
        print("\n(tiny model: fixed costs such as the tokenizers dominate; ratios are not judged)")
    else:
        print(f"\nratio limit {RATIO_LIMIT}: " + ("all within" if not over else
              "OVER in " + ", ".join(f"{c['te1_layout']}/{c['dtype']}/{c['mode']}" for c in over)))
    results["ok"] = args.tiny or not over
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    res = main()
    sys.exit(0 if not res or res.get("ok", True) else 1)
