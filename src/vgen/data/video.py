"""Video bytes <-> uint8 frames with PyAV (or, for decoding, optionally decord), entirely in memory (no temporary
files).

Decoding is fps-aware: a clip is read at ``stride = max(1, round(native_fps / sample_fps))`` so that every
training clip covers about the same wall-clock time whatever the source frame rate, as VGen's loader does.
"""

from __future__ import annotations

import io
import random
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np

from vgen.data.errors import SampleError

VIDEO_EXTENSIONS = ("mp4", "webm", "avi", "mkv", "mov")
STARTS = ("random", "first", "center")
BACKENDS = ("pyav", "decord")


class Clip(NamedTuple):
    """``frames`` uint8 [F, H, W, 3]; ``fps`` = native fps / stride; ``start`` index of the first frame."""

    frames: np.ndarray
    fps: float
    start: int
    stride: int


def frame_stride(native_fps: float, sample_fps: float) -> int:
    """Source frames between two sampled frames: ``max(1, round(native_fps / sample_fps))``."""
    return max(1, round(native_fps / sample_fps))


def decode_video(
    data: bytes,
    num_frames: int,
    sample_fps: float,
    start: str = "random",
    rng: random.Random | None = None,
    backend: str = "pyav",
) -> Clip:
    """Decode ``num_frames`` frames at ``sample_fps`` from encoded video bytes (mp4, webm, ...).

    ``start`` places the window: ``"random"`` (uniform, drawn from ``rng``), ``"first"`` or ``"center"``.
    Seeks to the keyframe before the window instead of decoding from the beginning. ``backend`` is ``"pyav"``
    or ``"decord"`` (optional dependency, ``pip install 'vgen[decord]'``): the same window, the same frames.
    Raises :class:`SampleError` for undecodable data (reason ``"undecodable"``) and for clips shorter than
    the window (reason ``"too_short"``).
    """
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if start == "random" and rng is None:
        raise ValueError('start="random" needs an rng (random.Random)')
    if num_frames < 1 or sample_fps <= 0:
        raise ValueError(f"need num_frames >= 1 and sample_fps > 0, got {num_frames} and {sample_fps}")
    if backend == "decord":
        return _decode_with_decord(data, num_frames, sample_fps, start, rng)
    if backend != "pyav":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise SampleError("no video stream in the container")
            stream = container.streams.video[0]
            # One decoder thread: loader workers already fill the cores, and starting a thread pool per clip
            # made small clips about 3x slower to decode.
            stream.codec_context.thread_count = 1
            return _read_window(container, stream, num_frames, sample_fps, start, rng)
    except av.FFmpegError as exc:
        raise SampleError(f"undecodable video ({len(data)} bytes): {exc}") from exc


def _window(native_fps: float, available: int, num_frames: int, sample_fps: float, start: str, rng) -> list[int]:
    """The source frame indices of the clip: ``num_frames`` at the fps-aware stride, placed by ``start``."""
    if native_fps <= 0:
        raise SampleError("the video stream has no frame rate")
    stride = frame_stride(native_fps, sample_fps)
    span = (num_frames - 1) * stride + 1
    if available < span:
        raise SampleError(
            f"too few frames: need {num_frames} at stride {stride} ({span} source frames), have {available}",
            reason="too_short",
        )
    if start == "random":
        first = rng.randint(0, available - span)
    elif start == "center":
        first = (available - span) // 2
    else:
        first = 0
    return list(range(first, first + span, stride))


def _decode_with_decord(data: bytes, num_frames: int, sample_fps: float, start: str, rng) -> Clip:
    """:func:`decode_video` with decord's ``VideoReader`` (frame-accurate random access) on the same window."""
    try:
        import decord
    except ImportError as exc:
        raise ImportError("the decord video backend needs decord: pip install 'vgen[decord]'") from exc
    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    except Exception as exc:  # decord raises RuntimeError / DECORDError for unreadable data
        raise SampleError(f"undecodable video ({len(data)} bytes): {str(exc).strip()[:200]}") from exc
    native_fps = float(reader.get_avg_fps() or 0)
    wanted = _window(native_fps, len(reader), num_frames, sample_fps, start, rng)
    try:
        frames = reader.get_batch(wanted).asnumpy()
    except Exception as exc:
        raise SampleError(f"undecodable video ({len(data)} bytes): {str(exc).strip()[:200]}") from exc
    stride = frame_stride(native_fps, sample_fps)
    return Clip(np.ascontiguousarray(frames, dtype=np.uint8), native_fps / stride, wanted[0], stride)


def _read_window(container, stream, num_frames, sample_fps, start, rng) -> Clip:
    native_fps = float(stream.average_rate or stream.guessed_rate or 0)
    available = stream.frames or (_frames_from_duration(container, stream, native_fps) if native_fps > 0 else 0)
    wanted = _window(native_fps, available, num_frames, sample_fps, start, rng)
    first, stride = wanted[0], frame_stride(native_fps, sample_fps)
    frames = _decode_indices(container, stream, wanted, native_fps, seek_index=first)
    if frames is None:  # the seek landed past the window (unusual index); read from the beginning instead
        frames = _decode_indices(container, stream, wanted, native_fps, seek_index=0)
    if len({frame.shape for frame in frames}) > 1:
        raise SampleError(f"the frame size changes within the clip: {sorted({f.shape for f in frames})}")
    return Clip(np.stack(frames), native_fps / stride, first, stride)


def _frames_from_duration(container, stream, native_fps: float) -> int:
    if stream.duration is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return 0
    return int(seconds * native_fps + 0.5)


def _decode_indices(container, stream, wanted: list[int], native_fps: float, seek_index: int):
    """RGB frames at the ``wanted`` source indices, decoding from the keyframe before ``seek_index``.

    Returns ``None`` if a seek past frame 0 overshot ``wanted[0]``. A missing index (variable frame rate,
    dropped frame) is filled by the next decoded frame.
    """
    origin = stream.start_time or 0
    seconds_per_tick = float(stream.time_base)
    container.seek(origin + int(seek_index / native_fps / seconds_per_tick), stream=stream)
    frames, position = [], 0
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        index = round((frame.pts - origin) * seconds_per_tick * native_fps)
        if seek_index > 0 and not frames and index > wanted[0]:
            return None
        if index < wanted[position]:
            continue
        rgb = frame.to_ndarray(format="rgb24")
        while position < len(wanted) and index >= wanted[position]:
            frames.append(rgb)
            position += 1
        if position == len(wanted):
            return frames
    raise SampleError(
        f"too few frames: the clip ended before source frame {wanted[position]} "
        f"(the window ends at {wanted[-1]})",
        reason="too_short",
    )


def encode_video(
    frames: np.ndarray, fps: float, crf: int = 18, keyframe_interval: int | None = None
) -> bytes:
    """H.264 mp4 from uint8 frames [F, H, W, 3]: yuv420p, or yuv444p when H or W is odd (4:2:0 cannot hold it).

    Single-threaded and without mb-tree so the bytes are identical on every run; ``keyframe_interval``
    defaults to x264's (250).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    # x264's macroblock-tree rate control makes the bytes vary from run to run (measured: about 1 encode in 3
    # of some clips, even single-threaded); without it the output is reproducible and ~15% larger.
    options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
    if keyframe_interval is not None:
        options |= {"g": str(keyframe_interval), "keyint_min": str(keyframe_interval)}
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        odd = frames.shape[1] % 2 or frames.shape[2] % 2
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p" if odd else "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = options
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()
