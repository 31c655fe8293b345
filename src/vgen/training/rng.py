"""Random-number-generator state as fixed-size tensors, so every rank's state can be gathered into a checkpoint.

Python's ``random``, NumPy's global generator, torch's CPU generator and (when present) the current CUDA
device's generator are captured. Dropout, diffusion noise and timesteps, and CFG dropout draw from these, so
restoring them is what makes a resumed run continue bit for bit.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict[str, torch.Tensor]:
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    if np_name != "MT19937" or version != 3:
        raise RuntimeError(f"unexpected RNG kinds: python v{version}, numpy {np_name}")
    state = {
        "python": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),  # [cached?, value]
        "numpy": torch.tensor([*np_keys.tolist(), np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, torch.Tensor]) -> None:
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), gauss if has_gauss else None))
    values = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(values[:624], dtype=np.uint32), int(values[624]), int(values[625]),
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def select_rank(gathered: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s state from the ``[world_size, ...]`` tensors of :func:`capture` gathered over ranks."""
    return {k: v[rank].clone() for k, v in gathered.items()}  # own storage: set_rng_state reads it raw
