"""Conditioning preprocessors and tools/make_conditioning.py on small synthetic images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data import conditioning_preprocessors as cp
from library.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_conditioning.py"

sys.path.insert(0, str(REPO / "tools"))
import make_conditioning  # noqa: E402


def white_square(size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[lo:hi, lo:hi] = 255
    return img


def test_registry_and_shared_signature():
    assert set(cp.PREPROCESSORS) == {"canny", "blur", "lineart", "gray"}
    img = white_square()
    for name, fn in cp.PREPROCESSORS.items():
        out = fn(img)
        assert out.shape == img.shape and out.dtype == np.uint8, name


def test_canny_finds_square_border():
    img = white_square()
    out = cp.canny(img, low_threshold=100, high_threshold=200)
    assert set(np.unique(out)) <= {0, 255}
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    edges = out[..., 0] > 0
    ys, xs = np.nonzero(edges)
    # Edges hug the border (within a pixel), and nothing inside the square or far outside.
    assert ys.min() >= 14 and ys.max() <= 49 and xs.min() >= 14 and xs.max() <= 49
    assert not edges[20:44, 20:44].any()
    assert not edges[:10].any() and not edges[54:].any()
    # Each of the four sides is found along most of its length.
    for side in (edges[14:18, 16:48], edges[46:50, 16:48]):
        assert side.any(axis=0).mean() > 0.9
    for side in (edges[16:48, 14:18], edges[16:48, 46:50]):
        assert side.any(axis=1).mean() > 0.9


def test_canny_thresholds_checked():
    with pytest.raises(UserError, match="swap"):
        cp.canny(white_square(), low_threshold=200, high_threshold=100)
    # A high threshold above the strongest gradient finds nothing.
    assert cp.canny(white_square(), low_threshold=5000, high_threshold=6000).max() == 0


def test_blur_is_smoother():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)

    def roughness(a):
        return np.abs(np.diff(a.astype(np.float64), axis=1)).mean()

    for kwargs in ({"sigma": 2.0}, {"sigma": 0.0, "downscale": 4.0}):
        out = cp.blur(img, **kwargs)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert roughness(out) < 0.5 * roughness(img), kwargs
    same = cp.blur(img, sigma=0.0)
    assert np.array_equal(same, img) and same is not img
    with pytest.raises(UserError):
        cp.blur(img, sigma=-1)
    with pytest.raises(UserError):
        cp.blur(img, downscale=0.5)


def test_lineart_black_lines_on_white():
    out = cp.lineart(white_square())
    g = out[..., 0]
    assert set(np.unique(g)) <= {0, 255}
    assert (g == 255).mean() > 0.8  # mostly white paper
    assert g[4:10, 4:10].min() == 255 and g[26:38, 26:38].min() == 255  # flat areas stay white
    assert (g[12:52, 12:52] == 0).any()  # a line around the square
    inv = cp.lineart(white_square(), invert=True)
    assert np.array_equal(inv, 255 - out)
    with pytest.raises(UserError, match="odd"):
        cp.lineart(white_square(), block_size=4)


def test_gray():
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 1] = 200
    out = cp.gray(img)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert abs(int(out[0, 0, 0]) - round(0.587 * 200)) <= 1


def test_apply_preprocessor_rejects_unknowns():
    with pytest.raises(UserError, match="unknown conditioning type 'depth'"):
        cp.apply_preprocessor("depth", white_square())
    with pytest.raises(UserError, match="sigma"):
        cp.apply_preprocessor("canny", white_square(), sigma=2)


def make_input_dir(root: Path) -> Path:
    src = root / "images"
    src.mkdir()
    Image.fromarray(white_square()).save(src / "sq.jpg", quality=95)
    Image.fromarray(white_square(64, 8, 40)).save(src / "other.png")
    Image.fromarray(white_square()).convert("RGBA").save(src / "alpha.webp")
    (src / "notes.txt").write_text("not an image")
    (src / "sub").mkdir()
    return src


def test_tool_keeps_basenames(tmp_path):
    src = make_input_dir(tmp_path)
    out = tmp_path / "cond"
    assert make_conditioning.main([str(src), str(out), "--type", "canny",
                                   "--low_threshold", "50", "--high_threshold", "150"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["alpha.png", "other.png", "sq.png"]
    with Image.open(out / "other.png") as im:
        assert im.mode == "RGB" and im.size == (64, 64)
        arr = np.asarray(im)
    assert np.array_equal(arr, cp.canny(white_square(64, 8, 40), low_threshold=50, high_threshold=150))


def test_tool_refuses_overwrite_without_flag(tmp_path):
    src = make_input_dir(tmp_path)
    out = tmp_path / "cond"
    make_conditioning.main([str(src), str(out), "--type", "gray"])
    with pytest.raises(UserError, match="--overwrite"):
        make_conditioning.main([str(src), str(out), "--type", "gray"])
    assert make_conditioning.main([str(src), str(out), "--type", "blur", "--sigma", "2", "--overwrite"]) == 0


def test_tool_option_for_wrong_type(tmp_path):
    src = make_input_dir(tmp_path)
    with pytest.raises(UserError, match="--sigma does not apply to --type canny"):
        make_conditioning.main([str(src), str(tmp_path / "o"), "--type", "canny", "--sigma", "2"])


def test_tool_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_conditioning.main([str(tmp_path / "missing"), str(tmp_path / "o"), "--type", "canny"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        make_conditioning.main([str(empty), str(tmp_path / "o"), "--type", "canny"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(UserError, match="broken.png"):
        make_conditioning.main([str(bad), str(tmp_path / "o"), "--type", "canny"])
    dup = tmp_path / "dup"
    dup.mkdir()
    Image.fromarray(white_square()).save(dup / "a.png")
    Image.fromarray(white_square()).save(dup / "a.jpg")
    with pytest.raises(UserError, match="share the basename"):
        make_conditioning.main([str(dup), str(tmp_path / "o"), "--type", "canny"])
    with pytest.raises(UserError, match="is the input directory"):
        make_conditioning.main([str(dup), str(dup), "--type", "canny"])


def test_run_cli_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: make_conditioning.main([str(tmp_path / "missing"), str(tmp_path / "o"), "--type", "canny"]))
    assert exc.value.code == 2
    assert "missing" in capsys.readouterr().err


def test_tool_subprocess(tmp_path):
    src = make_input_dir(tmp_path)
    out = tmp_path / "cond"
    ok = subprocess.run([sys.executable, str(TOOL), str(src), str(out), "--type", "lineart"],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in out.iterdir()) == ["alpha.png", "other.png", "sq.png"]
    bad = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "nope"), str(out), "--type", "canny"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    assert "error:" in bad.stderr and "nope" in bad.stderr and "Traceback" not in bad.stderr
