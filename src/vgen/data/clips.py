"""Turning raw videos into training clips (for ``data_pipelines/``): resampled, resized frames read from a
file, a motion score, scene cuts, and cheap probes of encoded media for filtering."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import av
import numpy as np
from PIL import Image

from vgen.data.errors import SampleError

THUMB = 32  # motion and cut detection work on THUMB x THUMB grey frames


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int
    duration: float


def scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``short_side`` (aspect kept, both even); as is if None."""
    if short_side is None:
        return width - width % 2, height - height % 2
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [THUMB, THUMB] grey in [0, 1]."""
    image = Image.fromarray(frame).convert("L").resize((THUMB, THUMB), Image.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


def motion_score(thumbs: list[np.ndarray]) -> float:
    """Mean absolute difference between consecutive grey thumbnails (0 = still, ~0.5 = noise)."""
    if len(thumbs) < 2:
        return 0.0
    return float(np.mean([np.abs(a - b).mean() for a, b in pairwise(thumbs)]))


def read_frames(source, fps: float | None, short_side: int | None) -> tuple[VideoInfo, Iterator[np.ndarray]]:
    """Open a video (path or bytes); return its info and an iterator of RGB frames resampled to ``fps``
    (the first frame at or after each output time; None = every frame) and resized (short side)."""
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
        stream = container.streams.video[0]
    except (av.FFmpegError, IndexError, OSError) as exc:
        raise SampleError(f"cannot open video: {exc}") from exc
    native = float(stream.average_rate or stream.guessed_rate or 0)
    if native <= 0:
        container.close()
        raise SampleError("the video stream has no frame rate")
    frames = stream.frames or 0
    duration = float(stream.duration * stream.time_base) if stream.duration else (
        container.duration / av.time_base if container.duration else frames / native)
    info = VideoInfo(stream.codec_context.width, stream.codec_context.height, native,
                     frames or round(duration * native), duration)
    width, height = scaled_size(info.width, info.height, short_side)
    step = 1.0 / fps if fps else 0.0

    def generate() -> Iterator[np.ndarray]:
        next_time, origin = 0.0, None
        try:
            for frame in container.decode(stream):
                time = float(frame.time) if frame.time is not None else 0.0
                origin = time if origin is None else origin
                if step and time - origin + 1e-6 < next_time:
                    continue
                next_time += step
                yield frame.to_ndarray(width=width, height=height, format="rgb24")
        except av.FFmpegError as exc:
            raise SampleError(f"undecodable video: {exc}") from exc
        finally:
            container.close()

    return info, generate()


def probe_video(data: bytes) -> VideoInfo:
    """Size, frame rate, frame count and duration of an encoded video, read from its headers."""
    info, frames = read_frames(data, None, None)
    for _ in frames:  # start the generator so that closing it closes the container
        frames.close()
    return info


def video_motion(data: bytes, max_frames: int = 32) -> float:
    """:func:`motion_score` over the first ``max_frames`` frames of an encoded video."""
    _, frames = read_frames(data, None, THUMB)
    thumbs = []
    for frame in frames:
        thumbs.append(thumbnail(frame))
        if len(thumbs) == max_frames:
            frames.close()
    return motion_score(thumbs)


def image_size(data: bytes) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError) as exc:
        raise SampleError(f"undecodable image: {exc}") from exc
