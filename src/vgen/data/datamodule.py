"""The Lightning datamodule Hydra builds from ``conf/data/*.yaml``.

Batches are homogeneous (all video or all image) dicts:

* ``video``: float32 [B, 3, F, H, W] in [-1, 1]; images have F = 1,
* ``caption``: list[str], ``key``: list[str] (the WebDataset sample keys),
* ``fps``: int64 [B], the effective frame rate of the sampled frames (native fps / stride, rounded);
  image batches report 1,
* ``kind``: ``"video"`` or ``"image"``.

Resolutions are given as ``[width, height]`` (the VGen convention).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from urllib.parse import urlparse

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader

from vgen.data.stream import MixedBatches, SampleDecoder, SourceStream

CONFIG_PREFIX = "data"  # the config group these settings live under, used in error messages
SOURCE_TYPES = ("video", "image")


@dataclass(frozen=True)
class SourceConfig:
    """One entry of ``data.sources``: where the shards are, what they hold, how often to draw from them."""

    urls: str | list[str]
    type: str
    weight: float = 1.0
    caption_required: bool = True

    @classmethod
    def parse(cls, entry: Mapping, key: str) -> SourceConfig:
        if not isinstance(entry, Mapping):
            raise TypeError(f"{key} must be a mapping with keys urls, type, weight, caption_required")
        known = [field.name for field in fields(cls)]
        if set(entry) - set(known) or "urls" not in entry or "type" not in entry:
            raise ValueError(f"{key} needs 'urls' and 'type' and accepts only {known}; got {sorted(entry)}")
        urls = entry["urls"] if isinstance(entry["urls"], str) else [str(u) for u in entry["urls"]]
        source = cls(urls, entry["type"], entry.get("weight", 1.0), entry.get("caption_required", True))
        if source.type not in SOURCE_TYPES:
            raise ValueError(f"{key}.type must be one of {list(SOURCE_TYPES)}, got {source.type!r}")
        if not isinstance(source.weight, (int, float)) or source.weight < 0:
            raise ValueError(
                f"{key}.weight must be a number >= 0 (0 disables the source), got {source.weight!r}"
            )
        if not isinstance(source.caption_required, bool):
            raise TypeError(f"{key}.caption_required must be true or false, got {source.caption_required!r}")
        return source


def resolve_shards(urls: str | Sequence[str], key: str) -> list[str]:
    """Expand brace patterns (``videos-{000000..000007}.tar``) and check that local shards exist.

    Remote URLs (``pipe:``, ``http:``, ...) are passed through unchecked. ``key`` names the config entry in
    the :class:`FileNotFoundError` raised for an empty pattern or missing / zero-byte local shards.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    shards = [url for pattern in patterns for url in wds.shardlists.expand_urls(pattern)]
    if not shards:
        raise FileNotFoundError(f"{key} lists no shards (got {urls!r})")
    missing = [url for url in shards if _is_local(url) and not _nonempty_file(url)]
    if missing:
        raise FileNotFoundError(
            f"{key}: {len(missing)} of {len(shards)} shards are missing or empty, e.g. {missing[0]} "
            f"(from {urls!r}); write them first (the demo: python data_pipelines/synthetic.py --out DIR) "
            "or fix the path"
        )
    return shards


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _nonempty_file(url: str) -> bool:
    path = urlparse(url).path if url.startswith("file:") else url
    return os.path.isfile(path) and os.path.getsize(path) > 0


