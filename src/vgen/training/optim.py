"""Optimizer and learning-rate schedule of the VGen recipe (AdamW + linear warm-up, then constant/cosine/linear)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

DECAY_MODES = ("constant", "cosine", "linear")


def build_optimizer(params: Iterable, lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {lr}")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def warmup_decay_lambda(warmup_steps: int, total_steps: int, decay: str = "constant", min_ratio: float = 0.0):
    """LR multiplier: linear warm-up over ``warmup_steps``, then ``decay`` down to ``min_ratio`` at ``total_steps``."""
    if decay not in DECAY_MODES:
        raise ValueError(f"optim.decay={decay!r} is not one of {DECAY_MODES}")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"optim.warmup_steps must be >= 0 and total_steps > 0, got {warmup_steps}, {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
        return min_ratio + (1 - min_ratio) * shape

    return factor
