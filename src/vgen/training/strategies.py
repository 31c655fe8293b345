"""Strategy factory used by ``conf/strategy``: maps a name to a Lightning strategy that also works on CPU.

| name | what is sharded per rank | Lightning strategy |
| --- | --- | --- |
| ``auto`` | nothing (Lightning picks single device or DDP) | Lightning's choice |
| ``ddp`` | nothing | ``DDPStrategy`` |
| ``deepspeed_zero2`` | optimizer state + gradients | :class:`~vgen.training.deepspeed.VGenDeepSpeedStrategy` |
| ``deepspeed_zero3`` | + parameters (and the EMA) | same, stage 3 |
| ``*_offload`` | as above, optimizer state (zero2) / + parameters (zero3) kept in CPU memory | same |
| ``fsdp2`` | parameters, gradients, optimizer state (and the EMA) | :class:`~vgen.training.fsdp.FSDP2Strategy` |

Collectives use NCCL on GPUs and gloo on CPU. ``timeout_s`` bounds how long a rank waits in a collective for
a rank that hangs; a rank that dies is noticed by the others at once.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch.strategies import DDPStrategy, Strategy

DEEPSPEED = {"deepspeed_zero2": (2, False), "deepspeed_zero2_offload": (2, True),
             "deepspeed_zero3": (3, False), "deepspeed_zero3_offload": (3, True)}
STRATEGIES = ("auto", "ddp", *DEEPSPEED, "fsdp2")


def build_strategy(name: str = "auto", timeout_s: int = 1800, find_unused_parameters: bool = False,
                   reshard_after_forward: bool = True, bucket_size: int = 200_000_000) -> Strategy | str:
    """Build the strategy ``name`` (one of :data:`STRATEGIES`).

    Args:
        timeout_s: collective timeout in seconds (all distributed strategies).
        find_unused_parameters: DDP's unused-parameter search (``ddp`` only).
        reshard_after_forward: free gathered parameters after each block's forward (``fsdp2``; ``False`` keeps
            them until backward, trading memory for one all-gather less per block).
        bucket_size: elements per DeepSpeed reduce / all-gather bucket (``deepspeed_*``).
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name={name!r} is not one of {list(STRATEGIES)}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s <= 0:
        raise ValueError(f"strategy.timeout_s must be a positive integer (seconds), got {timeout_s!r}")
    if name == "auto":
        return "auto"
    gpu = torch.cuda.is_available()
    backend = "nccl" if gpu else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if name == "ddp":
        # gradients live in DDP's reduction buckets (no second copy of every gradient)
        return DDPStrategy(process_group_backend=backend, timeout=timeout,
                           find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)
    if name == "fsdp2":
        from vgen.training.fsdp import FSDP2Strategy

        return FSDP2Strategy(timeout_s=timeout_s, process_group_backend=backend,
                             reshard_after_forward=reshard_after_forward)
    from vgen.training.deepspeed import CPUDeepSpeedStrategy, VGenDeepSpeedStrategy

    stage, offload = DEEPSPEED[name]
    cls = VGenDeepSpeedStrategy if gpu else CPUDeepSpeedStrategy
    strategy = cls(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
                   allgather_bucket_size=bucket_size, reduce_bucket_size=bucket_size,
                   process_group_backend=backend, timeout=timeout, exclude_frozen_parameters=True, logging_batch_size_per_gpu=1,
                   pin_memory=gpu)
    # offloaded optimizer state is stepped by the stage's torch AdamW on the CPU (no JIT-compiled DeepSpeed ops)
    strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy


__all__ = ["STRATEGIES", "build_strategy"]