def _int_at_least(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{CONFIG_PREFIX}.{name} must be an integer >= {minimum}, got {value!r}")
    return value


class VideoDataModule(L.LightningDataModule):
    """WebDataset video and image sources -> an endless loader of homogeneous, weight-mixed batches.

    ``sources``: list of ``{urls, type: video | image, weight: float, caption_required: bool}``; ``urls`` is
    a path, brace pattern or ``pipe:`` URL, or a list of them. A batch comes from source ``i`` with
    probability ``weight_i / sum(weights)`` (a weight of 0 disables the source). ``batch_size`` counts
    videos and ``image_batch_size`` images per batch. ``sample_fps`` sets the frame stride (see
    :func:`vgen.data.video.frame_stride`). ``random_start=False`` takes the centre window. ``resolution``
    is ``[width, height]``.
    """

    def __init__(
        self,
        sources: Sequence[Mapping],
        num_frames: int = 16,
        sample_fps: float = 8,
        resolution: Sequence[int] = (448, 256),
        batch_size: int = 2,
        image_batch_size: int = 16,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 100,
        random_start: bool = True,
    ):
        super().__init__()
        if isinstance(sources, (str, Mapping)) or not sources:
            raise ValueError(f"{CONFIG_PREFIX}.sources must be a non-empty list of sources, got {sources!r}")
        self.sources = [SourceConfig.parse(entry, self._key(i)) for i, entry in enumerate(sources)]
        if not any(source.weight > 0 for source in self.sources):
            raise ValueError(f"{CONFIG_PREFIX}.sources: at least one source needs a weight > 0")
        self.num_frames = _int_at_least(num_frames, "num_frames")
        if not isinstance(sample_fps, (int, float)) or sample_fps <= 0:
            raise ValueError(f"{CONFIG_PREFIX}.sample_fps must be a number > 0, got {sample_fps!r}")
        self.sample_fps = sample_fps
        if isinstance(resolution, str) or len(resolution) != 2:
            raise ValueError(f"{CONFIG_PREFIX}.resolution must be [width, height], got {resolution!r}")
        self.width = _int_at_least(resolution[0], "resolution[0] (width)")
        self.height = _int_at_least(resolution[1], "resolution[1] (height)")
        self.batch_size = _int_at_least(batch_size, "batch_size")
        self.image_batch_size = _int_at_least(image_batch_size, "image_batch_size")
        self.num_workers = _int_at_least(num_workers, "num_workers", minimum=0)
        self.seed = _int_at_least(seed, "seed", minimum=0)
        self.shuffle_buffer = _int_at_least(shuffle_buffer, "shuffle_buffer", minimum=0)
        if not isinstance(random_start, bool):
            raise TypeError(f"{CONFIG_PREFIX}.random_start must be true or false, got {random_start!r}")
        self.random_start = random_start
        self.dataset: MixedBatches | None = None

    @staticmethod
    def _key(index: int) -> str:
        return f"{CONFIG_PREFIX}.sources[{index}]"

    def check_sources(self) -> None:
        """Fail fast (before any model is built) if an enabled source has no readable shards."""
        for index, source in enumerate(self.sources):
            if source.weight > 0:
                resolve_shards(source.urls, f"{self._key(index)}.urls")

    def setup(self, stage: str | None = None) -> None:
        """Resolve and check every enabled source's shards, then build the mixed stream."""
        if self.dataset is not None:
            return
        readers = max(self.num_workers, 1) * (self.trainer.world_size if self.trainer is not None else 1)
        streams, weights = [], []
        for index, source in enumerate(self.sources):
            if source.weight == 0:
                continue
            key = self._key(index)
            shards = resolve_shards(source.urls, f"{key}.urls")
            if len(shards) < readers:
                raise ValueError(
                    f"{key}.urls has {len(shards)} shard(s) but {readers} readers (ranks x workers) share "
                    f"it; write at least {readers} shards or lower {CONFIG_PREFIX}.num_workers"
                )
            video = source.type == "video"
            decoder = SampleDecoder(
                kind=source.type,
                num_frames=self.num_frames if video else 1,
                sample_fps=self.sample_fps,
                width=self.width,
                height=self.height,
                start="random" if self.random_start else "center",
                caption_required=source.caption_required,
            )
            batch_size = self.batch_size if video else self.image_batch_size
            streams.append(SourceStream(key, shards, decoder, batch_size, self.seed, self.shuffle_buffer))
            weights.append(float(source.weight))
        self.dataset = MixedBatches(streams, weights, self.seed)

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("fit")
        return DataLoader(
            self.dataset,
            batch_size=None,  # the stream batches itself: each batch is all video or all image
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
