"""Shared code of the SDXL ControlNet-LLLite training and generation scripts.

- ``sdxl``: the base model: loading every checkpoint layout, key maps, weight files, text encoding, LoRA.
- ``data``: dataset TOMLs, image/guide pairing, captions, buckets, caches.
- ``training``: options, the loop, loss, optimizers, saving, trackers (``sdxl_train_control_net_lllite.py``).
- ``generation``: options, planning, the denoising loop and its samplers (``sdxl_gen_img.py``, training samples).
- ``evaluation``: control fidelity (edge F1, SSIM) and the tiny model's procedural check.
- here: what both scripts share (option machinery, errors, safe writes, console logging).
"""

import sys

if sys.version_info < (3, 11):  # tomllib and the rest of the code need 3.11; say so instead of an ImportError
    print(f"error: Python 3.11 is needed (this is {sys.version.split()[0]}); the tests run on 3.11, see README.md",
          file=sys.stderr)
    raise SystemExit(2)
