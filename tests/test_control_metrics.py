"""Control-fidelity metrics on hand-made edge maps and images."""

from __future__ import annotations

import numpy as np
import pytest

from library.data.conditioning_preprocessors import canny
from library.errors import UserError
from library.evaluation.metrics import (
    canny_edges,
    edge_f1,
    edge_precision_recall_f1,
    evaluate_pair,
    ssim,
)


def square(size=64, lo=16, hi=48):
    img = np.zeros((size, size, 3), np.uint8)
    img[lo:hi, lo:hi] = 255
    return img


def test_f1_identical_and_disjoint():
    g = np.zeros((10, 10), bool)
    g[2, 1:9] = True
    assert edge_f1(g, g.copy()) == 1.0
    assert edge_f1(g.astype(np.uint8) * 255, g.astype(np.uint8)) == 1.0  # any nonzero is an edge
    p = np.zeros_like(g)
    p[7, 1:9] = True
    assert edge_f1(g, p) == 0.0


def test_f1_partial_overlap_hand_computed():
    g = np.zeros((10, 10), np.uint8)
    g[0, 0:8] = 1  # 8 guide edge pixels
    p = np.zeros((10, 10), np.uint8)
    p[0, 4:8] = 1  # 4 of them found ...
    p[5, 0:2] = 1  # ... plus 2 spurious ones
    precision, recall, f1 = edge_precision_recall_f1(g, p)
    assert precision == pytest.approx(4 / 6)
    assert recall == pytest.approx(4 / 8)
    # F1 = 2PR/(P+R) = 2*(2/3)*(1/2)/(2/3+1/2) = 4/7
    assert f1 == pytest.approx(4 / 7)
    assert edge_f1(g, p) == pytest.approx(4 / 7)


def test_f1_empty_edge_cases():
    empty = np.zeros((5, 5), bool)
    some = empty.copy()
    some[2, 2] = True
    assert edge_f1(empty, empty) == 1.0
    assert edge_f1(empty, some) == 0.0
    assert edge_f1(some, empty) == 0.0


def test_f1_shape_mismatch():
    with pytest.raises(UserError, match="size"):
        edge_f1(np.zeros((4, 4)), np.zeros((4, 5)))


def test_canny_edges_matches_preprocessor():
    img = square()
    e = canny_edges(img, 100, 200)
    assert e.dtype == bool and e.shape == (64, 64)
    assert np.array_equal(e, canny(img, low_threshold=100, high_threshold=200)[..., 0] > 0)
    assert e.any()


def test_ssim_identical_and_noise():
    rng = np.random.default_rng(0)
    img = square()
    assert ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-9)
    gray = img[..., 0]
    assert ssim(gray, gray) == pytest.approx(1.0, abs=1e-9)
    noisy = np.clip(img.astype(int) + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)
    very_noisy = np.clip(img.astype(int) + rng.normal(0, 100, img.shape), 0, 255).astype(np.uint8)
    s1, s2 = ssim(img, noisy), ssim(img, very_noisy)
    assert s2 < s1 < 0.99
    assert ssim(img, noisy) == pytest.approx(ssim(noisy, img))  # symmetric


def test_ssim_known_value_constant_images():
    # For constant images the structure terms are C2/C2 = 1 and SSIM = (2ab + C1)/(a^2 + b^2 + C1).
    a = np.full((16, 16), 100, np.uint8)
    b = np.full((16, 16), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_errors():
    with pytest.raises(UserError, match="size"):
        ssim(np.zeros((20, 20), np.uint8), np.zeros((20, 21), np.uint8))
    with pytest.raises(UserError, match="11x11"):
        ssim(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))


def test_evaluate_pair():
    guide = canny(square(), low_threshold=100, high_threshold=200)
    perfect = evaluate_pair(guide, square())
    assert perfect["f1"] == 1.0 and perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    assert perfect["ssim"] == pytest.approx(1.0)
    shifted = evaluate_pair(guide, square(lo=20, hi=52))
    assert 0.0 <= shifted["f1"] < 0.5 and shifted["ssim"] < perfect["ssim"]
    blank = evaluate_pair(guide, np.zeros_like(guide))
    assert blank["f1"] == 0.0 and blank["recall"] == 0.0
    # Guide given as an ordinary image: its canny edges are the guide edges.
    assert evaluate_pair(square(), square(), guide_is_edges=False)["f1"] == 1.0
