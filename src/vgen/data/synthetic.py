"""Synthetic moving shapes: the demo data and the direction check a benchmark runs on generated videos.

A saturated coloured shape on a plain dark background moves at constant speed in one of four directions.
Captions name the colour, the shape and the direction ("a red circle moving left"), so a small model has to
read the caption to get the motion right. A few (color, shape, direction) combinations are never written
to training shards (:data:`HELD_OUT`): sampling those prompts tests composition, not memory.
``data_pipelines/synthetic.py`` writes the shards; this module only renders and measures (numpy only).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square", "triangle"),
    "direction": ("left", "right", "up", "down"),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 30, 30),
    "green": (30, 215, 40),
    "blue": (40, 80, 255),
    "yellow": (245, 225, 30),
}
BACKGROUND = (20, 20, 20)
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Each colour and each direction is held out exactly once, so every attribute is still seen in training.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "right"),
    ("green", "square", "up"),
    ("blue", "triangle", "down"),
    ("yellow", "circle", "left"),
)
TRAINING_COMBOS: tuple[tuple[str, str, str], ...] = tuple(
    combo for combo in itertools.product(*ATTRIBUTES.values()) if combo not in HELD_OUT
)

RADIUS_RANGE = (0.10, 0.15)  # shape radius as a fraction of the frame size
TRAVEL_RANGE = (0.50, 0.65)  # distance covered over the whole clip, as a fraction of the frame size
EXTENT = 1.1  # the shapes reach at most EXTENT * radius from their centre
PATHS = ("random", "edge", "fixed")  # see sample_motion


@dataclass(frozen=True)
class Motion:
    """Where the shape starts (centre, pixels), how fast it moves (pixels/frame) and its radius (pixels)."""

    start: tuple[float, float]
    speed: float
    radius: float


def caption(color: str, shape: str, direction: str | None = None) -> str:
    """Caption text: 'a red circle moving left', or 'a red circle' without a direction (images)."""
    text = f"a {color} {shape}"
    return f"{text} moving {direction}" if direction else text


def sample_motion(
    direction: str, frames: int, size: int, rng: np.random.Generator, paths: str = "random",
    travel_range: tuple[float, float] = TRAVEL_RANGE,
) -> Motion:
    """A random radius, speed and start such that the shape stays whole inside the frame throughout.

    ``paths``: ``"random"`` draws the distance travelled from :data:`TRAVEL_RANGE` and the start along and
    across the motion; ``"edge"`` travels the whole span, edge to edge (the start along the motion is fixed by the
    direction), across still random; ``"fixed"`` also centres it across, so a direction has one path. The same
    random draws are made in every mode. ``travel_range`` (fractions of the frame size, ``"random"`` paths only)
    widens the speeds drawn, e.g. (0.05, 0.75) for clips from nearly still to fast.
    """
    if paths not in PATHS:
        raise ValueError(f"paths must be one of {PATHS}, got {paths!r}")
    radius = rng.uniform(*RADIUS_RANGE) * size
    low, high = EXTENT * radius, size - EXTENT * radius
    travel = min(rng.uniform(*travel_range) * size, high - low) if frames > 1 else 0.0
    if paths != "random" and frames > 1:
        travel = high - low
    dx, dy = DIRECTIONS[direction]
    slack = max(high - low - travel, 0.0)  # travel may use the whole span (then the start is fixed)
    along_start = (low if dx + dy > 0 else low + travel) + rng.uniform(0.0, slack)
    across = rng.uniform(low, high)
    if paths == "fixed":
        across = size / 2
    start = (along_start, across) if dx else (across, along_start)
    return Motion(start=start, speed=travel / max(frames - 1, 1), radius=radius)


def render_frame(color: str, shape: str, center: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: one shape, no anti-aliasing."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - center[0], ys - center[1]
    if shape == "circle":
        mask = dx**2 + dy**2 <= radius**2
    elif shape == "square":
        mask = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * radius
    elif shape == "triangle":  # apex up, base 0.8 r below the centre
        mask = (dy <= 0.8 * radius) & (np.abs(dx) <= (dy + EXTENT * radius) * EXTENT / 1.9)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {ATTRIBUTES['shape']}")
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    image[mask] = COLORS[color]
    return image


def render_clip(color: str, shape: str, direction: str, motion: Motion, frames: int, size: int) -> np.ndarray:
    """uint8 [frames, size, size, 3]: the shape moving ``motion.speed`` px per frame towards ``direction``."""
    dx, dy = DIRECTIONS[direction]
    x0, y0 = motion.start
    return np.stack(
        [
            render_frame(
                color, shape, (x0 + dx * motion.speed * t, y0 + dy * motion.speed * t), motion.radius, size
            )
            for t in range(frames)
        ]
    )


def centroids(frames: np.ndarray, threshold: float = 48.0) -> np.ndarray:
    """Foreground centroid (x, y) per frame [F, 2], NaN where a frame has no foreground.

    ``frames`` is [F, H, W, 3] in 0..255. The background is each frame's median colour (the shape is small),
    the foreground every pixel whose largest channel difference from it exceeds ``threshold``.
    """
    frames = np.asarray(frames, dtype=np.float32)
    background = np.median(frames.reshape(len(frames), -1, 3), axis=1)
    foreground = np.abs(frames - background[:, None, None, :]).max(axis=-1) > threshold
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]] + 0.5
    counts = foreground.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (foreground * xs).sum(axis=(1, 2)) / counts
        y = (foreground * ys).sum(axis=(1, 2)) / counts
    return np.stack([x, y], axis=1)


def centroid_track(frames: np.ndarray, min_shift: float = 0.05, threshold: float = 48.0) -> str | None:
    """The direction the foreground moves between the first and last frames that have one.

    Returns "left" / "right" / "up" / "down" by the dominant axis of the displacement, or ``None`` if fewer
    than two frames have a foreground or it moves less than ``min_shift`` of the frame size.
    """
    track = centroids(frames, threshold)
    track = track[~np.isnan(track).any(axis=1)]
    if len(track) < 2:
        return None
    dx, dy = track[-1] - track[0]
    height, width = np.shape(frames)[1:3]
    if abs(dx) / width >= abs(dy) / height:
        return None if abs(dx) < min_shift * width else ("right" if dx > 0 else "left")
    return None if abs(dy) < min_shift * height else ("down" if dy > 0 else "up")
