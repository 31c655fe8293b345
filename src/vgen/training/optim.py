"""Optimizer and learning-rate schedule of the VGen recipe (AdamW + linear warm-up, then constant/cosine/linear)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

DECAY_MODES = ("constant", "cosine", "linear")


IMPLEMENTATIONS = ("auto", "loop", "foreach", "fused")


def build_optimizer(params: Iterable, lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0, implementation: str = "auto") -> torch.optim.Optimizer:
    """AdamW. ``implementation``: ``loop`` (one parameter at a time: torch's CPU default), ``foreach`` (multi-tensor
    kernels on CUDA; on CPU torch runs them as the same per-tensor loop), ``fused`` (one fused kernel per
    dtype/device, CPU and CUDA; Lightning refuses it together with gradient clipping under mixed precision), or
    ``auto`` = ``foreach`` (every strategy and precision; ``loop`` where plain tensors and DTensor shards mix).
    All give the same update up to float rounding and save the same state layout, so a run may resume under
    another implementation."""
    if lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {lr}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"optim.implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        params = list(params)
        tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        # foreach kernels take one kind of tensor: plain tensors next to FSDP2's DTensor shards (e.g. DreamVideo's
        # placeholder word beside sharded adapters) need the per-tensor loop
        implementation = "foreach" if len({_is_dtensor(p) for p in tensors}) <= 1 else "loop"
    options = {"loop": {"foreach": False}, "fused": {"fused": True}}.get(implementation, {"foreach": True})
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **options)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


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
