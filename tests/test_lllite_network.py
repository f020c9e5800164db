"""The LLLite network: published layout, exact no-op when fresh, CFG, sizes, stacking, gradients, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.sdxl.tiny import build_random_models
from library.sdxl.weights_io import read_weights
from networks.control_net_lllite import ControlNetLLLite, describe_state_dict
from tests.conftest import unet_inputs

KEYS_TSV = Path(__file__).parent / "data" / "lllite_sdxl_c32_d64_keys.tsv"


def reference_keys() -> dict[str, list[int]]:
    out = {}
    for line in KEYS_TSV.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = [int(s) for s in shape.strip("[]").split(",")]
    return out


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_random_models()[0]


def randomize_up(net: ControlNetLLLite, scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in net.lllite_modules():
            m.up[0].weight.copy_(torch.randn(m.up[0].weight.shape, generator=g) * scale)


def cond_image(batch=1, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(unet, *inputs):
    with torch.no_grad():
        return unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2], added_cond_kwargs=inputs[3]).sample


# -- published layout ---------------------------------------------------------------------------


def test_full_sdxl_gets_published_keys_and_shapes(full_sdxl_unet):
    with torch.device("meta"):
        net = ControlNetLLLite(full_sdxl_unet, cond_emb_dim=32, network_dim=64)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert len(list(net.lllite_modules())) == 136
    assert ours == reference_keys()
    assert list(ours) == list(reference_keys())
    assert sum(v.numel() for v in net.state_dict().values()) == 22_969_600
    assert net.depth_counts == {2: 4 * (2 + 2), 3: 4 * (10 + 10 + 10)}  # 4 linears per transformer block


def test_full_sdxl_output_blocks_follow_the_ldm_numbering(full_sdxl_unet):
    with torch.device("meta"):
        net = ControlNetLLLite(full_sdxl_unet, cond_emb_dim=32, network_dim=64, include_output_blocks=True)
    assert net.has_output_blocks and len(list(net.lllite_modules())) == 280
    assert sum(v.numel() for v in net.state_dict().values()) == 46_721_920  # 93 MB in fp16
    out = {t.name: t for t, _ in net.lllite_modules() if "output_blocks" in t.name}
    # up_blocks.i.attentions.j -> output_blocks.{3i+j}.1: 3 blocks of 10 transformer blocks at 1280 wide,
    # then 3 blocks of 2 at 640 wide, with the conditioning depth of their resolution
    for n in range(6):
        blocks = {name.split("_transformer_blocks_")[1].split("_")[0]
                  for name in out if name.startswith(f"lllite_unet_output_blocks_{n}_1_")}
        assert blocks == {str(k) for k in range(10 if n < 3 else 2)}, n
    t = out["lllite_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_q"]
    assert t.linear.in_features == 1280 and t.depth == 3
    t = out["lllite_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_q"]
    assert t.linear.in_features == 640 and t.depth == 2
    assert not any("output_blocks_6" in name for name in out)  # the top level has no attention in SDXL


def test_published_random_file_loads_without_missing_or_unexpected(tmp_path, full_sdxl_unet):
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g).to(torch.float16) for k, shape in reference_keys().items()}
    path = tmp_path / "controllllite_v01032064e_sdxl_random.safetensors"
    save_file(sd, str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/control-net-lllite"})
    with torch.device("meta"):
        shell = ControlNetLLLite(full_sdxl_unet, 32, 64)
    net = ControlNetLLLite.from_state_dict(full_sdxl_unet, read_weights(path)[0], source=str(path))
    assert net.cond_emb_dim == 32 and net.network_dim == 64
    assert net.state_dict().keys() == shell.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(v.to(torch.float16), sd[k]), k


@pytest.mark.parametrize("ext", ["safetensors", "pt", "ckpt"])
def test_round_trip_bit_exact(tmp_path, unet, ext):
    net = ControlNetLLLite(unet, cond_emb_dim=8, network_dim=8)
    randomize_up(net)
    path = tmp_path / f"lllite.{ext}"
    net.save(path)
    loaded = ControlNetLLLite.from_file(unet, path)
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    if ext == "safetensors":
        meta = read_weights(path)[1]
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"


def test_save_dtype(tmp_path, unet):
    net = ControlNetLLLite(unet, cond_emb_dim=8, network_dim=8)
    path = tmp_path / "half.safetensors"
    net.save(path, dtype=torch.bfloat16)
    sd, _ = read_weights(path)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    info = describe_state_dict(sd)
    assert info["cond_emb_dim"] == 8 and info["network_dim"] == 8 and info["dtype"] == "bfloat16"


# -- behaviour ----------------------------------------------------------------------------------


def test_fresh_module_leaves_output_unchanged(unet):
    inputs = unet_inputs(unet)
    before = run(unet, *inputs)
    net = ControlNetLLLite(unet, 8, 8).attach()
    net.set_cond_image(cond_image())
    try:
        assert torch.equal(run(unet, *inputs), before)
    finally:
        net.detach()


def test_multiplier_zero_equals_no_lllite_and_detach_restores(unet):
    inputs = unet_inputs(unet)
    before = run(unet, *inputs)
    net = ControlNetLLLite(unet, 8, 8)
    randomize_up(net)
    net.attach()
    net.set_cond_image(cond_image())
    assert not torch.allclose(run(unet, *inputs), before)
    net.set_multiplier(0.0)
    assert torch.equal(run(unet, *inputs), before)
    net.set_multiplier(1.0)
    net.detach()
    assert torch.equal(run(unet, *inputs), before)
    assert not any(hasattr(m, "_lllite_slot") for m in unet.modules())


def test_cfg_batch_equals_separate_calls(unet):
    net = ControlNetLLLite(unet, 8, 8)
    randomize_up(net)
    net.attach()
    try:
        net.set_cond_image(cond_image(batch=1))
        x_u = unet_inputs(unet, seed=1)
        x_c = unet_inputs(unet, seed=2)
        sep = torch.cat([run(unet, *x_u), run(unet, *x_c)])
        batched = tuple(
            torch.cat([a, b]) if isinstance(a, torch.Tensor) else {k: torch.cat([a[k], b[k]]) for k in a}
            for a, b in zip(x_u, x_c)
        )
        assert torch.allclose(run(unet, *batched), sep, atol=1e-5)
    finally:
        net.detach()


def test_odd_sizes_1080x1440_embed_on_each_blocks_exact_grid(unet, monkeypatch):
    """Latent 135x180 (1080x1440 / 8), scaled down to 27x36: the level below has a 14x18 grid, not the
    embedding's 13x18 or 14x17. Every residual must use the grid of the block it runs in."""
    from networks.control_net_lllite import LLLiteModule

    h, w = 27, 36
    inputs = unet_inputs(unet, h=h, w=w, seed=1)
    plain = run(unet, *inputs)
    net = ControlNetLLLite(unet, 8, 8)
    randomize_up(net)
    used = []
    original = LLLiteModule.tokens_for

    def tokens_for(self, n, grid=None):
        tokens = original(self, n, grid)
        used.append((n, grid, tokens.shape[1]))
        return tokens

    monkeypatch.setattr(LLLiteModule, "tokens_for", tokens_for)
    net.attach()
    try:
        net.set_cond_image(torch.rand(1, 3, h * 8, w * 8, generator=torch.Generator().manual_seed(2)) * 2 - 1)
        out = run(unet, *inputs)
    finally:
        net.detach()
    assert out.shape == (1, 4, h, w) and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-4  # the LLLite did act at this size
    assert {grid for _, grid, _ in used} == {(27, 36), (14, 18)}
    assert all(grid[0] * grid[1] == n == tokens for n, grid, tokens in used)


