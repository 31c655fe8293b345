"""Frame conventions shared by the condition extractors, and the two trivial conditions.

Every extractor takes a clip as **uint8 frames [F, H, W, 3]** (RGB, a numpy array or a torch uint8 tensor): what
:func:`vgen.data.decode_video` returns and what shards, ``vgen.sample`` and PIL give. Every extractor returns a
**float32 torch tensor [C, F, H, W]** (channels first, then frames: one sample of the ``[B, C, F, H, W]`` maps that
:class:`vgen.models.conditions.SpatioTemporalCondition` takes) at the frames' own size, on the CPU unless a network
ran elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch


def as_uint8_frames(frames, name: str = "frames") -> torch.Tensor:
    """uint8 [F, H, W, 3] (numpy or torch) -> a uint8 torch tensor [F, H, W, 3]; anything else raises naming it."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{name} must be uint8 frames [F, H, W, 3] (numpy or torch), got {type(frames).__name__}")
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"{name} must be uint8 frames [F, H, W, 3] with F, H, W >= 1, got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    return frames


def to_unit(frames, name: str = "frames") -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [F, 3, H, W] in [0, 1] (the batch layout the networks take)."""
    return as_uint8_frames(frames, name).permute(0, 3, 1, 2).float().div_(255.0)


def first_frame_map(frames) -> torch.Tensor:
    """VideoComposer's ``local_image``: the first frame in [0, 1] repeated over the clip -> float32 [3, F, H, W]."""
    video = to_unit(frames)
    return video[:1].expand(video.shape[0], -1, -1, -1).permute(1, 0, 2, 3).contiguous()


def single_sketch(sketch: torch.Tensor) -> torch.Tensor:
    """VideoComposer's ``single_sketch``: the first frame's map of a [1, F, H, W] sketch repeated over the clip.

    Takes the output of :func:`vgen.data.conditions.sketch` or :func:`vgen.data.conditions.pidinet_sketch` (any
    [C, F, H, W] map works); returns the same shape, range and dtype.
    """
    if not isinstance(sketch, torch.Tensor) or sketch.ndim != 4:
        raise ValueError(f"sketch must be a [C, F, H, W] tensor, got {getattr(sketch, 'shape', type(sketch))}")
    return sketch[:, :1].expand_as(sketch).contiguous()
