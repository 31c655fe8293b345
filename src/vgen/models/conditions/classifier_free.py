"""Classifier-free guidance for every condition alike: dropout in training, the unconditional branch at sampling.

Both act on the condition *values* (the UNet inputs by name) with each condition's null rules
(:data:`vgen.models.conditions.NULL_RULES`): ``zeros``, ``negative_prompt``, ``empty_prompt`` and ``keep`` replace
the value; ``drop`` zeroes the condition's encoded output through the UNet's ``keep`` masks.

Dropout schemes (``stage.conditioning``):

* ``independent``: each condition is dropped with its own ``dropout`` probability, independently; with
  ``p_joint_zero`` every droppable condition (null rule other than ``keep``) is also dropped together
  (I2VGen-XL's unconditional branch: negative prompt and zero image, first frame kept).
* ``all_none_each`` (VideoComposer): per sample, every droppable condition is dropped with ``p_all_zero``, all are
  kept with ``p_all_keep``, otherwise each is dropped with its own ``dropout``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vgen.models.conditions.base import Condition, Encoders


def _coin(batch_size: int, p: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B] bool, each True with probability ``p``; no random draw when ``p`` is 0 (keeps the random stream)."""
    if p <= 0:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    return torch.rand(batch_size, device=device, generator=generator) < p


def dropout_masks(conditions: Mapping[str, Condition], present: list[str], batch_size: int, device, *,
                  scheme: str = "independent", p_joint_zero: float = 0.0, p_all_zero: float = 0.1,
                  p_all_keep: float = 0.1, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``{name: [B] bool}``: which samples drop each of the ``present`` conditions (in the conditions' order)."""
    droppable = [n for n in conditions if n in present and conditions[n].drop_to != "keep"]
    masks: dict[str, torch.Tensor] = {}
    if scheme == "all_none_each":
        u = torch.rand(batch_size, device=device, generator=generator)
        all_zero, all_keep = u < p_all_zero, (u >= p_all_zero) & (u < p_all_zero + p_all_keep)
        for name in droppable:
            each = _coin(batch_size, conditions[name].dropout, device, generator)
            masks[name] = all_zero | (each & ~all_keep)
        return masks
    if scheme != "independent":
        raise ValueError(f"unknown condition-dropout scheme {scheme!r}; valid: independent, all_none_each")
    joint = _coin(batch_size, p_joint_zero, device, generator)
    for name in droppable:
        masks[name] = _coin(batch_size, conditions[name].dropout, device, generator) | joint
    return masks


def apply_dropout(conditions: Mapping[str, Condition], values: Mapping[str, torch.Tensor],
                  masks: Mapping[str, torch.Tensor], encoders: Encoders) -> dict:
    """UNet keyword inputs: ``values`` with each dropped sample's value nulled (``drop`` rules via ``keep``)."""
    out = dict(values)
    keep = {}
    for name, mask in masks.items():
        cond, value = conditions[name], values[name]
        if cond.drop_to == "drop":
            keep[name] = (~mask).to(torch.float32)
        elif mask.any():
            null = cond.null(cond.drop_to, value, encoders)
            out[name] = torch.where(mask.view(-1, *[1] * (value.ndim - 1)), null.to(value.dtype), value)
    if keep:
        out["keep"] = keep
    return out


def guidance_pair(conditions: Mapping[str, Condition], values: Mapping[str, torch.Tensor],
                  encoders: Encoders) -> tuple[dict, dict]:
    """(cond, uncond) UNet inputs for classifier-free guidance: uncond has each condition's ``guide_to`` null."""
    cond, uncond = dict(values), {}
    keep_cond, keep_uncond = {}, {}
    for name, value in values.items():
        rule = conditions[name].guide_to
        if rule == "drop":
            uncond[name] = value
            keep_cond[name] = torch.ones(value.shape[0], device=value.device)
            keep_uncond[name] = torch.zeros(value.shape[0], device=value.device)
        else:
            uncond[name] = conditions[name].null(rule, value, encoders)
    if keep_uncond:
        cond["keep"], uncond["keep"] = keep_cond, keep_uncond
    return cond, uncond