def test_two_models_add_and_order_does_not_matter(unet):
    inputs = unet_inputs(unet)
    a = ControlNetLLLite(unet, 8, 8)
    b = ControlNetLLLite(unet, 8, 8)
    randomize_up(a, seed=1)
    randomize_up(b, seed=2)
    results = []
    for order in ((a, b), (b, a)):
        for n in order:
            n.attach()
        a.set_cond_image(cond_image(seed=3))
        b.set_cond_image(cond_image(seed=4))
        results.append(run(unet, *inputs))
        for n in order:
            n.detach()
    assert torch.allclose(results[0], results[1], atol=1e-6)
    singles = []
    for n in (a, b):
        n.attach()
        singles.append(run(unet, *inputs))
        n.detach()
    assert not torch.allclose(results[0], singles[0]) and not torch.allclose(results[0], singles[1])


def test_every_parameter_gets_a_gradient_with_checkpointing():
    unet = build_random_models(seed=1)[0]
    unet.requires_grad_(False)
    unet.enable_gradient_checkpointing()
    unet.train()
    net = ControlNetLLLite(unet, 8, 8)
    randomize_up(net)  # with up == 0 the earlier layers would get no gradient by construction
    net.attach()
    try:
        net.set_cond_image(cond_image(batch=2))
        sample, t, ctx, added = unet_inputs(unet, batch=2)
        out = unet(sample, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        out.square().mean().backward()
    finally:
        net.detach()
    assert not any(p.requires_grad and p.grad is not None for p in unet.parameters())
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_only_lllite_parameters_train(unet):
    net = ControlNetLLLite(unet, 8, 8)
    ids = {id(p) for p in unet.parameters()}
    assert not any(id(p) in ids for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())


# -- errors -------------------------------------------------------------------------------------


def test_checkpoint_given_as_lllite(tmp_path, unet, tiny_checkpoint):
    with pytest.raises(UserError, match="not a ControlNet-LLLite file.*SDXL checkpoint"):
        ControlNetLLLite.from_file(unet, tiny_checkpoint)


def test_sd15_lllite_does_not_fit(tmp_path, unet):
    # SD1.5 LLLite modules have other block names/widths; here a width mismatch on an existing name
    net = ControlNetLLLite(unet, 8, 8)
    sd = net.state_dict()
    key = next(k for k in sd if k.endswith("down.0.weight"))
    sd[key] = torch.zeros(8, 320)
    with pytest.raises(UserError, match=rf"{key} has shape \[8, 320\] in the file but \[8, \d+\] here"):
        ControlNetLLLite.from_state_dict(unet, sd, source="sd15.safetensors")


def test_unknown_module_name(unet):
    sd = {
        "lllite_unet_input_blocks_99_1_transformer_blocks_0_attn1_to_q.conditioning1.0.weight": torch.zeros(4, 3, 4, 4),
        "lllite_unet_input_blocks_99_1_transformer_blocks_0_attn1_to_q.down.0.weight": torch.zeros(8, 64),
    }
    with pytest.raises(UserError, match="input_blocks_99.*no matching attention layer"):
        ControlNetLLLite.from_state_dict(unet, sd, source="other.safetensors")


def test_damaged_lllite_file(tmp_path, unet):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(UserError, match="broken.safetensors.*damaged"):
        ControlNetLLLite.from_file(unet, path)
