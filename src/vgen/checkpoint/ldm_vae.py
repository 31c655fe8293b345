"""Key adapter between the original LDM / Stable Diffusion autoencoder and diffusers' ``AutoencoderKL``.

The tensors are the same; only their names (and the shape of four attention weights) differ:

* module paths: ``encoder.down.{i}.block.{j}`` <-> ``encoder.down_blocks.{i}.resnets.{j}``,
  ``mid.block_1`` <-> ``mid_block.resnets.0``, ``mid.attn_1.q`` <-> ``mid_block.attentions.0.to_q``,
  ``norm_out`` <-> ``conv_norm_out``, ``nin_shortcut`` <-> ``conv_shortcut``, ...;
* the decoder levels run in opposite orders: LDM ``decoder.up.{i}`` is diffusers ``decoder.up_blocks.{n-1-i}``;
* the mid-block attention projections are 1x1 convs ``[C, C, 1, 1]`` in LDM and Linear ``[C, C]`` in diffusers;
* Stable Diffusion checkpoints prefix the autoencoder with ``first_stage_model.``.

Both directions look keys up in the full list of names an autoencoder of that depth can have, so any other key
raises, and converting there and back returns the input unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

LDM_PREFIX = "first_stage_model."

_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
           ("nin_shortcut", "conv_shortcut"))
_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_LEGACY_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _module_pairs(num_levels: int, num_blocks: int) -> list[tuple[str, str, bool]]:
    """``(LDM module, diffusers module, is an attention projection)`` for every module the autoencoder can have."""

    def resnet(ldm: str, diffusers: str) -> list[tuple[str, str, bool]]:
        return [(f"{ldm}.{a}", f"{diffusers}.{b}", False) for a, b in _RESNET]

    pairs = [("quant_conv", "quant_conv", False), ("post_quant_conv", "post_quant_conv", False)]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in", False), (f"{part}.conv_out", f"{part}.conv_out", False),
                  (f"{part}.norm_out", f"{part}.conv_norm_out", False)]
        pairs += resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        pairs += resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        pairs += [(f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}", a != "norm") for a, b in _ATTENTION]
    for level in range(num_levels):
        up = num_levels - 1 - level
        pairs.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv", False))
        pairs.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", False))
        for block in range(num_blocks):
            pairs += resnet(f"encoder.down.{level}.block.{block}", f"encoder.down_blocks.{level}.resnets.{block}")
            pairs += resnet(f"decoder.up.{level}.block.{block}", f"decoder.up_blocks.{up}.resnets.{block}")
    return pairs


def _count(keys, pattern: str) -> int:
    """1 + the largest index ``pattern``'s group captures in ``keys`` (0 if none)."""
    found = [int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m]
    return max(found, default=-1) + 1


def _convert(state_dict: Mapping[str, torch.Tensor], ldm_source: bool) -> dict[str, torch.Tensor]:
    keys = list(state_dict)
    if ldm_source:
        num_levels = _count(keys, r"decoder\.up\.(\d+)\.")
        num_blocks = _count(keys, r"(?:encoder\.down|decoder\.up)\.\d+\.block\.(\d+)\.")
    else:
        num_levels = _count(keys, r"decoder\.up_blocks\.(\d+)\.")
        num_blocks = _count(keys, r"(?:encoder\.down|decoder\.up)_blocks\.\d+\.resnets\.(\d+)\.")
    table = {}
    for ldm, diffusers, projection in _module_pairs(num_levels, num_blocks):
        for leaf in ("weight", "bias"):
            source, target = (ldm, diffusers) if ldm_source else (diffusers, ldm)
            table[f"{source}.{leaf}"] = (f"{target}.{leaf}", projection and leaf == "weight")
    unmapped = [k for k in keys if k not in table]
    if unmapped:
        source_name, target_name = ("LDM", "diffusers") if ldm_source else ("diffusers", "LDM")
        raise ValueError(f"{len(unmapped)} {source_name} autoencoder keys have no {target_name} equivalent "
                         f"({num_levels} decoder levels, {num_blocks} blocks per level found): {', '.join(unmapped)}")
    converted = {}
    for key, value in state_dict.items():
        target, projection = table[key]
        if projection:  # 1x1 conv [C, C, 1, 1] <-> Linear [C, C]
            value = value.flatten(1) if ldm_source else value[:, :, None, None]
        converted[target] = value
    return converted


def ldm_to_diffusers_vae(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original LDM / SD first-stage names (optionally ``first_stage_model.``-prefixed) -> diffusers names."""
    return _convert({k.removeprefix(LDM_PREFIX): v for k, v in state_dict.items()}, ldm_source=True)


def diffusers_to_ldm_vae(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` names -> original LDM first-stage names (without the SD prefix)."""
    return _convert(state_dict, ldm_source=False)


def to_diffusers_vae(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any autoencoder state dict -> current diffusers names.

    Accepts a whole Stable Diffusion checkpoint (its ``first_stage_model.*`` part is kept), a bare LDM first
    stage, or a diffusers state dict (older diffusers attention names ``query/key/value/proj_attn`` are renamed).
    """
    if any(k.startswith(LDM_PREFIX) for k in state_dict):
        return ldm_to_diffusers_vae({k: v for k, v in state_dict.items() if k.startswith(LDM_PREFIX)})
    if any(k.startswith(("encoder.mid.", "decoder.mid.")) for k in state_dict):
        return ldm_to_diffusers_vae(state_dict)
    legacy = re.compile(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))")
    renamed = {}
    for key, value in state_dict.items():
        m = legacy.fullmatch(key)
        renamed[f"{m[1]}{_LEGACY_DIFFUSERS_ATTENTION[m[2]]}{m[3]}" if m else key] = value
    return renamed
