"""Condition extractors for VideoComposer's compositional conditions: pure functions from a clip to its maps.

Convention (:mod:`vgen.data.conditions.frames`): a clip comes in as **uint8 frames [F, H, W, 3]** (RGB, numpy or
torch) and every map goes out as a **float32 torch tensor [C, F, H, W]** at the frames' size (one sample of the
[B, C, F, H, W] maps :class:`vgen.models.conditions.SpatioTemporalCondition` takes):

==================================  ==============  =======================================================
function                            output          values
==================================  ==============  =======================================================
:func:`motion_vectors` (bytes)      [2, F, H, W]    codec motion vectors (dx, dy), output px / motion_scale
:func:`motion_vectors_from_frames`  [2, F, H, W]    the same from decoded frames (MPEG-4 re-encode)
:func:`canny_edges`                 [1, F, H, W]    {0, 1}
:func:`sketch`                      [1, F, H, W]    [0, 1] weight-free edge strength (lines ~1)
:func:`pidinet_sketch`              [1, F, H, W]    [0, 1] PiDiNet (+ simplifier) sketch (lines ~1)
:func:`single_sketch`               [1, F, H, W]    the first frame's sketch repeated
:func:`depth_map`                   [1, F, H, W]    [0, 10] DPT inverse depth / 20 (or [0, 1] normalised)
:func:`random_mask`                 [1, H, W]       {0, 1}, 1 = to be generated
:func:`masked_video`                [4, F, H, W]    frames in [-1, 1] * (1 - mask), then 1 - mask
:func:`first_frame_map`             [3, F, H, W]    the first frame in [0, 1] repeated (``local_image``)
:func:`palette_histogram`           [F, 156]        per-frame colour fractions (rows sum to 1)
==================================  ==============  =======================================================

The networks (:class:`PiDiNet`, :class:`SketchSimplifier`, :class:`DepthEstimator`) load their weights from local
files only (:func:`load_pidinet`, :func:`load_sketch_simplifier`, :func:`load_depth_estimator`). The depth parts
import ``transformers`` on first use.
"""

import importlib

from vgen.data.conditions.edges import canny_edges, sketch
from vgen.data.conditions.frames import as_uint8_frames, first_frame_map, single_sketch, to_unit
from vgen.data.conditions.masks import masked_video, random_mask
from vgen.data.conditions.motion import motion_vectors, motion_vectors_from_frames, rasterise_vectors
from vgen.data.conditions.palette import PALETTE_BINS, palette_histogram
from vgen.data.conditions.pidinet import (
    PiDiNet,
    SketchSimplifier,
    load_pidinet,
    load_sketch_simplifier,
    pidinet_sketch,
)

_LAZY = {name: "vgen.data.conditions.depth" for name in ("DepthEstimator", "depth_map", "load_depth_estimator")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PALETTE_BINS",
    "DepthEstimator",
    "PiDiNet",
    "SketchSimplifier",
    "as_uint8_frames",
    "canny_edges",
    "depth_map",
    "first_frame_map",
    "load_depth_estimator",
    "load_pidinet",
    "load_sketch_simplifier",
    "masked_video",
    "motion_vectors",
    "motion_vectors_from_frames",
    "palette_histogram",
    "pidinet_sketch",
    "random_mask",
    "rasterise_vectors",
    "single_sketch",
    "sketch",
    "to_unit",
]
