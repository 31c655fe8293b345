"""Exponential moving average of a module's trainable parameters, kept in float32 beside the model.

It is deliberately not an ``nn.Module``: DDP would otherwise broadcast the whole shadow copy every step as a
buffer. The stage saves it in the checkpoint under ``"ema"`` and restores it on resume.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` after each optimizer step (copy while ``step < start_step``)."""

    def __init__(self, module: nn.Module, decay: float = 0.9999, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in module.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        params = dict(module.named_parameters())
        names = list(self.shadow)
        device = params[names[0]].device
        if self.shadow[names[0]].device != device:
            self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        shadows = [self.shadow[n] for n in names]
        current = [params[n].detach().float() for n in names]
        if step < self.start_step:
            torch._foreach_copy_(shadows, current)
        else:
            torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def module_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module.state_dict()`` with its trainable parameters replaced by the EMA weights (module dtypes)."""
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in module.state_dict().items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step,
                "shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        unexpected = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        device = next(iter(self.shadow.values())).device
        self.shadow = {k: state["shadow"][k].to(device=device, dtype=torch.float32) for k in self.shadow}
