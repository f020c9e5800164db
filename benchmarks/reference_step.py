"""One bench_memory.py case on sd-scripts' LLLite code, in its own process (run by bench_memory.py).

    python benchmarks/reference_step.py SD_SCRIPTS_CHECKOUT CASE_JSON

Training drives ``networks/control_net_lllite_for_train.py`` as sd-scripts' LLLite trainer does:
``replace_unet_linear_and_conv2d()``, ``SdxlUNet2DConditionModelControlNetLLLite()``,
``apply_lllite``, SDPA, ``prepare_params``, gradient checkpointing with the model in train mode,
``torch.optim.AdamW``, and per step the model called under bf16 autocast with the guide in the
weight dtype, the MSE loss, backward, gradient clipping at 1.0, optimizer step, ``zero_grad``.
The LLLite weights are fp32 unless the case asks for bf16 (sd-scripts' trainer casts the whole
model, LLLite included, to the weight dtype, which is the ``full_bf16`` case). Inference runs
``library/sdxl_original_unet.py`` with ``networks/control_net_lllite.py`` (``apply_to``,
``set_cond_image``) as sd-scripts' generator does.

This file never imports this project's ``library`` package: sd-scripts has one of the same name.
sd-scripts' ``library/utils.py`` imports torchvision, which is not needed here; a stand-in module
with its ``setup_logging`` as a no-op takes its place.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _import_reference(path: str):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
    sys.path.insert(0, path)
    sys.path.insert(1, str(HERE))
    import library  # sd-scripts' package

    utils = types.ModuleType("library.utils")
    utils.setup_logging = lambda *a, **k: None
    sys.modules["library.utils"] = utils
    library.utils = utils


def _sdxl_inputs(torch, batch: int, resolution: int, dtype):
    lat = resolution // 8
    return (torch.randn(batch, 4, lat, lat, dtype=dtype), torch.randn(batch, 77, 2048, dtype=dtype),
            torch.randn(batch, 2816, dtype=dtype))


def train_case(case: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from fake_memory import LiveBytes, count_flops, default_dtype, fake_mode, module_bytes, module_tensors
    from networks import control_net_lllite_for_train as lllite_train

    if case.get("fp8_base"):
        raise SystemExit("sd-scripts' LLLite trainer has no --fp8_base")
    if case["optimizer"].lower() != "adamw":
        raise SystemExit("the reference case runs AdamW only")
    wdtype = torch.bfloat16
    b, res = case["batch"], case["resolution"]
    t0 = time.perf_counter()
    lllite_train.replace_unet_linear_and_conv2d()
    with fake_mode(wdtype):
        unet = lllite_train.SdxlUNet2DConditionModelControlNetLLLite()
        with default_dtype(wdtype if case["full_bf16"] else torch.float32):
            unet.apply_lllite(case["cond_emb_dim"], case["network_dim"], None)
        unet.set_use_sdpa(True)
        params = list(unet.prepare_params())
        if case["gradient_checkpointing"]:
            unet.enable_gradient_checkpointing()
            unet.train()
        else:
            unet.eval()
        opt = torch.optim.AdamW(params, lr=2e-4)
        batch_latents, text, vector = _sdxl_inputs(torch, b, res, torch.float32)  # float32 from the loader
        text, vector = text.to(wdtype), vector.to(wdtype)
        batch_cond = torch.rand(b, 3, res, res, dtype=torch.float32)

        def step():
            latents = batch_latents.to(wdtype)  # batch["latents"].to(dtype=weight_dtype)
            cond = batch_cond.to(wdtype)  # batch["conditioning_images"].to(dtype=weight_dtype)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (b,))
            noisy = (latents + noise).to(wdtype)
            with torch.autocast("cpu", dtype=wdtype):
                pred = unet(noisy, timesteps, text, vector, cond)
            loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean([1, 2, 3]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.get_trainable_params(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        weights = module_bytes(unet)
        counter = LiveBytes()
        counter.track(module_tensors(unet))
        counter.track([batch_latents, text, vector, batch_cond])
        with counter:
            step()
            counter.reset_peak()
            step()
        peak, after, peak_op = counter.peak, counter.live, counter.peak_op
        flops = count_flops(step) if case["flops"] else None
    return {"impl": "sd-scripts", "kind": "train", "peak_bytes": peak, "peak_op": peak_op, "after_step_bytes": after, "weight_bytes": weights,
            "trainable_parameters": sum(p.numel() for p in params), "flops": flops,
            "seconds": time.perf_counter() - t0, **{k: case[k] for k in ("batch", "resolution", "gradient_checkpointing")}}


def infer_case(case: dict) -> dict:
    import torch

    from fake_memory import LiveBytes, count_flops, fake_mode, module_bytes, module_tensors
    from library import sdxl_original_unet
    from networks.control_net_lllite import ControlNetLLLite

    dtype = torch.bfloat16
    res = case["resolution"]
    t0 = time.perf_counter()
    with fake_mode(dtype), torch.no_grad():
        unet = sdxl_original_unet.SdxlUNet2DConditionModel().eval().requires_grad_(False)
        unet.set_use_sdpa(True)
        nets = [ControlNetLLLite(unet, case["cond_emb_dim"], case["network_dim"]) for _ in range(case["n_lllite"])]
        for n in nets:
            n.apply_to()
            n.eval().requires_grad_(False)
        x, text, vector = _sdxl_inputs(torch, 2, res, dtype)
        t = torch.tensor([500, 500])
        guide = torch.rand(1, 3, res, res, dtype=dtype)
        counter = LiveBytes()
        counter.track(module_tensors(unet, *nets))
        counter.track([x, text, vector, t, guide])
        weights = module_bytes(unet, *nets)
        with counter:
            for n in nets:
                n.set_cond_image(guide)
            held = counter.live
            unet(x, t, text, vector)
            unet(x, t, text, vector)
        peak = counter.peak
        flops = count_flops(lambda: unet(x, t, text, vector)) if case["flops"] else None
    return {"impl": "sd-scripts", "kind": "infer", "n_lllite": case["n_lllite"], "peak_bytes": peak, "weight_bytes": weights,
            "held_after_embedding_bytes": held, "flops": flops, "seconds": time.perf_counter() - t0}


def main() -> None:
    path, case = sys.argv[1], json.loads(sys.argv[2])
    _import_reference(path)
    result = train_case(case) if case["kind"] == "train" else infer_case(case)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
