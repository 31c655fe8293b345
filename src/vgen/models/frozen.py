"""Frozen pretrained components (VAE, CLIP towers): the eval-only module base and strict weight loading.

Weights are read with safetensors or weights-only (:mod:`vgen.checkpoint.safe_load`); a file that needs full
unpickling is refused: convert such a file to safetensors with the tool that wrote it.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import nn


class FrozenModule(nn.Module):
    """Base of inference-only wrappers: call :meth:`freeze` at the end of ``__init__``; ``train()`` keeps eval."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save`` file (a ``{'state_dict': ...}`` wrapper is opened).

    Pickle files are read with ``weights_only=True``: a file that also stores Python objects is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    from vgen.checkpoint.safe_load import load_weights_only

    state = load_weights_only(path, mmap=zipfile.is_zipfile(path))  # refuses anything but tensors, naming the file
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise TypeError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Give ``module`` the tensors of ``state_dict`` (cast to each parameter's dtype; ``assign=True``, so a module
    built on the meta device becomes real). Raises naming every missing, unexpected and mismatched key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match {type(module).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): {', '.join(keys)}")
        raise ValueError("\n".join(lines))
    module.load_state_dict({k: state_dict[k].to(v.dtype) for k, v in expected.items()}, strict=True, assign=True)


def build_frozen(factory: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor] | None, source: str,
                 seed: int = 0) -> nn.Module:
    """``factory()`` given the tensors of ``state_dict`` (built on the meta device, so no time is spent on a random
    init), or, without weights, random-initialised from ``seed`` so every process builds the same model."""
    if state_dict is None:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return factory()
    with torch.device("meta"):
        module = factory()
    load_strict(module, state_dict, source)
    return module
