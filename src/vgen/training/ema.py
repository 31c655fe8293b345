"""Exponential moving average of a module's trainable parameters, kept in float32 and sharded like the model.

It is deliberately not an ``nn.Module``: DDP would otherwise broadcast the whole shadow copy every step as a
buffer. Where the model is sharded the shadow is sharded the same way, so it costs each rank the same fraction
of memory as the parameters do:

* ``full``: every rank holds the whole shadow (single process, DDP, ZeRO-2, where parameters are replicated);
* ``dtensor``: FSDP2 -- each shadow entry is a ``DTensor`` with the parameter's mesh and placements;
* ``zero3``: DeepSpeed ZeRO-3 -- each shadow entry is this rank's flat partition of the parameter, averaged from
  DeepSpeed's float32 master partition.

The layout follows the parameters automatically (the first update, save or load after the strategy has sharded
the model converts the shadow). The stage saves it in the checkpoint under ``"ema"``; sharded strategies write
the shards beside their model shards (``vgen.training.deepspeed``, ``vgen.training.fsdp``).
"""

from __future__ import annotations

import torch
from torch import nn

LAYOUTS = ("full", "dtensor", "zero3")


def parameter_layout(param: torch.Tensor) -> str:
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return "dtensor"
    if hasattr(param, "ds_id") and getattr(param, "ds_tensor", None) is not None:
        return "zero3"
    return "full"


def zero3_partition(full: torch.Tensor, local_numel: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s flat ZeRO-3 partition of ``full`` (zero padded at the end, as DeepSpeed pads)."""
    flat = full.reshape(-1)
    part = flat[rank * local_numel:(rank + 1) * local_numel]
    if part.numel() < local_numel:
        part = torch.cat([part, part.new_zeros(local_numel - part.numel())])
    return part


def local_fp32(param: torch.Tensor, layout: str) -> torch.Tensor:
    """The float32 values of this rank's part of ``param`` (a view where the master copy is already float32)."""
    if layout == "zero3":
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param)
    local = param.detach().to_local() if layout == "dtensor" else param.detach()
    return local.float()


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` after each optimizer step (copy while ``step < start_step``)."""

    def __init__(self, module: nn.Module, decay: float = 0.9999, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.layout = "full"
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in module.named_parameters() if p.requires_grad
        }

    # ------------------------------------------------------------------ layout
    def _params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(module.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"EMA tracks parameters the model no longer has: {missing[:5]}")
        return {n: params[n] for n in self.shadow}

    def follow(self, module: nn.Module) -> None:
        """Re-lay the shadow out like ``module``'s parameters (after a strategy sharded or gathered them)."""
        params = self._params(module)
        layout = parameter_layout(next(iter(params.values())))
        if layout == self.layout:
            return
        if self.layout != "full":
            raise RuntimeError(f"EMA is laid out as {self.layout!r} but the model's parameters are now {layout!r}")
        if layout == "dtensor":
            from torch.distributed.tensor import distribute_tensor

            self.shadow = {n: distribute_tensor(self.shadow[n].to(p.device), p.device_mesh, p.placements,
                                                src_data_rank=None) for n, p in params.items()}
        else:  # zero3
            import torch.distributed as dist

            rank = dist.get_rank(params[next(iter(params))].ds_process_group)
            self.shadow = {n: zero3_partition(self.shadow[n].to(p.ds_tensor.device), p.ds_tensor.numel(), rank)
                           .clone() for n, p in params.items()}
        self.layout = layout

    # ------------------------------------------------------------------ averaging
    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        self.follow(module)
        params = self._params(module)
        names = list(self.shadow)
        device = local_fp32(params[names[0]], self.layout).device
        if self.layout == "full" and self.shadow[names[0]].device != device:
            self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        shadows = [self._local(self.shadow[n]) for n in names]
        current = [local_fp32(params[n], self.layout) for n in names]
        if step < self.start_step:
            torch._foreach_copy_(shadows, current)
        else:
            torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if self.layout == "dtensor" else tensor

    def module_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module.state_dict()`` with its trainable parameters replaced by the EMA weights (module dtypes).

        Only for the ``full`` layout (sharded EMA weights are consolidated by ``vgen.checkpoint export``).
        """
        if self.layout != "full":
            raise RuntimeError(f"module_state_dict needs the full EMA, this one is sharded ({self.layout})")
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in module.state_dict().items()}

    def full_shadow(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The whole EMA on CPU, gathered from the shards (a collective on every rank for sharded layouts)."""
        self.follow(module)
        if self.layout == "full":
            return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}
        if self.layout == "dtensor":
            return {k: v.full_tensor().cpu() for k, v in self.shadow.items()}
        import torch.distributed as dist

        params = self._params(module)
        full = {}
        for name, part in self.shadow.items():
            p = params[name]
            group = p.ds_process_group
            parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, part.contiguous(), group=group)
            full[name] = torch.cat(parts)[:p.ds_numel].view(p.ds_shape).cpu()
        return full

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """``shadow`` holds full tensors, DTensors or this rank's ZeRO-3 partitions, as ``layout`` says."""
        shadow = self.shadow if self.layout == "dtensor" else {k: v.detach().cpu() for k, v in self.shadow.items()}
        return {"decay": self.decay, "start_step": self.start_step, "layout": self.layout, "shadow": shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        unexpected = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        layout = state.get("layout", "full")
        if layout != self.layout:
            raise ValueError(f"EMA state is laid out as {layout!r} but this run's EMA is {self.layout!r}; "
                             "resume with the strategy that wrote the checkpoint, or export and restart from weights")
        for name, target in self.shadow.items():
            value = state["shadow"][name]
            if value is target:
                continue
            if self._local(target).shape != self._local(value).shape:
                raise ValueError(f"EMA entry {name!r} has shape {tuple(self._local(value).shape)} in the checkpoint "
                                 f"but {tuple(self._local(target).shape)} here (was the world size changed?)")
            self._local(target).copy_(self._local(value))
