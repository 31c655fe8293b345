"""Switches for the UNet's faster computation orders, one per idea, for A/B runs (``benchmarks/unet_step.py``).

Every switch computes the same function with the same parameters (state dicts are unchanged); only the order and
shape of the operations differ, so results agree to float rounding, not bit for bit:

* ``temporal_conv_2d``: the temporal convolutions (``Conv3d`` with kernel (3, 1, 1)) run as a 2-D convolution with
  kernel (3, 1) on the ``[B, C, F, H*W]`` view of the video (the 3-D kernels are much slower on CPU).
* ``clip_context``: cross-attention projects the caption tokens to keys/values once per *clip* instead of once per
  frame (the original repeats the context F times); all frames' queries then attend to the clip's keys/values.
  Per-frame tokens (VideoComposer's histogram, I2VGen-XL local tokens) keep the per-frame path.
* ``channels_last_temporal``: the temporal transformers' 1x1 ``Conv1d`` projections run as linear layers on
  channel-last tokens (one permute in, one out, instead of transposes around every projection).
* ``small_attention_bmm``: on CPU, attention whose keys are at most ``SMALL_ATTENTION_KEYS`` long (temporal
  attention over the frames) runs as plain ``bmm`` + softmax, which beats SDPA's CPU kernel at these lengths;
  the batch chunking that works around a CUDA grid limit is skipped on CPU.
* ``split_geglu``: the feed-forward's GEGLU projection computes its value and gate halves as two products with
  the weight's halves (two contiguous tensors) instead of one product split into two strided views, which GELU
  and its backward process far more slowly on CPU.

``reference_order()`` turns all of them off: the computation order of the original VGen code.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields

SMALL_ATTENTION_KEYS = 16


@dataclass
class FastPaths:
    temporal_conv_2d: bool = True
    clip_context: bool = True
    channels_last_temporal: bool = True
    small_attention_bmm: bool = True
    split_geglu: bool = True


FAST = FastPaths()
NAMES = tuple(f.name for f in fields(FastPaths))

if os.environ.get("VGEN_REFERENCE_ORDER", "0") not in ("", "0"):  # whole process in the original's order
    for _name in NAMES:
        setattr(FAST, _name, False)


def set_fast_paths(**flags: bool) -> None:
    """Turn named fast paths on or off for the whole process, e.g. ``set_fast_paths(clip_context=False)``."""
    unknown = sorted(set(flags) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown fast path(s) {unknown}; known: {list(NAMES)}")
    for name, value in flags.items():
        setattr(FAST, name, bool(value))


def current() -> dict[str, bool]:
    return {name: getattr(FAST, name) for name in NAMES}


@contextlib.contextmanager
def fast_paths(**flags: bool):
    """Within the block, the named fast paths are set as given (the others keep their values)."""
    before = current()
    set_fast_paths(**flags)
    try:
        yield
    finally:
        set_fast_paths(**before)


def reference_order():
    """Context manager: every fast path off (the original VGen computation order)."""
    return fast_paths(**{name: False for name in NAMES})


__all__ = ["FAST", "NAMES", "SMALL_ATTENTION_KEYS", "FastPaths", "current", "fast_paths", "reference_order",
           "set_fast_paths"]
