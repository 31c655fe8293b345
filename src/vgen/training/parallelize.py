"""Parallelism applied to the UNet from outside (torchtitan style): the model never knows how it is sharded.

* :func:`shard_unet` -- FSDP2 ``fully_shard`` on every ResBlock and spatial/temporal transformer (the units
  the UNet calls one by one), then on the UNet itself for the remaining parameters (embeddings, the input
  and output convolutions, resamplers). Parameters become ``DTensor`` shards; each block's weights are
  gathered just before it runs and freed after it (``reshard_after_forward``).
* :func:`compile_blocks` -- ``torch.compile`` of the same blocks in place (parameter names do not change).

Activation checkpointing is the model's own per-block switch (``UNet3D.set_gradient_checkpointing``), which
composes with both.
"""

from __future__ import annotations

import torch
from torch import nn

from vgen.models.blocks import ResBlock, SpatialTransformer, TemporalTransformer

BLOCKS = (ResBlock, SpatialTransformer, TemporalTransformer)
PARAM_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    return [m for m in unet.modules() if isinstance(m, BLOCKS)]


def is_sharded(unet: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unet.parameters())


def shard_unet(unet: nn.Module, mesh, precision: str = "32-true", reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2-shard ``unet`` over ``mesh`` block by block; mixed precision computes in bf16/fp16 and reduces in fp32.

    The sharded parameters stay float32 (the optimizer's master weights); ``precision`` only sets the dtype
    they are gathered in for compute.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES.get(precision), reduce_dtype=torch.float32)
    for block in unet_blocks(unet):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(unet, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return unet


# One compiled graph per block shape: a full UNet has ~15 ResBlock shapes, more than dynamo's default limit of 8
# recompilations per code object (past it a block silently runs eagerly).
RECOMPILE_LIMIT = 64


def compile_blocks(unet: nn.Module) -> nn.Module:
    """``torch.compile`` every block in place (idempotent), with static shapes.

    Static: each block shape gets its own graph (the blocks of one class share a code object, so dynamo would
    otherwise turn to dynamic shapes after the second shape, which inductor's CPU backend fails on for these
    blocks in torch 2.14). Raises dynamo's recompilation limit to :data:`RECOMPILE_LIMIT` for the same reason.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in unet_blocks(unet):
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=False)
    return unet
