"""The original "sgm" key layout of SDXL single-file checkpoints, and how it maps to diffusers.

diffusers converts sgm -> diffusers (``diffusers.loaders.single_file_utils``) and we use that for
loading. The package ships no converter for the other direction, which we need to write single-file
checkpoints (the bundled tiny model, test fixtures), so the reverse mapping is written here.
It also infers a diffusers config from the tensor shapes of a checkpoint, so one code path serves
full-size SDXL and small models alike.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
COMPONENT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, TE1_PREFIX, TE2_PREFIX)
# The SDXL refiner's only text encoder (OpenCLIP bigG) sits where the base model has CLIP ViT-L.
REFINER_TE_PREFIX = "conditioner.embedders.0.model."

# Top-level keys that v-prediction fine-tunes carry as markers (empty tensors).
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"

# SDXL conventions that shapes cannot tell: attention heads are 64 wide, GroupNorm uses 32 groups,
# size conditioning uses 256-dim sinusoids, and this VAE scale.
HEAD_DIM = 64
SDXL_ADDITION_TIME_EMBED_DIM = 256
SDXL_VAE_SCALING_FACTOR = 0.13025


def sgm_input_block_index(level: int, layer: int, layers_per_block: int) -> int:
    """Index of ``input_blocks.N`` for diffusers ``down_blocks.level`` resnet/attention ``layer``."""
    return 1 + (layers_per_block + 1) * level + layer


def sgm_output_block_index(level: int, layer: int, layers_per_block: int) -> int:
    """Index of ``output_blocks.N`` for diffusers ``up_blocks.level`` resnet/attention ``layer``."""
    return (layers_per_block + 1) * level + layer


# ----------------------------------------------------------------------------------------------
# U-Net
# ----------------------------------------------------------------------------------------------

UNET_RESNET_RENAMES = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def unet_prefix_pairs(config: Mapping) -> list[tuple[str, str]]:
    """(diffusers prefix, sgm prefix) pairs for a U-Net config."""
    lpb = config["layers_per_block"]
    n = len(config["block_out_channels"])
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(n):
        for j in range(lpb):
            k = sgm_input_block_index(i, j, lpb)
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."))
    for i in range(n):
        for j in range(lpb + 1):
            k = sgm_output_block_index(i, j, lpb)
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."))
        if i < n - 1:
            has_attn = config["up_block_types"][i].startswith("CrossAttn")
            k = sgm_output_block_index(i, lpb, lpb)
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{2 if has_attn else 1}.conv."))
    return pairs


def unet_diffusers_to_sgm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Rename a diffusers U-Net state dict to sgm keys (with the ``model.diffusion_model.`` prefix)."""
    pairs = sorted(unet_prefix_pairs(config), key=lambda p: -len(p[0]))
    out = {}
    for key, value in state_dict.items():
        for d_prefix, s_prefix in pairs:
            if key.startswith(d_prefix):
                rest = key[len(d_prefix) :]
                if ".resnets." in d_prefix:
                    for old, new in UNET_RESNET_RENAMES:
                        if rest.startswith(old):
                            rest = new + rest[len(old) :]
                            break
                out[UNET_PREFIX + s_prefix + rest] = value
                break
        else:
            raise KeyError(f"no sgm name for U-Net key {key!r}")
    return out


