"""Writing and reading short videos as real H.264 mp4 files with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch

from vgen.data.video import encode_video


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 8, crf: int = 18) -> Path:
    """uint8 [F, H, W, 3] -> H.264 mp4 file (see :func:`vgen.data.video.encode_video`).

    Written to a temporary name and renamed, so a reader never sees a half-written file.
    """
    data = encode_video(frames, fps, crf=crf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a whole (short) video file -> (uint8 [F, H, W, 3], fps)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate or stream.base_rate or 0)
    return np.stack(frames), fps


def upscale_frames(frames: np.ndarray, factor: int) -> np.ndarray:
    """[F, H, W, C] -> [F, H * factor, W * factor, C]: each pixel becomes a ``factor`` x ``factor`` block."""
    return frames.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else frames
