"""Toy metrics on the synthetic moving-shape data (:mod:`vgen.data.synthetic`): what the demo and the toy
benchmarks measure, in one place.

Each is a per-video score in {0, 1} of uint8 frames [F, H, W, 3] and the prompt they were made for:

* ``direction``: the centroid tracker (:func:`~vgen.data.synthetic.centroid_track`) finds the prompted direction;
* ``shape_found``: a foreground shape is found in at least two frames (the video has not collapsed);
* ``color``: the foreground's median colour is nearest (RGB) to the prompted colour.

``direction`` and ``color`` need prompts of the demo's caption form, "a <color> <shape> moving <direction>"
(:func:`~vgen.data.synthetic.caption`).
"""

from __future__ import annotations

import re

import numpy as np

from vgen.data.synthetic import ATTRIBUTES, COLORS, centroid_track, centroids

_CAPTION = re.compile(r"^a ({}) ({})(?: moving ({}))?$".format(*("|".join(v) for v in ATTRIBUTES.values())))
FOREGROUND_THRESHOLD = 48.0  # as centroid_track's


def parse_caption(prompt: str) -> dict[str, str | None] | None:
    """``{"color", "shape", "direction"}`` of a demo caption (direction None for a still's caption), or None."""
    match = _CAPTION.match(prompt.strip().lower())
    return None if match is None else dict(zip(ATTRIBUTES, match.groups()))


def _attribute(prompt: str, name: str, metric: str) -> str:
    parsed = parse_caption(prompt)
    if parsed is None or parsed[name] is None:
        raise ValueError(f"metric {metric} needs prompts of the demo's form 'a <color> <shape> moving <direction>' "
                         f"(vgen.data.synthetic), got {prompt!r}")
    return parsed[name]


def direction(frames: np.ndarray, prompt: str) -> float:
    """1.0 if the shape moves in the prompted direction (centroid tracker), else 0.0."""
    return float(centroid_track(frames) == _attribute(prompt, "direction", "direction"))


def shape_found(frames: np.ndarray, prompt: str | None = None) -> float:
    """1.0 if a foreground shape is found in at least two frames, else 0.0."""
    return float((~np.isnan(centroids(frames)).any(axis=1)).sum() >= 2)


def color(frames: np.ndarray, prompt: str) -> float:
    """1.0 if the foreground pixels' median colour is nearest to the prompted colour, else 0.0 (also when no
    foreground is found)."""
    wanted = _attribute(prompt, "color", "color")
    pixels = np.asarray(frames, dtype=np.float32).reshape(len(frames), -1, 3)
    background = np.median(pixels, axis=1, keepdims=True)
    foreground = pixels[np.abs(pixels - background).max(axis=-1) > FOREGROUND_THRESHOLD]
    if not len(foreground):
        return 0.0
    median = np.median(foreground, axis=0)
    nearest = min(COLORS, key=lambda name: float(np.sum((np.asarray(COLORS[name]) - median) ** 2)))
    return float(nearest == wanted)


TOY_METRICS = {"direction": direction, "shape_found": shape_found, "color": color}
