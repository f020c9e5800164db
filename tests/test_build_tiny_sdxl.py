"""tools/build_tiny_sdxl.py end to end at a toy scale: what it writes, and reuse of its work folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_tiny_sdxl  # noqa: E402

from library.errors import UserError  # noqa: E402

TOY = ["--seed", "3", "--threads", "1", "--num_images", "24", "--vae_steps", "2", "--vae_batch", "2",
       "--unet_steps", "2", "--batch_size", "2", "--warmup_steps", "2", "--eval_samples", "2", "--eval_steps", "1"]


def test_build_writes_a_loadable_checkpoint_and_reuses_its_vae(tmp_path, caplog):
    from library.sdxl.loading import load_sdxl
    from library.sdxl.weights_io import read_metadata

    work, first, second = tmp_path / "work", tmp_path / "first", tmp_path / "second"
    build_tiny_sdxl.main(TOY + ["--output_dir", str(first), "--work_dir", str(work)])
    ckpt = first / build_tiny_sdxl.CHECKPOINT_NAME
    models = load_sdxl(str(ckpt))
    assert models.unet.config.addition_embed_type == "text_time"
    meta = read_metadata(ckpt)
    assert meta["tiny_sdxl.seed"] == "3" and json.loads(meta["tiny_sdxl.args"])["vae_steps"] == 2
    # The GroupNorm reference channels survive training and fp16 storage: conv_in writes +k / -k there.
    bias = models.vae.encoder.conv_in.bias
    assert float(bias[1]) == pytest.approx(build_tiny_sdxl.REFERENCE_LEVEL)
    assert float(bias[2]) == pytest.approx(-build_tiny_sdxl.REFERENCE_LEVEL)
    summary = json.loads((first / "eval.json").read_text())["summary"]
    assert summary["n"] == 2 and 0.0 <= summary["both"] <= 1.0
    assert (first / "samples.png").is_file()
    readme = (first / "README.md").read_text()
    assert "--seed 3 --threads 1 --num_images 24 --vae_steps 2 --unet_steps 2" in readme
    assert "reused through --work_dir" not in readme
    vae_seconds = json.loads((work / "vae_seconds.json").read_text())["seconds"]
    assert vae_seconds > 0

    # A second run takes the VAE from the work folder and still reports the VAE stage's cost.
    caplog.clear()
    with caplog.at_level("INFO", logger="build_tiny_sdxl"):
        build_tiny_sdxl.main(TOY + ["--output_dir", str(second), "--work_dir", str(work)])
    assert any("VAE from" in r.getMessage() for r in caplog.records)
    readme2 = (second / "README.md").read_text()
    assert "reused through --work_dir" in readme2
    assert f"VAE {vae_seconds / 60:.1f}" in readme2
    a, b = load_sdxl(str(ckpt)), load_sdxl(str(second / build_tiny_sdxl.CHECKPOINT_NAME))
    for (name, p), q in zip(a.vae.state_dict().items(), b.vae.state_dict().values()):
        assert p.equal(q), name


@pytest.mark.parametrize("bad", [["--image_size", "48"], ["--vae_crop", "12"], ["--unet_steps", "0"]])
def test_bad_options_are_clear_errors(bad):
    with pytest.raises(UserError, match=bad[0]):
        build_tiny_sdxl.parse_args(bad)
