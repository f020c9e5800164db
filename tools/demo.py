"""The whole LLLite story on the bundled tiny SDXL, in a few minutes on a CPU.

    python tools/demo.py [--out demo_output]

1. builds a canny LLLite dataset the recommended way: images drawn by the base model itself, with
   captions and a dataset TOML whose subset makes the canny guides in the data pipeline
   (``conditioning_preprocessor = "canny"``); held-out guides are drawn the same way;
2. trains an LLLite with the real training script and a TOML config, which measures control
   fidelity on the held-out guides as it trains (``--fidelity_guides``) and logs it to TensorBoard;
3. generates on the held-out guides with and without the LLLite;
4. writes a side-by-side grid (guide | without | with), the fidelity curve read back from the
   TensorBoard logs, and prints the edge-F1 fidelity numbers.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from library.console_logging import take_over_console, tool_console  # noqa: E402

take_over_console()  # before any third-party import: some libraries log while being imported

from library.atomic_io import atomic_save_image, atomic_write_text  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402

logger = logging.getLogger("tools.demo")
DEFAULT_MODEL = ROOT / "models" / "tiny_sdxl" / "tiny_sdxl.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="folder for everything the demo writes")
    p.add_argument("--ckpt", default=str(DEFAULT_MODEL), help="base model (default: the bundled tiny SDXL)")
    # More images make the LLLite override the prompt less (measured, 600 steps from timestep 300 with
    # the output blocks: outputs with the prompt's colour and shape 44% with 96 images, 56% with 192
    # and 384, against 78% without the LLLite; edge F1 2.04x, 1.85x and 1.99x the baseline).
    p.add_argument("--train_images", type=int, default=384, help="images the base model draws for the dataset")
    p.add_argument("--eval_images", type=int, default=32, help="held-out guides")
    p.add_argument("--size", type=int, default=None, help="image size (default: the size the bundled model draws)")
    p.add_argument("--gen_steps", type=int, default=20, help="sampling steps when drawing")
    p.add_argument("--scale", type=float, default=5.0, help="CFG scale when drawing")
    p.add_argument("--sampler", default="euler", help="sampler when drawing")
    p.add_argument("--train_steps", type=int, default=600, help="LLLite training steps")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    # Where the shape goes is decided in the noisier steps; at the end the layout is already in the
    # latent and a control image has little to add. The tiny model paints the shape in its decoder,
    # so the demo also trains modules on the output blocks. Edge F1 / baseline on a 96-image demo
    # dataset (32 guides, 600 steps), input and middle blocks only: 1.35x from timestep 500 (an earlier model
    # build: 1.03x with all timesteps, 1.26x from 300). With the output blocks: 1.65x with all
    # timesteps, 1.74x from 200, 2.04x from 300 (1.87x with another training seed), 1.98x from 400,
    # 1.89x from 500; 900 steps from 300 gave 1.88x.
    p.add_argument("--min_timestep", type=int, default=300, help="lowest training timestep (0 = all)")
    p.add_argument("--fidelity_every", type=int, default=100,
                   help="measure control fidelity on the held-out guides every N training steps (and before the first)")
    p.add_argument("--no_output_blocks", action="store_true",
                   help="train the layout of published files (input and middle blocks only); controls less here")
    p.add_argument("--network_dim", type=int, default=64)
    p.add_argument("--cond_emb_dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    return p


def draw_images(models, captions: list[str], out_dir: Path, first_seed: int, args, batch: int = 8) -> list[Path]:
    """Let the base model draw one image per caption; write ``NNNN.png`` + ``NNNN.txt``."""
    from tqdm.auto import tqdm

    from library.generation.pipeline import GenerationRequest, generate

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    bar = tqdm(total=len(captions), desc=f"drawing {out_dir.name}", unit="image")
    for start in range(0, len(captions), batch):
        requests = [
            GenerationRequest(prompt=c, width=args.size, height=args.size, steps=args.gen_steps, scale=args.scale,
                              sampler=args.sampler, seed=first_seed + start + k)
            for k, c in enumerate(captions[start:start + batch])
        ]
        for k, image in enumerate(generate(models, [], requests, progress=False)):
            i = start + k
            path = out_dir / f"{i:04d}.png"
            atomic_save_image(image, path, "the training image")
            atomic_write_text(out_dir / f"{i:04d}.txt", captions[i], "the caption")
            paths.append(path)
        bar.update(len(requests))
    bar.close()
    return paths


MIN_EDGE_FRACTION = 0.005  # of the pixels; a canny map with fewer edges gives no shape to follow


CANNY = {"low_threshold": 100, "high_threshold": 200}  # the training pipeline's and the held-out guides' canny


def has_clear_edges(canny_rgb) -> bool:
    from library.evaluation.metrics import guide_edge_map

    return bool(guide_edge_map(canny_rgb).mean() >= MIN_EDGE_FRACTION)


def keep_with_edges(canny_paths: list[Path], n: int) -> list[Path]:
    """The first ``n`` canny maps with at least MIN_EDGE_FRACTION edge pixels.

    The base model sometimes draws a faint shape whose outline canny does not pick up; such a pair
    teaches nothing and such a guide measures nothing.
    """
    from library.data.conditioning_preprocessors import load_image_rgb

    kept = [p for p in canny_paths if has_clear_edges(load_image_rgb(p))]
    if len(kept) < n:
        logger.warning("only %d of %d drawn images have clear edges (wanted %d)", len(kept), len(canny_paths), n)
    return kept[:n]


def drop_images_without_edges(images: list[Path]) -> list[Path]:
    """Remove the drawn training images (and captions) whose canny guide would be nearly empty.

    The pipeline makes the guides while training; this runs the same canny on the same 64x64 image
    once beforehand, only to choose the images.
    """
    from library.data.conditioning_preprocessors import canny, load_image_rgb

    kept = []
    for image in images:
        if has_clear_edges(canny(load_image_rgb(image), **CANNY)):
            kept.append(image)
        else:
            image.unlink()
            image.with_suffix(".txt").unlink()
    return kept


def write_configs(work: Path, args) -> Path:
    dataset = work / "dataset.toml"
    atomic_write_text(dataset, f"""[general]
