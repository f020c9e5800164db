"""The VAE decode with and without ``--vae_slices``: peak memory, time, and how far the image moves.

Memory and time: SDXL's VAE (its published config, random weights) decodes one image at
``--resolution`` through ``library.generation.vae.VaeRunner``, as ``sdxl_gen_img.py`` runs it, once
whole and once for each ``--slices`` count. Each case runs in its own process; on the CPU the
figure is the rise of the peak resident set (VmHWM) over the resident set after set-up, on a GPU
``torch.cuda.max_memory_allocated`` above the memory after set-up.

Difference: random weights make no picture, so the bundled tiny SDXL's trained VAE
(``models/tiny_sdxl``) decodes the latents of a test picture (coloured shapes) at the same size,
whole and in strips, and the pixels are compared in levels of 255.

    python benchmarks/bench_vae_decode.py --threads 1                       # 1024 px, slices 2 4 8 16
    python benchmarks/bench_vae_decode.py --device cuda --resolution 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import common  # noqa: F401  (sets sys.path)
import torch
from common import ROOT, machine_info, print_table, proc_status_kib, timed, write_json

BUNDLED = ROOT / "models" / "tiny_sdxl" / "tiny_sdxl.safetensors"


def _vae(config: str, device: torch.device):
    from library.sdxl.loading import build_vae, bundled_config
    from library.sdxl.tiny import tiny_configs

    torch.manual_seed(0)
    cfg = bundled_config("vae") if config == "sdxl" else tiny_configs()["vae"]
    with torch.device(device):
        vae = build_vae(cfg)
    return vae.eval().requires_grad_(False)


def reset_peak_rss() -> None:
    """Set VmHWM back to the current resident set (Linux: ``5`` to /proc/self/clear_refs), so that the
    peak of building the VAE does not hide the decode's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_case(args: argparse.Namespace, slices: int | None) -> dict:
    """One decode (after one untimed warm-up at 1/4 of the size), in this process."""
    from library.generation.vae import VaeRunner

    device = torch.device(args.device)
    vae = _vae(args.config, device)
    side = args.resolution // 8
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    runner = VaeRunner(vae, slices=slices)
    with torch.no_grad():
        runner.decode(z[:, :, : side // 4, : side // 4])
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        reset_peak_rss()
        rss = proc_status_kib("VmRSS")
        seconds = timed(lambda: runner.decode(z), device)
    out = {"slices": slices, "seconds": seconds}
    if cuda:
        out["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    else:
        hwm = proc_status_kib("VmHWM")
        out["peak_gib"] = None if hwm is None or rss is None else (hwm - rss) / 2**20
    return out


def picture_latents(vae, size: int) -> torch.Tensor:
    """The latents of a test picture: coloured shapes on a gradient, encoded by ``vae``."""
    from PIL import Image, ImageDraw

    from library.generation.pipeline import image_to_tensor
    from library.generation.vae import VaeRunner

    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i, color in enumerate(((230, 30, 30), (30, 160, 60), (40, 60, 220), (240, 200, 40))):
        x, y = (i * 37 % 5) * size // 6, (i * 53 % 5) * size // 6
        draw.ellipse([x, y, x + size // 3, y + size // 4], fill=color)
    with torch.no_grad():
        return VaeRunner(vae).encode(image_to_tensor(image, size, size)[None])


def differences(args: argparse.Namespace) -> list[dict]:
    """Max and mean pixel difference (levels of 255) of each slice count from the whole decode."""
    from library.generation.vae import VaeRunner
    from library.sdxl.loading import load_sdxl

    vae = (load_sdxl(str(BUNDLED)).vae if BUNDLED.is_file() else _vae("tiny", torch.device("cpu"))).eval()
    z = picture_latents(vae, args.resolution)
    with torch.no_grad():
        whole = VaeRunner(vae).decode(z).clamp(-1, 1)
        rows = []
        for n in args.slices:
            d = (VaeRunner(vae, slices=n).decode(z).clamp(-1, 1) - whole).abs() * 127.5
            rows.append({"slices": n, "max_levels": float(d.max()), "mean_levels": float(d.mean())})
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The options, for main and for tests that parse a documented command without running it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("sdxl", "tiny"), default="sdxl", help="the VAE measured for memory and time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (a multiple of 8)")
    p.add_argument("--slices", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny VAE, 128 px, slices 2 4, one process")
    p.add_argument("--_case", type=int, default=None, help=argparse.SUPPRESS)  # child: slices (0 = whole)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.config, args.resolution, args.slices, args.threads = "tiny", 128, [2, 4], args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._case is not None:
        write_json(args._out, run_case(args, args._case or None))
        return {}
    cases = []
    for n in [0, *args.slices]:
        if args.tiny:
            cases.append(run_case(args, n or None))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "case.json")
            child = list(argv if argv is not None else sys.argv[1:]) + ["--_case", str(n), "--_out", out]
            subprocess.run([sys.executable, os.path.abspath(__file__), *child], check=True)
            with open(out) as f:
                cases.append(json.load(f))
    diffs = {d["slices"]: d for d in differences(args)}
    whole = cases[0]
    print(f"# VAE decode of one {args.resolution}x{args.resolution} image, {args.config} VAE (random weights), "
          f"{args.device}, fp32, one process per case; difference: bundled tiny VAE, a test picture")
    label = "peak GPU memory GiB above set-up" if args.device.startswith("cuda") else "CPU peak RSS rise GiB"
    rows = []
    for c in cases:
        d = diffs.get(c["slices"], {})
        peak = c["peak_gib"]
        share = f"{peak / whole['peak_gib'] * 100:.0f} %" if peak is not None and whole["peak_gib"] else "n/a"
        rows.append([c["slices"] or "whole", "n/a" if peak is None else f"{peak:.2f}", share, f"{c['seconds']:.1f}",
                     f"{d['max_levels']:.1f}" if d else "0", f"{d['mean_levels']:.2f}" if d else "0"])
    print_table(["--vae_slices", label, "of whole", "seconds", "max diff (levels)", "mean diff (levels)"], rows)
    results = {"benchmark": "vae_decode", "machine": machine_info(torch.device(args.device)),
               "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "cases": cases, "differences": list(diffs.values())}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
