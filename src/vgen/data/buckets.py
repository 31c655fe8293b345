"""Batch shapes: buckets of (frames, width, height) with a draw probability and a batch size.

Images are buckets with ``frames == 1``. With ``mode="batch"`` (Open-Sora style joint image-video batching)
every batch draws its bucket with probability ``probability / sum(probabilities)``; with ``mode="rank"`` (VGen's
per-rank frame lengths) rank ``r`` always uses bucket ``r % len(buckets)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

BUCKET_MODES = ("batch", "rank")


@dataclass(frozen=True)
class Bucket:
    """One batch shape: ``frames`` x ``height`` x ``width`` pixels, ``batch_size`` samples per batch."""

    frames: int
    width: int
    height: int
    batch_size: int
    probability: float = 1.0

    @property
    def kind(self) -> str:
        return "image" if self.frames == 1 else "video"

    @classmethod
    def parse(cls, entry: Mapping, key: str) -> Bucket:
        known = [field.name for field in fields(cls)]
        if not isinstance(entry, Mapping) or set(entry) - set(known) or set(known[:4]) - set(entry):
            raise ValueError(f"{key} must be a mapping with keys {known} (probability optional), got {entry!r}")
        for name in known[:4]:
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}.{name} must be an integer >= 1, got {value!r}")
        probability = entry.get("probability", 1.0)
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or probability < 0:
            raise ValueError(f"{key}.probability must be a number >= 0, got {probability!r}")
        return cls(**{**entry, "probability": float(probability)})


def parse_buckets(buckets, key: str) -> list[Bucket]:
    """Buckets from a config list of mappings, or the Python form ``{(frames, height, width): (p, batch_size)}``."""
    if isinstance(buckets, Mapping):
        entries = []
        for shape, value in buckets.items():
            if len(shape) != 3 or len(value) != 2:
                raise ValueError(f"{key}: expected {{(frames, height, width): (probability, batch_size)}}")
            (frames, height, width), (probability, batch_size) = shape, value
            entries.append({"frames": frames, "width": width, "height": height, "batch_size": batch_size,
                            "probability": probability})
    elif isinstance(buckets, Sequence) and not isinstance(buckets, str) and buckets:
        entries = list(buckets)
    else:
        raise ValueError(f"{key} must be a non-empty list of {{frames, width, height, batch_size, probability}}")
    parsed = [Bucket.parse(entry, f"{key}[{i}]") for i, entry in enumerate(entries)]
    if not any(bucket.probability > 0 for bucket in parsed):
        raise ValueError(f"{key}: at least one bucket needs a probability > 0")
    return parsed