caption_extension = ".txt"

[[datasets]]
resolution = {args.size}
batch_size = {args.batch_size}

  [[datasets.subsets]]
  image_dir = "{(work / 'dataset' / 'images').as_posix()}"
  conditioning_preprocessor = "canny"
  conditioning_preprocessor_args = {{ low = {CANNY['low_threshold']}, high = {CANNY['high_threshold']} }}
""", "the dataset config")
    train = work / "train.toml"
    atomic_write_text(train, f"""pretrained_model_name_or_path = "{Path(args.ckpt).as_posix()}"
dataset_config = "{dataset.as_posix()}"
output_dir = "{(work / 'lllite').as_posix()}"
output_name = "demo_canny"
network_dim = {args.network_dim}
cond_emb_dim = {args.cond_emb_dim}
include_output_blocks = {str(not args.no_output_blocks).lower()}
learning_rate = {args.learning_rate}
lr_scheduler = "cosine"
lr_warmup_steps = {max(1, args.train_steps // 20)}
max_train_steps = {args.train_steps}
min_timestep = {args.min_timestep}
optimizer_type = "AdamW"
seed = {args.seed}
cache_latents = true
cache_text_encoder_outputs = true
max_data_loader_n_workers = 0
save_model_as = "safetensors"
logging_dir = "{(work / 'logs').as_posix()}"
log_prefix = "demo_"
fidelity_guides = "{(work / 'eval' / 'guides').as_posix()}"
sample_every_n_steps = {args.fidelity_every}
sample_at_first = true
sample_sampler = "{args.sampler}"
fidelity_steps = {args.gen_steps}
fidelity_scale = {args.scale}
fidelity_seed = {eval_seed(args)}
""", "the training config")
    return train


def eval_seed(args) -> int:
    """Guide i is drawn with this + i, in the final evaluation and in every measurement while training."""
    return args.seed + 200_000


def read_fidelity_curve(log_dir: Path) -> list[dict]:
    """The fidelity figures the training script logged, read back from its TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(log_dir.glob("demo_*/lllite_control_net_train"))
    if not runs:
        raise UserError(f"no TensorBoard run in {log_dir}: the training script logged nothing")
    acc = EventAccumulator(str(runs[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    series = {tag.removeprefix("fidelity/"): {e.step: e.value for e in acc.Scalars(tag)}
              for tag in acc.Tags()["scalars"] if tag.startswith("fidelity/")}
    return [{"step": step, **{name: values[step] for name, values in series.items() if step in values}}
            for step in sorted(series["edge_f1"])]


def plot_fidelity_curve(curve: list[dict], out: Path, reference_f1: float | None = None) -> None:
    """Edge F1 on the held-out guides against training steps: with the LLLite, without, and the reference."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 640, 360, 48, 16, 48, 44
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    steps = [c["step"] for c in curve]
    values = [c["edge_f1"] for c in curve] + [c["edge_f1_base"] for c in curve] + ([reference_f1] if reference_f1 else [])
    tick = 0.05
    n_ticks = max(1, math.ceil(max(values) * 1.05 / tick))
    y_max = n_ticks * tick
    x_max = max(steps) or 1

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (w - left - right) * step / x_max, h - bottom - (h - top - bottom) * value / y_max)

    for i in range(n_ticks + 1):  # horizontal grid and F1 ticks
        v = tick * i
        y = xy(0, v)[1]
        d.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        d.text((6, y - 6), f"{v:.2f}", fill=(60, 60, 60))
    for s in steps:
        x = xy(s, 0)[0]
        d.line([(x, h - bottom), (x, h - bottom + 4)], fill=(60, 60, 60))
        d.text((x - 10, h - bottom + 8), str(s), fill=(60, 60, 60))
    d.rectangle([left, top, w - right, h - bottom], outline=(60, 60, 60))
    d.text((left, 8), "edge F1 on the held-out guides while training (tools/demo.py)", fill=(0, 0, 0))
    d.text((w // 2 - 40, h - 18), "training step", fill=(60, 60, 60))
    lines = [("with the LLLite", [c["edge_f1"] for c in curve], (200, 40, 40)),
             ("without (base model)", [c["edge_f1_base"] for c in curve], (40, 90, 200))]
    for name, ys, colour in lines:
        pts = [xy(s, v) for s, v in zip(steps, ys)]
        d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    legend = lines + ([("reference: img2img from the source", None, (120, 120, 120))] if reference_f1 else [])
    if reference_f1:
        y = xy(0, reference_f1)[1]
        for x in range(left, w - right, 12):  # dashed
            d.line([(x, y), (min(x + 6, w - right), y)], fill=(120, 120, 120), width=2)
    x = left
    for name, _, colour in legend:  # one row between the title and the plot
        d.line([(x, 32), (x + 20, 32)], fill=colour, width=2)
        d.text((x + 26, 26), name, fill=(0, 0, 0))
        x += 26 + int(d.textlength(name)) + 24
    atomic_save_image(img, out, "the fidelity curve")


def make_grid(items, image_dir: Path, out: Path, size: int, rows_per_column: int = 8) -> None:
    """Guide | without LLLite | with LLLite, one row per guide, in side-by-side groups of ``rows_per_column``."""
    from PIL import Image, ImageDraw

    pad, header = 4, 14
    group_w = 3 * size + 4 * pad
    groups = max(1, -(-len(items) // rows_per_column))
    rows = min(len(items), rows_per_column)
    grid = Image.new("RGB", (groups * group_w, header + rows * (size + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for g in range(groups):
        for c, title in enumerate(("guide", "without", "with LLLite")):
            draw.text((g * group_w + pad + c * (size + pad), 2), title, fill=(0, 0, 0))
    for i, item in enumerate(items):
        x0 = (i // rows_per_column) * group_w
        y = header + pad + (i % rows_per_column) * (size + pad)
        cells = [item.guide, image_dir / f"{item.guide.stem}_m0.png", image_dir / f"{item.guide.stem}_m1.png"]
        for c, path in enumerate(cells):
            tile = Image.open(path).convert("RGB").resize((size, size), Image.NEAREST)
            grid.paste(tile, (x0 + pad + c * (size + pad), y))
    atomic_save_image(grid, out, "the demo grid")


def prompt_fidelity(items, image_dir: Path, multipliers) -> dict:
    """Per multiplier (as named in evaluate_control's results), the share of outputs with the prompt's
    colour, shape and both.

    Edge F1 only says whether the outline follows the guide; an LLLite can raise it and still
    override what the prompt asks for. The shapes domain's procedural check measures that side.
    """
    import numpy as np
    from PIL import Image

    from shapes_domain import score_images

    out = {}
    for mult in multipliers:
        images = [np.asarray(Image.open(image_dir / f"{i.guide.stem}_m{mult}.png").convert("RGB")) for i in items]
        scores = score_images(images, [i.prompt for i in items])
        out[mult] = {k: scores[k] for k in ("colour", "shape", "both")}
    return out


def peak_memory_gb() -> float:
    """The larger peak resident memory of this process and of the training script it ran (Linux reports KiB)."""
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return peak * 1024 / 1e9


def run_demo(args) -> dict:
    import torch

    from library.data.conditioning_preprocessors import convert_folder
    import shapes_domain
    from library.evaluation.control_eval import (
        EvalItem,
        EvalSettings,
        evaluate_control,
        format_table,
        write_json,
    )
    from library.sdxl.loading import load_sdxl
    from networks.control_net_lllite import ControlNetLLLite

    if not Path(args.ckpt).is_file():
        raise UserError(f"base model not found: {args.ckpt}. Rebuild it with `python tools/build_tiny_sdxl.py` "
                        "or give --ckpt")
    # One thread: on a small machine that is busy with anything else, two OpenMP threads wait on
    # each other and a step can take 20x longer (measured here: 0.28 s vs 7.5 s per training step).
    torch.set_num_threads(1)
    if args.size is None:
        args.size = shapes_domain.IMAGE_SIZE
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = load_sdxl(args.ckpt)

    # 1. The dataset: the base model draws the images; the training pipeline makes their canny guides.
    logger.info("step 1/4: the base model draws %d training images and the held-out guides", args.train_images)
    _, captions, _ = shapes_domain.generate(args.train_images, seed=args.seed, combinations=shapes_domain.training_combinations())
    images_dir = work / "dataset" / "images"
    drawn = draw_images(models, captions, images_dir, first_seed=args.seed, args=args)
    kept = drop_images_without_edges(drawn)
    logger.info("%d of %d drawn images have clear edges and train", len(kept), len(drawn))
    # Held-out guides: other captions and seeds than the training images; the base model draws them.
    candidates = args.eval_images + args.eval_images // 2 + 2  # some drawings have no clear outline
    eval_captions = shapes_domain.evaluation_captions(candidates)
    guide_src = work / "eval" / "drawn"
    draw_images(models, eval_captions, guide_src, first_seed=args.seed + 100_000, args=args)
    all_guides = convert_folder(guide_src, work / "eval" / "guides", "canny", CANNY, overwrite=True)
    guides = keep_with_edges(all_guides, args.eval_images)
    for g in set(all_guides) - set(guides):
        g.unlink()
    items = [EvalItem(g, eval_captions[int(g.stem)], guide_src / g.name) for g in guides]
    for item in items:  # eval/guides is then a guide folder that tools/evaluate_control.py and training take
        atomic_write_text(item.guide.with_suffix(".txt"), item.prompt, "the guide's prompt")
    train_toml = write_configs(work, args)

    # 2. Train with the real training script; it measures fidelity on the held-out guides as it goes.
    logger.info("step 2/4: training the LLLite (%d steps) with sdxl_train_control_net_lllite.py, fidelity every %d "
                "steps", args.train_steps, args.fidelity_every)
    cmd = [sys.executable, str(ROOT / "sdxl_train_control_net_lllite.py"), "--config_file", str(train_toml)]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise UserError(f"training failed (exit code {res.returncode}); its messages are above")
    lllite_path = work / "lllite" / "demo_canny.safetensors"

    # 3. The held-out guides with and without the trained LLLite, and the reference row.
    logger.info("step 3/4: %d held-out guides, generated with and without the LLLite", len(items))
    network = ControlNetLLLite.from_file(models.unet, lllite_path)
    settings = EvalSettings(width=args.size, height=args.size, steps=args.gen_steps, scale=args.scale,
                            sampler=args.sampler, seed=eval_seed(args))
    results = evaluate_control(models, network, items, settings, (0.0, 1.0), work / "eval" / "generated")

    # 4. The grid, the curve and the numbers.
    grid = work / "grid.png"
    make_grid(items, work / "eval" / "generated", grid, max(args.size, 128))
    results["prompt_fidelity"] = prompt_fidelity(items, work / "eval" / "generated", list(results["mean"]))
    results["fidelity_curve"] = read_fidelity_curve(work / "logs")
    reference = results["reference"]["f1"] if results.get("reference") else None
    plot_fidelity_curve(results["fidelity_curve"], work / "fidelity_curve.png", reference)
    # What README.md quotes about the run itself, measured by the run (tests/test_docs.py checks the README against it).
    results["run"] = {"train_images": args.train_images, "train_steps": args.train_steps, "seconds": round(time.time() - t0),
                      "peak_memory_gb": round(peak_memory_gb(), 2)}
    write_json(results, work / "fidelity.json")
    print("\nControl fidelity on held-out canny guides (edge F1 against Canny of the output):")
    print(format_table(results))
    print("\nMeasured while training (the same guides and settings; TensorBoard logs in "
          f"{work / 'logs'}):\n| step | edge F1 with | without | edge SSIM with | without |\n|---:|---:|---:|---:|---:|")
    for c in results["fidelity_curve"]:
        print(f"| {c['step']} | {c['edge_f1']:.3f} | {c['edge_f1_base']:.3f} | {c['edge_ssim']:.3f} | "
              f"{c['edge_ssim_base']:.3f} |")
    print("\nPrompt fidelity (share of outputs with the prompt's colour / shape / both):")
    print("| multiplier | colour | shape | both |\n|---:|---:|---:|---:|")
    for mult, f in results["prompt_fidelity"].items():
        print(f"| {mult} | {f['colour']:.0%} | {f['shape']:.0%} | {f['both']:.0%} |")
    print(f"\ngrid: {grid}\ncurve: {work / 'fidelity_curve.png'}\nLLLite: {lllite_path}\nfigures: {work / 'fidelity.json'}\n"
          f"total time: {results['run']['seconds']} s, peak memory {results['run']['peak_memory_gb']:.1f} GB")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    tool_console()
    return run_demo(args)


if __name__ == "__main__":
    run_cli(main)
