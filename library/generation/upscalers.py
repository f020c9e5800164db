"""Upscalers for the highres fix's second pass (highres_fix_upscaler), none of which needs weights.

sd-scripts takes a Python module name here (its ``tools/latent_upscaler.py`` needs a trained weights
file). This project offers the upscalers that need nothing downloaded:

=================  ========================================================================
name               what it does
=================  ========================================================================
``bicubic``        (default) decode, resize the pixels bicubically (torch), encode again
``bilinear``       the same with bilinear resizing
``nearest``        the same with nearest-neighbour resizing (blocky; for pixel-art looks)
``lanczos``        the same with OpenCV's Lanczos-4 resizing (sharpest of the pixel upscalers)
``latent_bilinear``  resize the latents bilinearly, no VAE round trip (= the highres_fix_latents_upscaling option)
``latent_bicubic``   resize the latents bicubically
``latent_nearest``   resize the latents by nearest neighbour
=================  ========================================================================

``--highres_fix_upscaler_args "sharpen=0.5;sharpen_sigma=1.0"`` (sd-scripts' ``key=value;...`` form)
unsharp-masks the resized pixels of a pixel upscaler: ``x + sharpen * (x - gaussian_blur(x, sigma))``.
Latent upscalers take no arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from library.errors import UserError

if TYPE_CHECKING:
    import torch

    from library.generation.vae import VaeRunner

# name -> (space, torch interpolate mode or "lanczos")
UPSCALERS: dict[str, tuple[str, str]] = {
    "bicubic": ("pixel", "bicubic"),
    "bilinear": ("pixel", "bilinear"),
    "nearest": ("pixel", "nearest-exact"),
    "lanczos": ("pixel", "lanczos"),
    "latent_bilinear": ("latent", "bilinear"),
    "latent_bicubic": ("latent", "bicubic"),
    "latent_nearest": ("latent", "nearest-exact"),
}
DEFAULT_UPSCALER = "bicubic"
# argument -> (default, check, what is allowed)
PIXEL_ARGS: dict[str, tuple[float, Callable[[float], bool], str]] = {
    "sharpen": (0.0, lambda v: v >= 0, "a number >= 0 (0: no sharpening)"),
    "sharpen_sigma": (1.0, lambda v: v > 0, "a number > 0 (the blur's sigma in pixels)"),
}


def check_upscaler(name: str, label: str = "") -> str:
    """The upscaler's name, or a UserError that lists the ones there are."""
    if name in UPSCALERS:
        return name
    why = ""
    if "." in name:
        why = (" Python upscaler modules (sd-scripts' tools.latent_upscaler) need a trained weights file and are "
               "not loaded here.")
    if not label:
        from library.cli import option_label
        from library.generation.options import ImageArgs

        label = option_label(ImageArgs, "highres_fix_upscaler")
    raise UserError(f"{label} {name!r} is not an upscaler here: choose one of {', '.join(UPSCALERS)}.{why}")


def parse_upscaler_args(name: str, text: str | None, label: str = "--highres_fix_upscaler_args") -> tuple[tuple[str, float], ...]:
    """``"key=value;key=value"`` checked against what upscaler ``name`` takes."""
    if not text:
        return ()
    space = UPSCALERS[name][0]
    out = []
    for item in (s.strip() for s in text.split(";")):
        if not item:
            continue
        key, sep, raw = (s.strip() for s in item.partition("="))
        if space == "latent":
            raise UserError(f"{label} {text!r}: the latent upscaler {name} takes no arguments; use a pixel upscaler "
                            f"({', '.join(k for k, v in UPSCALERS.items() if v[0] == 'pixel')}) to sharpen")
        if not sep or key not in PIXEL_ARGS:
            raise UserError(f"{label} {text!r}: {item!r} is not key=value with a key of {', '.join(PIXEL_ARGS)}")
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not PIXEL_ARGS[key][1](value):
            raise UserError(f"{label} {text!r}: {key} must be {PIXEL_ARGS[key][2]}, got {raw!r}")
        out.append((key, value))
    return tuple(out)


def _blur(x: torch.Tensor, sigma: float, ksize: int = 0) -> torch.Tensor:
    """Gaussian blur of every (h, w, c) image with OpenCV (torchvision is not a dependency here)."""
    import cv2
    import numpy as np
    import torch

    arr = x.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    blurred = np.stack([cv2.GaussianBlur(np.ascontiguousarray(a), (ksize, ksize), sigma).reshape(a.shape) for a in arr])
    return torch.from_numpy(blurred).permute(0, 3, 1, 2).to(x.device, x.dtype)


def unsharp_mask(x: torch.Tensor, strength: float, sigma: float, ksize: int = 0) -> torch.Tensor:
    """``x + strength * (x - blur(x))``; ``ksize`` 0 lets OpenCV derive the kernel from ``sigma``."""
    return x + strength * (x - _blur(x, sigma, ksize))


def _resize_pixels(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    import torch.nn.functional as F

    if mode != "lanczos":
        return F.interpolate(pixels, size=size, mode=mode, **({} if "nearest" in mode else {"align_corners": False}))
    import cv2
    import numpy as np
    import torch

    arr = pixels.float().permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([cv2.resize(a, (size[1], size[0]), interpolation=cv2.INTER_LANCZOS4) for a in arr])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(pixels.device)


def upscale(name: str | None, args: tuple[tuple[str, float], ...], latents: torch.Tensor, size: tuple[int, int],
            vae: VaeRunner) -> torch.Tensor:
    """The first pass's latents upscaled to the second pass's pixel ``size`` (h, w), as latents."""
    import torch.nn.functional as F

    space, mode = UPSCALERS[name or DEFAULT_UPSCALER]
    latent_size = (size[0] // 8, size[1] // 8)
    if space == "latent":
        extra = {} if "nearest" in mode else {"align_corners": False}
        return F.interpolate(latents.float(), size=latent_size, mode=mode, **extra)
    pixels = _resize_pixels(vae.decode(latents), size, mode)
    settings = {k: default for k, (default, _, _) in PIXEL_ARGS.items()} | dict(args)
    if settings["sharpen"]:
        pixels = unsharp_mask(pixels, settings["sharpen"], settings["sharpen_sigma"])
    return vae.encode(pixels.clamp(-1, 1)).to(latents.device)
