"""Shared code of the SDXL ControlNet-LLLite training and generation scripts.

- ``sdxl``: the base model: loading every checkpoint layout, key maps, weight files, text encoding, LoRA.
- ``data``: dataset TOMLs, image/guide pairing, captions, buckets, caches.
- ``training``: options, the loop, loss, optimizers, saving, trackers (``sdxl_train_control_net_lllite.py``).
- ``generation``: options, planning, the denoising loop and its samplers (``sdxl_gen_img.py``, training samples).
- ``evaluation``: control fidelity (edge F1, SSIM) and the tiny model's procedural check.
- here: what both scripts share (option machinery, errors, safe writes, console logging).
"""