def _count(keys, pattern: str) -> int:
    """Number of distinct integers matched by the single group in ``pattern``."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def infer_unet_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """A diffusers ``UNet2DConditionModel`` config from an sgm U-Net's tensor shapes.

    For SDXL it reproduces the published config exactly (a test checks this).
    """
    p = UNET_PREFIX
    keys = [k[len(p) :] for k in sd if k.startswith(p)]
    conv_in = sd[p + "input_blocks.0.0.weight"]
    in_blocks = _count(keys, r"input_blocks\.(\d+)\.")
    ops = sorted(int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    lpb = ops[0] - 1 if ops else in_blocks - 1
    n_levels = (in_blocks - 1 + 1) // (lpb + 1)
    channels, has_attn, depth = [], [], []
    cross_dim, linear_proj = None, True
    for i in range(n_levels):
        k = sgm_input_block_index(i, 0, lpb)
        channels.append(int(sd[p + f"input_blocks.{k}.0.out_layers.3.weight"].shape[0]))
        attn = f"input_blocks.{k}.1."
        has_attn.append(any(key.startswith(attn) for key in keys))
        depth.append(_count(keys, re.escape(attn) + r"transformer_blocks\.(\d+)\.") if has_attn[-1] else 1)
        if has_attn[-1]:
            cross_dim = int(sd[p + attn + "transformer_blocks.0.attn2.to_k.weight"].shape[1])
            linear_proj = sd[p + attn + "proj_in.weight"].ndim == 2
    mid_depth = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if mid_depth:
        # diffusers gives the mid block the last level's depth.
        depth[-1] = mid_depth
    down_types = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn]
    up_types = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)]
    config = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": [max(1, c // HEAD_DIM) for c in channels],
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": cross_dim,
        "down_block_types": down_types,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": int(conv_in.shape[1]),
        "layers_per_block": lpb,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": int(sd[p + "out.2.weight"].shape[0]),
        "sample_size": 128,
        "transformer_layers_per_block": depth,
        "up_block_types": up_types,
        "use_linear_projection": bool(linear_proj),
    }
    if p + "label_emb.0.0.weight" in sd:
        config.update(
            addition_embed_type="text_time",
            addition_embed_type_num_heads=64,
            addition_time_embed_dim=SDXL_ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=int(sd[p + "label_emb.0.0.weight"].shape[1]),
        )
    if not mid_depth:
        config["mid_block_type"] = None
    return config


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------


def _vae_prefix_pairs(n_levels: int, lpb: int) -> list[tuple[str, str]]:
    pairs = []
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in.", f"{part}.conv_in."),
            (f"{part}.conv_out.", f"{part}.conv_out."),
            (f"{part}.conv_norm_out.", f"{part}.norm_out."),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
            (f"{part}.mid_block.attentions.0.group_norm.", f"{part}.mid.attn_1.norm."),
            (f"{part}.mid_block.attentions.0.to_q.", f"{part}.mid.attn_1.q."),
            (f"{part}.mid_block.attentions.0.to_k.", f"{part}.mid.attn_1.k."),
            (f"{part}.mid_block.attentions.0.to_v.", f"{part}.mid.attn_1.v."),
            (f"{part}.mid_block.attentions.0.to_out.0.", f"{part}.mid.attn_1.proj_out."),
        ]
    for i in range(n_levels):
        for j in range(lpb):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        # The sgm decoder numbers its levels from the bottom; diffusers from the top.
        for j in range(lpb + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n_levels - 1 - i}.block.{j}."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n_levels - 1 - i}.upsample.conv."))
    pairs += [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    return pairs


def vae_diffusers_to_sgm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to sgm keys (``first_stage_model.`` prefix)."""
    pairs = sorted(
        _vae_prefix_pairs(len(config["block_out_channels"]), config["layers_per_block"]), key=lambda p: -len(p[0])
    )
    out = {}
    for key, value in state_dict.items():
        for d_prefix, s_prefix in pairs:
            if key.startswith(d_prefix):
                rest = key[len(d_prefix) :]
                if rest.startswith("conv_shortcut."):
                    rest = "nin_shortcut." + rest[len("conv_shortcut.") :]
                if s_prefix.split(".")[-2] in {"q", "k", "v", "proj_out"} and value.ndim == 2:
                    value = value[:, :, None, None]  # sgm stores the attention projections as 1x1 convs
                out[VAE_PREFIX + s_prefix + rest] = value
                break
        else:
            raise KeyError(f"no sgm name for VAE key {key!r}")
    return out


