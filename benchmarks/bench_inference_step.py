"""Inference: time per denoising step at CFG batch 2, plain U-Net vs one and two LLLite models.

One U-Net call with a (2 x batch) latent batch is one denoising step of ``generate`` with CFG.
Every case uses the same U-Net and the same inputs. The cases are timed in interleaved rounds
(plain, one, two, then rotated), so slow drifts of a shared machine hit all cases alike; the
overhead is the median over rounds of (case time / plain time in the same round).

The conditioning embedding is computed once per image, before the steps (as ``generate`` does);
its one-off cost is reported separately.

    python benchmarks/bench_inference_step.py                      # CPU, mid-size U-Net, 256 px
    python benchmarks/bench_inference_step.py --config sdxl --device cuda --dtype bf16 --resolution 1024
"""

from __future__ import annotations

import argparse
import statistics

import common  # noqa: F401  (sets sys.path)
import torch
from common import (
    add_common_args,
    build_random_unet,
    fmt,
    machine_info,
    print_table,
    resolve_common,
    summary,
    text_dims,
    timed,
    unet_config,
    write_json,
)

from networks.control_net_lllite import ControlNetLLLite

CASES = ("plain", "lllite_x1", "lllite_x2")


def make_network(unet, args, seed: int) -> ControlNetLLLite:
    """A random LLLite (non-zero ``up``, so it really changes the output) in the U-Net's dtype, as the generator loads it."""
    torch.manual_seed(seed)
    net = ControlNetLLLite(unet, args.cond_emb_dim, args.network_dim)
    with torch.no_grad():
        for _, m in net.lllite_modules():
            m.up[0].weight.normal_(0, 0.01)
    return net.to(args.torch_device, args.torch_dtype).eval()


def build_parser() -> argparse.ArgumentParser:
    """The options, for main and for tests that parse a documented command without running it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_repeats=9)
    p.add_argument("--channels_last", action="store_true", help="U-Net in channels-last memory format")
    p.add_argument("--torch_compile", action="store_true", help="torch.compile the U-Net (hooks included)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    resolve_common(args)
    device, dtype = args.torch_device, args.torch_dtype

    cfg = unet_config(args.config)
    unet = build_random_unet(cfg, device, dtype)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    nets = [make_network(unet, args, seed=1), make_network(unet, args, seed=2)]

    g = torch.Generator().manual_seed(0)
    b, lat = args.batch, args.resolution // 8
    hid_w, pool_w = text_dims(cfg)
    cfg_batch = 2 * b  # uncond + cond halves
    x = torch.randn(cfg_batch, 4, lat, lat, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    hidden = torch.randn(cfg_batch, 77, hid_w, generator=g).to(device, dtype)
    added = {"text_embeds": torch.randn(cfg_batch, pool_w, generator=g).to(device, dtype),
             "time_ids": torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]] * cfg_batch,
                                      dtype=dtype, device=device)}
    guide = (torch.rand(b, 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device)

    with torch.no_grad():
        embed_times = [timed(lambda: nets[0].set_cond_image(guide), device) for _ in range(max(3, args.warmup + 1))]
        nets[1].set_cond_image(guide)

    model = torch.compile(unet) if args.torch_compile else unet

    def use(case: str) -> None:
        for i, net in enumerate(nets):
            if i < CASES.index(case):
                net.attach()
            else:
                net.detach()

    def step() -> None:
        model(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added)

    times: dict[str, list[float]] = {c: [] for c in CASES}
    ratios: dict[str, list[float]] = {c: [] for c in CASES[1:]}
    with torch.no_grad():
        for c in CASES:
            use(c)
            for _ in range(args.warmup):
                step()
        for r in range(args.repeats):
            order = CASES[r % 3:] + CASES[: r % 3]
            this = {}
            for c in order:
                use(c)
                this[c] = timed(step, device)
                times[c].append(this[c])
            for c in CASES[1:]:
                ratios[c].append(this[c] / this["plain"])
    use("plain")

    # The hooks' own work, without the U-Net around it: each wrapped linear's pre-hook run on the
    # input it gets in a real step. Far less noisy than a difference of two whole steps, so it is
    # what optimisations of the LLLite code are judged by.
    captured: list[tuple[torch.nn.Module, torch.Tensor]] = []
    handles = [t.linear.register_forward_pre_hook(lambda mod, a: captured.append((mod, a[0])))
               for t, _ in nets[0].lllite_modules()]
    with torch.no_grad():
        step()
    for h in handles:
        h.remove()

    def hooks_only() -> None:
        for linear, inp in captured:
            linear._lllite_slot(linear, (inp,))

    hook_times: dict[str, list[float]] = {c: [] for c in CASES[1:]}
    with torch.no_grad():
        for c in CASES[1:]:
            use(c)
            for _ in range(max(2, args.warmup)):
                hooks_only()
        for r in range(args.repeats * 3):
            for c in CASES[1:]:
                use(c)
                hook_times[c].append(timed(hooks_only, device))
    use("plain")
    captured.clear()

    n_modules = len(list(nets[0].lllite_modules()))
    results = {
        "benchmark": "inference_step",
        "machine": machine_info(device),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("torch_")},
        "lllite_modules": n_modules,
        "cond_embedding_once_per_image": summary(embed_times),
        "cases": {},
    }
    rows = []
    for c in CASES:
        entry = {"step": summary(times[c])}
        if c != "plain":
            entry["hooks_alone"] = summary(hook_times[c])
            entry["hooks_alone_share_of_plain_step"] = entry["hooks_alone"]["median_s"] / results["cases"]["plain"]["step"]["median_s"]
            rs = sorted(ratios[c])
            entry["overhead_ratio_median"] = statistics.median(rs)
            entry["overhead_ratio_min"], entry["overhead_ratio_max"] = rs[0], rs[-1]
        results["cases"][c] = entry
        s = entry["step"]
        overhead = ("" if c == "plain" else
                    f"{(entry['overhead_ratio_median'] - 1) * 100:+.1f} % "
                    f"[{(entry['overhead_ratio_min'] - 1) * 100:+.1f}, {(entry['overhead_ratio_max'] - 1) * 100:+.1f}]")
        hooks = ("" if c == "plain" else
                 f"{entry['hooks_alone']['median_s'] * 1000:.1f} ({entry['hooks_alone_share_of_plain_step'] * 100:.1f} %)")
        rows.append([c, f"{s['median_s'] * 1000:.1f}", f"{s['min_s'] * 1000:.1f}-{s['max_s'] * 1000:.1f}", overhead, hooks])

    print(f"# inference step, --config {args.config} {args.resolution}x{args.resolution}, CFG batch {cfg_batch}, "
          f"{args.dtype}, {device}, C={args.cond_emb_dim} R={args.network_dim}, {n_modules} modules/model, "
          f"{args.repeats} interleaved rounds after {args.warmup} warm-up")
    print_table(["case", "median ms/step", "min-max ms", "overhead vs plain: median [min, max] of per-round ratios",
                 "hooks alone: median ms (share of plain step)"], rows)
    print(f"conditioning embedding (once per image, one model): {fmt(results['cond_embedding_once_per_image']['median_s'] * 1000, '.1f')} ms")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
