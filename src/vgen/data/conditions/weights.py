"""Reading annotator weights: safetensors or weights-only torch files, loaded strictly, errors naming the file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A weights file -> a flat state dict: safetensors, or a torch file read weights-only
    (:func:`vgen.checkpoint.safe_load.load_weights_only`: a pickle that would run code is refused, naming the file);
    unwraps a ``state_dict`` entry and strips a ``module.`` prefix. ``what`` names the model in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file: {exc}") from None
    else:
        from vgen.checkpoint.safe_load import load_weights_only

        state = load_weights_only(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a {what} state dict (parameter name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path, what: str) -> None:
    """``model.load_state_dict(state, strict=True)``, raising one line naming ``path`` and the first missing,
    unexpected or wrongly shaped keys instead of torch's long message."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"{path}: does not match the {what} ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