def infer_vae_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """A diffusers ``AutoencoderKL`` config from an sgm VAE's tensor shapes (SDXL scaling factor)."""
    p = VAE_PREFIX
    keys = [k[len(p) :] for k in sd if k.startswith(p)]
    n = _count(keys, r"encoder\.down\.(\d+)\.")
    lpb = _count(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    channels = [int(sd[p + f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n)]
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": int(sd[p + "encoder.conv_in.weight"].shape[1]),
        "latent_channels": int(sd[p + "post_quant_conv.weight"].shape[0]),
        "layers_per_block": lpb,
        "norm_num_groups": 32,
        "out_channels": int(sd[p + "decoder.conv_out.weight"].shape[0]),
        "sample_size": 1024,
        "scaling_factor": SDXL_VAE_SCALING_FACTOR,
        "up_block_types": ["UpDecoderBlock2D"] * n,
    }


# ----------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------


def te1_diffusers_to_sgm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L keeps its transformers names in sgm files, under a prefix.

    transformers 5 drops the ``text_model.`` level from ``CLIPTextModel`` keys; sgm files have it.
    """
    return {
        TE1_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in state_dict.items()
        if not k.endswith("position_ids")
    }


def te2_diffusers_to_sgm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModelWithProjection`` -> open_clip names (q/k/v stacked, projection transposed)."""
    out = {}
    layer_renames = [
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("self_attn.out_proj.", "attn.out_proj."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ]
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key  # transformers 5 may drop this level
        if key == "text_model.embeddings.token_embedding.weight":
            out[TE2_PREFIX + "token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out[TE2_PREFIX + "positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[TE2_PREFIX + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[TE2_PREFIX + "text_projection"] = value.T.contiguous()
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key):
            idx, rest = m.groups()
            base = f"{TE2_PREFIX}transformer.resblocks.{idx}."
            if pm := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault(f"{base}attn.in_proj_{pm.group(2)}", {})[pm.group(1)] = value
                continue
            for old, new in layer_renames:
                if rest.startswith(old):
                    out[base + new + rest[len(old) :]] = value
                    break
            else:
                raise KeyError(f"no open_clip name for text encoder 2 key {key!r}")
        else:
            raise KeyError(f"no open_clip name for text encoder 2 key {key!r}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _clip_config(hidden: int, intermediate: int, layers: int, vocab: int, positions: int, projection: int, act: str, cls: str) -> dict:
    return {
        "architectures": [cls],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // HEAD_DIM),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": projection,
        "layer_norm_eps": 1e-05,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def infer_te1_config(sd: Mapping[str, torch.Tensor]) -> dict:
    p = TE1_PREFIX + "text_model."
    emb = sd[p + "embeddings.token_embedding.weight"]
    layers = _count([k[len(p) :] for k in sd if k.startswith(p)], r"encoder\.layers\.(\d+)\.")
    return _clip_config(
        hidden=int(emb.shape[1]),
        intermediate=int(sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        layers=layers,
        vocab=int(emb.shape[0]),
        positions=int(sd[p + "embeddings.position_embedding.weight"].shape[0]),
        projection=int(emb.shape[1]),
        act="quick_gelu",
        cls="CLIPTextModel",
    )


def infer_te2_config(sd: Mapping[str, torch.Tensor]) -> dict:
    p = TE2_PREFIX
    emb = sd[p + "token_embedding.weight"]
    layers = _count([k[len(p) :] for k in sd if k.startswith(p)], r"transformer\.resblocks\.(\d+)\.")
    return _clip_config(
        hidden=int(emb.shape[1]),
        intermediate=int(sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        layers=layers,
        vocab=int(emb.shape[0]),
        positions=int(sd[p + "positional_embedding"].shape[0]),
        projection=int(sd[p + "text_projection"].shape[1]),
        act="gelu",
        cls="CLIPTextModelWithProjection",
    )


# ----------------------------------------------------------------------------------------------
# Layout variants of single-file checkpoints
# ----------------------------------------------------------------------------------------------


def _is_position_ids(key: str) -> bool:
    return key.endswith("embeddings.position_ids")


def normalize_sgm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Bring a single-file SDXL state dict to the plain sgm layout, in place (no tensor is copied).

    - Text encoder 1 keys without the ``text_model.`` level (what tools on transformers 5 write)
      get it back.
    - Keys that are not weights of the four models are dropped: ``position_ids`` (a constant
      buffer), OpenCLIP's ``logit_scale`` (only used for image-text similarity), and everything
      outside the four model prefixes: EMA copies (``model_ema.*``), ``denoiser.sigmas``, marker keys
      such as ``v_pred``/``ztsnr`` (read them first), training-time constants.

    Returns what was dropped, grouped by reason, for the log.
    """
    dropped: dict[str, list[str]] = {}
    for key in list(sd):
        if key.startswith(TE1_PREFIX):
            rest = key[len(TE1_PREFIX) :]
            if _is_position_ids(rest):
                dropped.setdefault("position_ids", []).append(key)
                del sd[key]
            elif not rest.startswith("text_model."):
                sd[TE1_PREFIX + "text_model." + rest] = sd.pop(key)
        elif key.startswith(TE2_PREFIX):
            rest = key[len(TE2_PREFIX) :]
            if rest == "logit_scale" or _is_position_ids(rest):
                dropped.setdefault(rest.rsplit(".", 1)[-1], []).append(key)
                del sd[key]
        elif not key.startswith(COMPONENT_PREFIXES):
            reason = "EMA copies" if key.startswith("model_ema.") else "not model weights"
            dropped.setdefault(reason, []).append(key)
            del sd[key]
    return dropped


def attention_depths(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Number of transformer blocks in each U-Net attention block, e.g. ``{"input_blocks.4.1": 2}``."""
    rx = re.compile(re.escape(UNET_PREFIX) + r"((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.transformer_blocks\.(\d+)\.")
    depths: dict[str, int] = {}
    for key in sd:
        if m := rx.match(key):
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    return depths


def _uneven_attention_levels(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Where the attention blocks of one U-Net level differ in depth (SDXL's are equal per level), else None."""
    keys = [k[len(UNET_PREFIX) :] for k in sd if k.startswith(UNET_PREFIX)]
    ops = sorted(int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    lpb = ops[0] - 1 if ops else _count(keys, r"input_blocks\.(\d+)\.") - 1
    if lpb < 1:
        return None
    levels: dict[tuple[str, int], dict[str, int]] = {}
    for block, depth in attention_depths(sd).items():
        kind, index = block.split(".")[0], int(block.split(".")[1])
        if kind == "input_blocks":
            levels.setdefault(("down", (index - 1) // (lpb + 1)), {})[block] = depth
        elif kind == "output_blocks":
            levels.setdefault(("up", index // (lpb + 1)), {})[block] = depth
    for _, blocks in sorted(levels.items()):
        if len(set(blocks.values())) > 1:
            return ", ".join(f"{b}: {d}" for b, d in sorted(blocks.items(), key=lambda kv: int(kv[0].split(".")[1])))
    return None


def is_scaled_fp8(sd: Mapping[str, torch.Tensor]) -> bool:
    """ComfyUI's "scaled fp8" files: float8 weights that must be multiplied by per-layer ``scale_weight`` keys."""
    return "scaled_fp8" in sd or any(k.endswith(".scale_weight") for k in sd)


def describe_non_base_sdxl(sd: Mapping[str, torch.Tensor]) -> str | None:
    """What an SDXL-family single file is when it is not the SDXL base model or a fine-tune of it; None when it is.

    Checked on the raw file (before ``normalize_sgm_state_dict``): marker keys tell some variants apart.
    diffusers' ``infer_diffusers_model_type`` keys on layer numbers of the full-size models
    (``resblocks.9``), which the small test models lack, so these checks look at prefixes and shapes.
    """
    if any(k.startswith(REFINER_TE_PREFIX) for k in sd) and not any(k.startswith(TE2_PREFIX) for k in sd):
        detail = ""
        if (w := sd.get(UNET_PREFIX + "input_blocks.0.0.weight")) is not None:
            detail = f" and a {int(w.shape[0])}-channel U-Net"
        return (
            "an SDXL refiner (its only text encoder is OpenCLIP at conditioner.embedders.0" + detail + "); the "
            "refiner only polishes the base model's output at low noise"
        )
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] != 4:
        channels = int(conv_in.shape[1])
        what = {
            9: "an SDXL inpainting model (its U-Net takes 9 input channels: latents, mask and masked-image latents)",
            8: "an SDXL InstructPix2Pix-style edit model (its U-Net takes 8 input channels: latents and the input image's latents)",
        }
        return what.get(channels, f"a model whose U-Net takes {channels} input channels (SDXL takes 4)")
    if "edm_mean" in sd or "edm_std" in sd:
        return "Playground v2.5 or another EDM-formulation model (it has edm_mean/edm_std latent statistics)"
    if any(k.startswith("edm_vpred.") for k in sd):
        return "an EDM v-prediction model such as CosXL (it has edm_vpred.* sigma keys)"
    if uneven := _uneven_attention_levels(sd):
        return (
            "a distilled or pruned SDXL U-Net such as SSD-1B or Segmind Vega (the attention blocks of one level "
            f"have different numbers of transformer blocks: {uneven}; SDXL's are equal per level)"
        )
    return None
