"""The metric registry of ``python -m vgen.eval``: ``metrics=[fvd,clipsim,direction,...]`` picks from
:data:`METRICS`.

A metric maps a batch of uint8 videos [F, H, W, 3] and their prompts to one value per video: a score (reported
as the mean over videos, NaN ignored) or a feature vector (``features=True``: the set of vectors is compared with
the reference set's, FVD). Adding one is one :class:`MetricSpec` in :data:`METRICS`: what it measures, which
options it needs (weight files, a reference set) and how to build it from the shared :class:`Extractors`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vgen.eval import toy
from vgen.eval.frechet import frechet_distance_of_features


@dataclass
class Extractors:
    """Options and lazily built networks shared by the metrics (one CLIP model for CLIPSIM and consistency)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    i3d_weights: str | None = None
    clip_weights: str | None = None
    clip_arch: str = "ViT-H-14"
    raft_weights: str | None = None
    flow_size: int = 256
    _built: dict = field(default_factory=dict, repr=False)

    def _get(self, name: str, build: Callable):
        if name not in self._built:
            try:
                self._built[name] = build()
            except TypeError as err:  # read_state_dict: a file that holds something other than a state dict
                raise ValueError(str(err)) from None
        return self._built[name]

    def i3d(self):
        from vgen.eval.i3d import load_i3d

        return self._get("i3d", lambda: load_i3d(self.i3d_weights).to(self.device))

    def clip(self):
        from vgen.eval.clip import ClipScorer

        return self._get("clip", lambda: ClipScorer(self.clip_arch, self.clip_weights, self.device))

    def motion(self):
        from vgen.eval.flow import MotionMagnitude

        return self._get("motion", lambda: MotionMagnitude(self.raft_weights, self.flow_size, self.device))


class Metric:
    """One metric: ``metric(videos, prompts)`` -> values [N] (scores) or [N, D] (``features``);
    :meth:`summarise` turns all videos' values into the reported number. A features metric also has
    ``reference`` (the reference set's features, set by the run) and ``fingerprint()`` (what they depend on
    besides the videos: the cache key)."""

    features = False
    protocol: str | None = None  # how it is measured, written next to the number

    def __init__(self, name: str, fn: Callable[[list[np.ndarray], list[str]], list[float]]):
        self.name, self.fn = name, fn

    def __call__(self, videos: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        return np.asarray(self.fn(videos, prompts), dtype=np.float64)

    def summarise(self, values: np.ndarray) -> float:
        values = np.asarray(values, dtype=np.float64)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


class FrechetVideoDistance(Metric):
    """FVD: the Fréchet distance between the I3D features of the videos and those of the reference set."""

    features = True

    def __init__(self, extractors: Extractors):
        from vgen.eval.i3d import FVD_PROTOCOL, i3d_features

        super().__init__("fvd", lambda videos, prompts: i3d_features(extractors.i3d(), videos))
        self.protocol = FVD_PROTOCOL
        self.weights = extractors.i3d_weights
        self.reference: np.ndarray | None = None  # the reference set's features, set by the run

    def fingerprint(self) -> str:
        """What the reference features depend on besides the videos: the protocol and the weights' bytes."""
        return f"{self.protocol}|i3d sha256 {file_sha256(self.weights)}"

    def summarise(self, values: np.ndarray) -> float:
        if self.reference is None:
            raise ValueError("fvd needs the reference set's features (reference=)")
        if len(values) < 2 or len(self.reference) < 2:
            raise ValueError(f"fvd needs at least 2 videos in each set, got {len(values)} generated and "
                             f"{len(self.reference)} reference")
        return frechet_distance_of_features(self.reference, values)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _toy(name: str) -> Callable[[Extractors], Metric]:
    fn = toy.TOY_METRICS[name]
    return lambda extractors: Metric(name, lambda videos, prompts: [fn(v, p) for v, p in zip(videos, prompts)])


@dataclass(frozen=True)
class MetricSpec:
    description: str  # what it measures (README, error messages)
    needs: tuple[str, ...]  # the options it cannot run without
    build: Callable[[Extractors], Metric]


METRICS: dict[str, MetricSpec] = {
    "fvd": MetricSpec("Fréchet video distance to the reference videos on I3D features (lower is better)",
                      ("reference", "i3d_weights"), FrechetVideoDistance),
    "clipsim": MetricSpec("mean CLIP cosine of the prompt and each frame", ("clip_weights",),
                          lambda e: Metric("clipsim", lambda videos, prompts: e.clip().clipsim(videos, prompts))),
    "consistency": MetricSpec("mean CLIP cosine of adjacent frames", ("clip_weights",),
                              lambda e: Metric("consistency", lambda videos, prompts: e.clip().consistency(videos))),
    "motion": MetricSpec("mean RAFT optical-flow length per frame, fraction of the frame width", ("raft_weights",),
                         lambda e: Metric("motion", lambda videos, prompts: e.motion()(videos))),
    "direction": MetricSpec("demo toy: share of videos whose shape moves the prompted way", (), _toy("direction")),
    "shape_found": MetricSpec("demo toy: share of videos with a shape in at least two frames", (),
                              _toy("shape_found")),
    "color": MetricSpec("demo toy: share of videos whose shape has the prompted colour", (), _toy("color")),
}


def build_metrics(names: list[str], extractors: Extractors) -> list[Metric]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric {unknown[0]!r}; valid metrics: {', '.join(METRICS)}")
    return [METRICS[name].build(extractors) for name in names]
