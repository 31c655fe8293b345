"""Strategy factory used by ``conf/strategy``: maps a name to a Lightning strategy that also works on CPU."""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch.strategies import DDPStrategy, Strategy

STRATEGIES = ("auto", "ddp")


def build_strategy(name: str = "auto", timeout_s: int = 1800, find_unused_parameters: bool = False) -> Strategy | str:
    """``auto``: Lightning's choice; ``ddp``: DistributedDataParallel over NCCL on GPUs, gloo on CPU."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name={name!r} is not one of {STRATEGIES}")
    if name == "auto":
        return "auto"
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return DDPStrategy(process_group_backend=backend, timeout=timedelta(seconds=timeout_s),
                       find_unused_parameters=find_unused_parameters)


__all__ = ["STRATEGIES", "build_strategy"]
