"""Frames -> model input: resize to cover the target, centre crop, scale to [-1, 1].

Resolutions in configs are ``[width, height]`` (the VGen convention); the functions here take them as
named arguments so the order cannot be mixed up.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_center_crop(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> float32 [3, F, height, width] in [-1, 1].

    Scales (bilinear, antialiased) so the frame covers ``width x height`` (the short side relative to the
    target fits exactly), then crops the centre, like VGen's ``CenterCropWide``.
    """
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    source_height, source_width = video.shape[-2:]
    scale = max(width / source_width, height / source_height)
    resized = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
    if resized != (source_height, source_width):
        video = F.interpolate(video, size=resized, mode="bilinear", antialias=True, align_corners=False)
    top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()
