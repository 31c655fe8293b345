"""Motion magnitude from optical flow: torchvision's RAFT (Teed & Deng 2020) with weights from a file.

The file is a torchvision RAFT state dict: ``raft_large_C_T_SKHT_V2-ff5fadd5.pth`` (``Raft_Large_Weights.DEFAULT``)
or ``raft_small_C_T_V2-01064c6d.pth`` (``Raft_Small_Weights.DEFAULT``), or the same tensors as ``.safetensors``;
large or small is read from its keys (only RAFT-large has the convex-upsampling ``mask_predictor``), then it is
loaded strictly. Frames are resized so that their short side is ``size`` pixels (each side a multiple of 8, as
RAFT needs; at least 128), pixels scaled to [-1, 1]; 12 flow updates. A video's motion is the mean flow length over all pixels
and adjacent-frame pairs, as a fraction of the resized frame width (resolution-independent: 0.01 = 1% of the
width per frame).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vgen.eval.i3d import one_line

FLOW_UPDATES = 12
MIN_SIZE = 128  # RAFT's correlation pyramid needs feature maps (1/8 of the frame) of at least 16x16


def load_raft(path: str | Path) -> torch.nn.Module:
    """RAFT (large or small, by the keys of ``path``) with the weights of ``path``, loaded strictly."""
    from torchvision.models.optical_flow import raft_large, raft_small

    from vgen.models.frozen import build_frozen, read_state_dict

    state = read_state_dict(path)
    factory = raft_large if any(k.startswith("mask_predictor.") for k in state) else raft_small
    try:
        return build_frozen(factory, state, source=str(path)).eval().requires_grad_(False)
    except ValueError as err:
        raise ValueError(one_line(err)) from None


class MotionMagnitude:
    """Mean optical-flow length per adjacent-frame pair (fraction of the frame width) of uint8 videos."""

    def __init__(self, weights: str | Path, size: int = 256, device: torch.device | str = "cpu"):
        if size < MIN_SIZE:
            raise ValueError(f"optical flow needs frames of at least {MIN_SIZE} pixels, got size {size}")
        self.model = load_raft(weights).to(device)
        self.size, self.device = size, torch.device(device)

    def _resize(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float()
        height, width = x.shape[-2:]
        scale = self.size / min(height, width)
        shape = [max(MIN_SIZE, round(side * scale / 8) * 8) for side in (height, width)]
        return F.interpolate(x, size=shape, mode="bilinear", align_corners=False) / 127.5 - 1

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray]) -> list[float]:
        scores = []
        for video in videos:
            if len(video) < 2:
                scores.append(float("nan"))
                continue
            frames = self._resize(video)
            flow = self.model(frames[:-1].contiguous(), frames[1:].contiguous(), num_flow_updates=FLOW_UPDATES)[-1]
            scores.append(float(flow.norm(dim=1).mean() / frames.shape[-1]))
        return scores
