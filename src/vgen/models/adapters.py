"""Adapters: trainable modules added to a frozen base UNet from outside it, as one mechanism.

An :class:`Adapter` is applied to a built UNet (the base network's own keys and computation stay as they are at
initialisation), names the parameters it adds, saves and loads just those, and folds itself into the base weights
on request. A stage with adapters trains only them and writes adapter-only checkpoints that name their base
weights (``stage.init``); :class:`vgen.pipeline.VideoPipeline` loads the base, applies the adapters and loads their
weights. LoRA (:class:`vgen.models.lora.LoRA`) is one; DreamVideo's identity and motion adapters are others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import safetensors
import torch
from torch import nn

from vgen.models.frozen import read_state_dict


class Adapter:
    """Base class. Subclasses implement :meth:`apply`, :meth:`parameter_names` and the key ``markers``."""

    markers: tuple[str, ...] = ()  # substrings that mark this adapter's keys in a state dict (vgen or original names)

    def apply(self, unet: nn.Module) -> list[str]:
        """Add the adapter's modules to ``unet`` (in place); returns the names of the modules adapted."""
        raise NotImplementedError

    def parameter_names(self, unet: nn.Module) -> list[str]:
        """Names (in ``unet.named_parameters()``) of the parameters this adapter added."""
        raise NotImplementedError

    def config(self) -> dict:
        """Constructor arguments that rebuild this adapter (stored in adapter-only checkpoints)."""
        return {}

    def merge(self, unet: nn.Module) -> None:
        """Fold the adapter into the base weights for inference (adapters that cannot are left as they are)."""

    def unmerge(self, unet: nn.Module) -> None:
        """Undo :meth:`merge`."""

    @contextlib.contextmanager
    def disabled(self, unet: nn.Module) -> Iterator[None]:
        """Run ``unet`` as its base network inside the block (e.g. for a regulariser towards the base)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be disabled")
        yield

    def load_weights(self, unet: nn.Module, path: str | Path) -> None:
        """Load this adapter's weights from a file of its own (safetensors or a weights-only torch file)."""
        state = read_state_dict(path)
        load_adapter_state(unet, self, state, str(path))

    def owns(self, key: str) -> bool:
        return any(marker in key for marker in self.markers)


@contextlib.contextmanager
def adapters_disabled(unet: nn.Module, adapters: Mapping[str, Adapter]) -> Iterator[None]:
    """Every adapter of ``adapters`` disabled inside the block."""
    with contextlib.ExitStack() as stack:
        for adapter in adapters.values():
            stack.enter_context(adapter.disabled(unet))
        yield


def adapter_parameter_names(unet: nn.Module, adapters: Mapping[str, Adapter]) -> list[str]:
    names: list[str] = []
    for adapter in adapters.values():
        names += [n for n in adapter.parameter_names(unet) if n not in names]
    return names


def load_adapter_state(unet: nn.Module, adapter: Adapter, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into the adapter's parameters strictly: every adapter key, nothing else, same shapes."""
    params = dict(unet.named_parameters())
    expected = adapter.parameter_names(unet)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (file {tuple(state[k].shape)}, model {tuple(params[k].shape)})" for k in expected
                  if k in state and tuple(state[k].shape) != tuple(params[k].shape)]
    problems = [f"{title} {items[:6]}{' ...' if len(items) > 6 else ''} ({len(items)})"
                for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if items]
    if problems:
        raise KeyError(f"{source}: adapter weights do not match the model's adapters: " + "; ".join(problems))
    with torch.no_grad():
        for key in expected:
            params[key].copy_(state[key].to(params[key].dtype))


def file_has_adapter_keys(path: str | Path, adapters: Sequence[Adapter]) -> bool:
    """Whether a weights file holds adapter weights as well (e.g. the released InstructVideo UNetSD_LoRA)."""
    path = Path(path)
    if path.is_dir() or not adapters:
        return False
    if path.suffix == ".safetensors":
        with safetensors.safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    else:
        keys = list(read_state_dict(path))
    return any(adapter.owns(k) for k in keys for adapter in adapters)


def mark_only_adapters_trainable(unet: nn.Module, adapters: Mapping[str, Adapter]) -> int:
    """``requires_grad`` on the adapters' parameters only; returns how many values train."""
    names = set(adapter_parameter_names(unet, adapters))
    if not names:
        raise ValueError("the adapters added no parameters to train")
    count = 0
    for name, param in unet.named_parameters():
        param.requires_grad_(name in names)
        count += param.numel() if name in names else 0
    return count
