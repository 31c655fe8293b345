"""Motion vectors from the video codec itself (VideoComposer's ``motion`` condition, 2 channels).

A P- or B-frame of an H.264 / MPEG-4 stream stores, per block, where its content was in a reference frame. FFmpeg
hands those vectors out when the decoder runs with ``flags2=+export_mvs`` (frame side data ``MOTION_VECTORS``,
one ``AVMotionVector`` per block: ``source`` -1 for a past and +1 for a future reference, block size ``w``/``h``,
block centres ``src``/``dst``, and ``motion = (src - dst) * motion_scale``). No optical flow is computed.

Sign convention (the same as the original's ``source * motion / motion_scale``): a vector is the displacement of
the content *from frame t-1 to frame t*, in pixels, +x right and +y down. A past reference gives ``dst - src``; a
future reference gives ``src - dst`` (where the content goes next), so both point the way things move. A block's
vector is written on every pixel of the block at its destination (the original writes it on the destination's
centre pixel only); where blocks overlap (B-frames with two references) the vectors are averaged. Pixels no block
covers and frames without vectors (I-frames) are 0.

VideoComposer re-encodes every video to MPEG-4 at the training fps with ffmpeg before reading vectors, so that they
describe the motion between the sampled frames. :func:`motion_vectors` does the same in memory with PyAV by
default (decode the sampled frames, encode them to MPEG-4 with P-frames only, read the encoder's vectors back:
:func:`motion_vectors_from_frames`), or reads the stream's own vectors (H.264, MPEG-4, ...) with
``reencode=False``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F

from vgen.data.conditions.frames import as_uint8_frames
from vgen.data.video import frame_stride

DEFAULT_MOTION_SCALE = 4.0
"""Default divisor of the vectors (pixels of the output map per frame): a clip of a few hundred pixels sampled
at 4-8 fps typically moves 1-10 px per frame, so the map is O(1)."""


def motion_vectors(
    video: bytes,
    num_frames: int | None,
    size: int | Sequence[int] | None = None,
    fps: float | None = None,
    *,
    start: int = 0,
    motion_scale: float = DEFAULT_MOTION_SCALE,
    reencode: bool = True,
) -> torch.Tensor:
    """The codec's motion vectors of ``num_frames`` frames of an encoded video -> float32 [2, F, H, W].

    Args:
        video: the encoded file's bytes (mp4, mkv, avi, ...).
        num_frames: frames to return (``None``: every frame from ``start`` on).
        size: the output map's size, ``int`` (square) or ``[width, height]`` (the config ``resolution`` order);
            ``None`` keeps the video's size. The field is resized like the frames (scaled to cover, centre crop,
            :func:`vgen.data.transforms.resize_center_crop`) and the vectors are scaled with it, so they are in
            output pixels.
        fps: sample the video at this rate, taking every ``round(native_fps / fps)``-th frame as
            :func:`vgen.data.decode_video` does (``None``: every frame).
        start: index (in the video's own frames) of the first frame, e.g. :attr:`vgen.data.Clip.start`.
        motion_scale: the vectors (output pixels per sampled frame) are divided by this.
        reencode: ``True`` (the original's way): decode the sampled frames and re-encode them to MPEG-4 with
            P-frames only, so every vector spans exactly one sampled frame. ``False``: the stream's own vectors,
            without re-encoding (faster; needs ``fps`` None or the native rate, and a codec that exports vectors;
            in a stream with B-frames or several reference frames a vector may span more than one frame, e.g. an
            x264 P-frame after 3 B-frames holds 4 frames' motion).

    Returns:
        float32 [2, F, H, W]: channel 0 the x and channel 1 the y displacement of the content from the previous
        sampled frame, in output pixels / ``motion_scale`` (unbounded; typically within a few units); 0 on I-frames
        and wherever no block carries a vector.
    """
    if not isinstance(video, (bytes, bytearray, memoryview)):
        raise TypeError(f"video must be the encoded file's bytes, got {type(video).__name__}")
    if num_frames is not None and (isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1):
        raise ValueError(f"num_frames must be an integer >= 1 or None, got {num_frames!r}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0 or None, got {fps!r}")
    _check_scale(motion_scale)
    try:
        with av.open(io.BytesIO(bytes(video)), mode="r") as container:
            if not container.streams.video:
                raise ValueError(f"video ({len(video)} bytes) has no video stream")
            stream = container.streams.video[0]
            native_fps = float(stream.average_rate or stream.base_rate or 0)
            stride = frame_stride(native_fps, fps) if fps is not None and native_fps > 0 else 1
            if reencode:
                picked = _read_frames(container, stream, start, stride, num_frames)
            else:
                if stride != 1:
                    raise ValueError(f"fps={fps} takes every {stride}th frame of this {native_fps:g} fps video, but "
                                     "the stream's own vectors describe the motion between its own frames: use "
                                     "reencode=True")
                stream.codec_context.options = {"flags2": "+export_mvs"}
                fields, exported = _read_vectors(container, stream, start, num_frames)
                if fields and not exported:
                    raise ValueError(f"the video's codec ({stream.codec_context.name}) exports no motion vectors: "
                                     "use reencode=True")
                return _finish(fields, num_frames, start, size, motion_scale)
    except av.FFmpegError as exc:
        raise ValueError(f"video ({len(video)} bytes) is not decodable: {exc}") from exc
    if not picked:
        raise ValueError(f"video has no frame at index {start} (start) and after")
    _check_length(len(picked), num_frames, start)
    return motion_vectors_from_frames(np.stack(picked), size, motion_scale=motion_scale)


def motion_vectors_from_frames(
    frames, size: int | Sequence[int] | None = None, *, motion_scale: float = DEFAULT_MOTION_SCALE
) -> torch.Tensor:
    """Motion vectors of decoded frames: encode them to MPEG-4 in memory (PyAV), read the encoder's vectors back.

    ``frames`` are uint8 [F, H, W, 3], e.g. a :class:`vgen.data.Clip`'s frames, taken as consecutive (so the
    vectors describe the motion between them, whatever the clip's fps). Only the first frame is intra-coded (its
    map is 0). ``size`` and ``motion_scale`` as in :func:`motion_vectors`; returns float32 [2, F, H, W].
    """
    frames = as_uint8_frames(frames).numpy()
    _check_scale(motion_scale)
    count, height, width = frames.shape[:3]
    # MPEG-4 part 2 needs even sizes: replicate the last row/column, crop the field back afterwards.
    padded = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    data = _encode_mpeg4(padded)
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        fields, _ = _read_vectors(container, stream, 0, count)
    fields = [field[:, :height, :width] for field in fields]
    _check_length(len(fields), count, 0)
    return _finish(fields, count, 0, size, motion_scale)


def rasterise_vectors(vectors: np.ndarray, height: int, width: int) -> np.ndarray:
    """One frame's ``AVMotionVector`` records (PyAV ``MotionVectors.to_ndarray()``) -> float32 [2, H, W] in pixels.

    Each block's displacement (``sign(source) * motion / motion_scale``: the content's motion from the previous
    frame, see the module notes) is written on every pixel of the block around ``dst``; overlapping blocks average.
    """
    out = np.zeros((2, height * width), np.float64)
    count = np.zeros(height * width, np.float64)
    if len(vectors):
        sign = np.sign(vectors["source"].astype(np.float64))
        scale = vectors["motion_scale"].astype(np.float64)
        scale[scale == 0] = 1.0
        dx = sign * vectors["motion_x"] / scale
        dy = sign * vectors["motion_y"] / scale
        block_w, block_h = vectors["w"].astype(np.int64), vectors["h"].astype(np.int64)
        left = vectors["dst_x"].astype(np.int64) - block_w // 2
        top = vectors["dst_y"].astype(np.int64) - block_h // 2
        for bw, bh in set(zip(block_w.tolist(), block_h.tolist())):
            chosen = (block_w == bw) & (block_h == bh)
            oy, ox = np.mgrid[0:bh, 0:bw]
            ys = top[chosen, None, None] + oy  # [N, bh, bw]
            xs = left[chosen, None, None] + ox
            inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
            index = (ys * width + xs)[inside]
            weights = np.broadcast_to(inside, inside.shape)[inside]
            out[0] += np.bincount(index, np.broadcast_to(dx[chosen, None, None], inside.shape)[inside],
                                  minlength=height * width)
            out[1] += np.bincount(index, np.broadcast_to(dy[chosen, None, None], inside.shape)[inside],
                                  minlength=height * width)
            count += np.bincount(index, weights.astype(np.float64), minlength=height * width)
    out = np.divide(out, count, out=np.zeros_like(out), where=count > 0)
    return out.reshape(2, height, width).astype(np.float32)


def _check_scale(motion_scale: float) -> None:
    if isinstance(motion_scale, bool) or not isinstance(motion_scale, (int, float)) or not motion_scale > 0:
        raise ValueError(f"motion_scale must be a number > 0, got {motion_scale!r}")


def _check_length(available: int, num_frames: int | None, start: int) -> None:
    if num_frames is not None and available < num_frames:
        raise ValueError(f"video has only {available} frames from index {start} (start) on at the sampled rate, "
                         f"fewer than num_frames={num_frames}")


def _motion_side_data(frame) -> np.ndarray | None:
    for data in frame.side_data:
        if data.type == av.sidedata.sidedata.Type.MOTION_VECTORS:
            return data.to_ndarray()
    return None


def _read_vectors(container, stream, start: int, num_frames: int | None) -> tuple[list[np.ndarray], bool]:
    """Decode frames ``start ..`` of a stream opened with export_mvs -> (a field [2, H, W] in pixels per frame,
    whether any frame carried vectors)."""
    fields, exported = [], False
    stream.codec_context.thread_count = 1
    for index, frame in enumerate(container.decode(stream)):
        if index < start:
            continue
        vectors = _motion_side_data(frame)
        exported |= vectors is not None
        if vectors is None:
            fields.append(np.zeros((2, frame.height, frame.width), np.float32))
        else:
            fields.append(rasterise_vectors(vectors, frame.height, frame.width))
        if num_frames is not None and len(fields) == num_frames:
            break
    return fields, exported


def _read_frames(container, stream, start: int, stride: int, num_frames: int | None) -> list[np.ndarray]:
    frames = []
    stream.codec_context.thread_count = 1
    for index, frame in enumerate(container.decode(stream)):
        if index >= start and (index - start) % stride == 0:
            frames.append(frame.to_ndarray(format="rgb24"))
            if num_frames is not None and len(frames) == num_frames:
                break
    return frames


def _encode_mpeg4(frames: np.ndarray) -> bytes:
    """uint8 [F, H, W, 3] (even H, W) -> MPEG-4 part 2 in an AVI, one intra frame then P-frames only."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.gop_size = len(frames) + 1
        stream.codec_context.max_b_frames = 0
        stream.bit_rate = 20_000_000
        # Block matching by squared error (the default, absolute error, leaves more moving blocks at 0 on flat
        # content); one vector per 16x16 macroblock.
        stream.options = {"cmp": "sse", "subcmp": "sse"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _output_size(size, height: int, width: int) -> tuple[int, int]:
    """-> (height, width) of the output map."""
    if size is None:
        return height, width
    if isinstance(size, int) and not isinstance(size, bool):
        out = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2:
        out = (int(size[1]), int(size[0]))
    else:
        raise ValueError(f"size must be an int or [width, height], got {size!r}")
    if min(out) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return out


def _finish(fields: list[np.ndarray], num_frames, start: int, size, motion_scale: float) -> torch.Tensor:
    if not fields:
        raise ValueError(f"video has no frame at index {start} (start) and after")
    _check_length(len(fields), num_frames, start)
    field = torch.from_numpy(np.stack(fields, axis=1))  # [2, F, Hs, Ws]
    field = resize_field(field, *_output_size(size, field.shape[-2], field.shape[-1]))
    return (field / float(motion_scale)).float().contiguous()


def resize_field(field: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A [2, F, Hs, Ws] displacement field (pixels) -> [2, F, height, width] in the new pixels: scaled to cover the
    target (bilinear, antialiased), centre-cropped like the frames, and each component multiplied by its scale."""
    source_height, source_width = field.shape[-2:]
    scale = max(width / source_width, height / source_height)
    resized = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
    if resized != (source_height, source_width):
        field = F.interpolate(field.float().permute(1, 0, 2, 3), size=resized, mode="bilinear", antialias=True,
                              align_corners=False).permute(1, 0, 2, 3)
        factors = torch.tensor([resized[1] / source_width, resized[0] / source_height]).view(2, 1, 1, 1)
        field = field * factors
    top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
    return field[:, :, top:top + height, left:left + width]
