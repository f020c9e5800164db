"""Control-fidelity metrics: how closely a generated image follows its guide.

``edge_f1`` is the canny-edge F1 that ControlNet++ reports for canny control: the guide edge map
against the canny edges of the generated image, compared pixel by pixel (no tolerance), so it
rewards edges in exactly the right place. ``ssim`` is computed here with numpy/OpenCV instead of
pulling in scikit-image for one short function.
"""

from __future__ import annotations

import cv2
import numpy as np

from library.data.conditioning_preprocessors import canny
from library.errors import UserError

# SSIM constants of Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_DATA_RANGE = 255.0


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise UserError(
            f"{what}: the images differ in size ({a.shape} vs {b.shape}); "
            "resize the guide to the generated image's size before comparing"
        )


def edge_precision_recall_f1(guide_edges: np.ndarray, generated_edges: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, F1) of ``generated_edges`` against ``guide_edges``; any nonzero pixel is an edge.

    precision = |G n P| / |P|, recall = |G n P| / |G|, F1 = 2PR / (P + R), with G the guide and P the
    generated edges. Edge cases: both maps empty -> (1, 1, 1) (nothing to draw, nothing drawn: a
    perfect match); exactly one empty -> F1 0 (the empty side's precision or recall is taken as 1,
    the other as 0); no overlap -> 0.
    """
    _check_same_shape(guide_edges, generated_edges, "edge F1")
    g = np.asarray(guide_edges) != 0
    p = np.asarray(generated_edges) != 0
    n_g, n_p = int(g.sum()), int(p.sum())
    if n_g == 0 and n_p == 0:
        return 1.0, 1.0, 1.0
    if n_g == 0:
        return 0.0, 1.0, 0.0
    if n_p == 0:
        return 1.0, 0.0, 0.0
    hits = int(np.logical_and(g, p).sum())
    if hits == 0:
        return 0.0, 0.0, 0.0
    precision, recall = hits / n_p, hits / n_g
    return precision, recall, 2 * precision * recall / (precision + recall)


def edge_f1(guide_edges: np.ndarray, generated_edges: np.ndarray) -> float:
    """Binary F1 between two edge maps ([H, W] bool or uint8); see ``edge_precision_recall_f1``."""
    return edge_precision_recall_f1(guide_edges, generated_edges)[2]


def canny_edges(image_rgb: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """[H, W] bool edge map, from the same canny the conditioning tool uses."""
    return canny(image_rgb, low_threshold=low, high_threshold=high)[:, :, 0] > 0


def _to_gray_float(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_RGB2GRAY)
    elif img.ndim != 2:
        raise ValueError(f"expected an [H, W] or [H, W, 3] image, got shape {img.shape}")
    return img.astype(np.float64)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean grayscale SSIM of two equal-size images (uint8 gray [H, W] or RGB [H, W, 3]; bool = 0/255).

    RGB is turned to gray with BT.601 luma. Local statistics use an 11x11 Gaussian window
    (sigma 1.5), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2; the mean is taken over the pixels where
    the whole window fits inside the image (as in the reference implementation), so both sides must
    be at least 11 pixels.
    """
    _check_same_shape(np.asarray(a), np.asarray(b), "SSIM")
    x, y = _to_gray_float(a), _to_gray_float(b)
    if min(x.shape) < SSIM_WINDOW:
        raise UserError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {x.shape}")
    c1 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2
    c2 = (SSIM_K2 * SSIM_DATA_RANGE) ** 2

    def filt(z: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(z, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x * mu_x
    var_y = filt(y * y) - mu_y * mu_y
    cov = filt(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    r = SSIM_WINDOW // 2  # drop the border, where the window would hang outside the image
    return float(ssim_map[r:-r, r:-r].mean())


def guide_edge_map(guide_rgb: np.ndarray) -> np.ndarray:
    """[H, W] bool edges of a canny guide (white edges on black), binarised at 128."""
    return _to_gray_float(guide_rgb) >= 128


def evaluate_pair(guide_rgb: np.ndarray, generated_rgb: np.ndarray, low: float = 100, high: float = 200,
                  guide_is_edges: bool = True) -> dict[str, float]:
    """Control fidelity of one generated image: {"f1", "precision", "recall", "ssim"}.

    ``guide_rgb`` is the guide given to the generator: by default a canny map (white edges on
    black), binarised at 128. With ``guide_is_edges=False`` it is an ordinary image and its canny
    edges (same thresholds) are the guide edges. The generated image's edges are canny(low, high).
    "ssim" compares the two edge maps as uint8 images (edges 255, background 0), a softer score
    than F1 that gives partial credit to edges a pixel or two off. Both images must be the same size.
    """
    _check_same_shape(np.asarray(guide_rgb), np.asarray(generated_rgb), "evaluate_pair")
    if guide_is_edges:
        guide_edges = guide_edge_map(guide_rgb)
    else:
        guide_edges = canny_edges(guide_rgb, low, high)
    gen_edges = canny_edges(generated_rgb, low, high)
    precision, recall, f1 = edge_precision_recall_f1(guide_edges, gen_edges)
    score = ssim(guide_edges.astype(np.uint8) * 255, gen_edges.astype(np.uint8) * 255)
    return {"f1": f1, "precision": precision, "recall": recall, "ssim": score}
