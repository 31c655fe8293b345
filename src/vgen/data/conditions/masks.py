"""Random inpainting masks and the masked video (VideoComposer's ``mask`` condition, 4 channels).

The masks follow the recipe of VideoComposer's ``random_mask``: drawn on a 512 x 512 canvas and resized (nearest)
to the frame, 70% irregular brush strokes, 20% rectangles, 10% "uncrop" halves; 1 marks the region to generate.
Here the canvas is evaluated directly at the output pixels' centres (the same as drawing at 512 and resizing
nearest, without the 512 x 512 intermediate).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vgen.data.conditions.frames import as_uint8_frames

CANVAS = 512
KINDS = ("strokes", "rectangles", "uncrop")
KIND_PROBABILITIES = (0.7, 0.2, 0.1)


def random_mask(height: int, width: int, kind: str | None = None,
                generator: np.random.Generator | int | None = None) -> torch.Tensor:
    """A random inpainting mask -> float32 [1, H, W] in {0, 1}, 1 = masked (to be generated).

    ``kind``: ``"strokes"`` (1-5 brush strokes of 1-5 straight segments each, 10-209 canvas px long and 5-104 px
    thick, round ends), ``"rectangles"`` (1-4 boxes of 30-149 canvas px a side, 10 px from the canvas border), or
    ``"uncrop"`` (the top, bottom, left or right half); ``None`` draws the kind with probabilities 0.7 / 0.2 / 0.1.
    ``generator``: a numpy ``Generator`` or a seed (``None``: fresh entropy). Sizes are in canvas pixels (512 a
    side), scaled with the output, so the masked fraction does not depend on the resolution.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    if kind is None:
        kind = KINDS[int(rng.choice(len(KINDS), p=KIND_PROBABILITIES))]
    # Canvas coordinates of the output pixels' centres.
    ys = (np.arange(height) + 0.5) * (CANVAS / height)
    xs = (np.arange(width) + 0.5) * (CANVAS / width)
    mask = {"strokes": _strokes, "rectangles": _rectangles, "uncrop": _uncrop}[kind](rng, ys, xs)
    return torch.from_numpy(mask.astype(np.float32))[None]


def _strokes(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    py, px = ys[:, None], xs[None, :]
    mask = np.zeros((len(ys), len(xs)), bool)
    for stroke in range(int(rng.integers(1, 6))):
        x1, y1 = float(rng.integers(CANVAS)), float(rng.integers(CANVAS))
        for _ in range(1 + int(rng.integers(5))):
            angle = 0.01 + int(rng.integers(4))  # radians; every other stroke turns the other way
            if stroke % 2 == 0:
                angle = 2 * math.pi - angle
            length = 10 + int(rng.integers(200))
            thickness = 5 + int(rng.integers(100))
            x2 = float(np.clip(int(x1 + length * math.sin(angle)), 0, CANVAS))
            y2 = float(np.clip(int(y1 + length * math.cos(angle)), 0, CANVAS))
            mask |= _segment_distance(px, py, x1, y1, x2, y2) <= thickness / 2
            x1, y1 = x2, y2
    return mask


def _segment_distance(px, py, x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    """Distance of points to the segment (x1, y1)-(x2, y2): a thick line with round ends is ``<= thickness / 2``."""
    dx, dy = x2 - x1, y2 - y1
    length2 = dx * dx + dy * dy
    t = np.clip(((px - x1) * dx + (py - y1) * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
    return np.hypot(px - (x1 + t * dx), py - (y1 + t * dy))


def _rectangles(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, margin: int = 10, smallest: int = 30,
                largest: int = 150) -> np.ndarray:
    mask = np.zeros((len(ys), len(xs)), bool)
    for _ in range(int(rng.integers(1, 5))):
        box_w, box_h = int(rng.integers(smallest, largest)), int(rng.integers(smallest, largest))
        left = int(rng.integers(margin, CANVAS - margin - box_w + 1))
        top = int(rng.integers(margin, CANVAS - margin - box_h + 1))
        mask |= ((ys >= top) & (ys < top + box_h))[:, None] & ((xs >= left) & (xs < left + box_w))[None, :]
    return mask


def _uncrop(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    half = CANVAS / 2
    side = int(rng.integers(4))
    rows, cols = np.ones(len(ys), bool), np.ones(len(xs), bool)
    if side == 0:
        rows = ys < half  # top
    elif side == 1:
        rows = ys >= half  # bottom
    elif side == 2:
        cols = xs < half  # left
    else:
        cols = xs >= half  # right
    return rows[:, None] & cols[None, :]


def masked_video(frames, mask: torch.Tensor) -> torch.Tensor:
    """VideoComposer's masked video -> float32 [4, F, H, W]: the frames in [-1, 1] with the masked region set to 0,
    then the known-region indicator ``1 - mask`` (1 where the frame is kept, 0 where it is to be generated).

    ``frames`` uint8 [F, H, W, 3]; ``mask`` in {0, 1} (1 = masked), [1, H, W] (one mask for the clip, as from
    :func:`random_mask`), [F, H, W] or [1, F, H, W].
    """
    video = as_uint8_frames(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)  # [3, F, H, W]
    count, height, width = video.shape[1:]
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch tensor, got {type(mask).__name__}")
    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 3 or tuple(mask.shape[-2:]) != (height, width) or mask.shape[0] not in (1, count):
        raise ValueError(f"mask must be [1, H, W], [F, H, W] or [1, F, H, W] with F={count}, H={height}, "
                         f"W={width} (the frames'), got {tuple(mask.shape)}")
    keep = (1.0 - mask.float()).expand(count, height, width)[None]  # [1, F, H, W]
    return torch.cat([video * keep, keep]).contiguous()
