"""The Lightning datamodule Hydra builds from ``conf/data/*.yaml``.

Batches are homogeneous (all video or all image, one shape) dicts:

* ``video``: float32 [B, 3, F, H, W] in [-1, 1]; images have F = 1,
* ``caption``: list[str] ("" for text-free samples), ``key``: list[str] (the WebDataset sample keys),
* ``has_caption``: bool [B], False where the sample had no caption (text-free videos),
* ``fps``: int64 [B], the effective frame rate of the sampled frames (native fps / stride, rounded);
  image batches report 1,
* ``kind``: ``"video"`` or ``"image"``.

Latent sources (``type: latent``, shards from ``data_pipelines/encode.py``) give ``latent`` [B, C, F, h, w]
(plus ``text_embedding`` / ``image_embedding`` when stored) instead of ``video``.

The loader's position is saved in every checkpoint (this datamodule's ``state_dict``: per rank and reader)
and restored on resume, so the batches after a restart are exactly those an uninterrupted run would have
seen. Resolutions are given as ``[width, height]`` (the VGen convention).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from urllib.parse import urlparse

import lightning as L
import torch.distributed as dist
import webdataset as wds
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from vgen.data.buckets import BUCKET_MODES, Bucket, parse_buckets
from vgen.data.condition_maps import parse_conditions
from vgen.data.conditions.cues import MAX_FRAMES
from vgen.data.shards import ShardSchedule
from vgen.data.stream import LOADER_KEY, SOURCE_TYPES, BatchPlan, BatchStream, SampleDecoder, Source
from vgen.data.video import BACKENDS as VIDEO_BACKENDS

log = logging.getLogger(__name__)

CONFIG_PREFIX = "data"  # the config group these settings live under, used in error messages
STATE_VERSION = 1


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


def _video_backend(name) -> str:
    """``data.video_backend``, checked at construction: a known backend whose package imports."""
    if name not in VIDEO_BACKENDS:
        raise ValueError(f"{CONFIG_PREFIX}.video_backend must be one of {list(VIDEO_BACKENDS)}, got {name!r}")
    if name == "decord" and importlib.util.find_spec("decord") is None:
        raise ValueError(f"{CONFIG_PREFIX}.video_backend=decord: decord is not installed "
                         "(pip install 'vgen[decord]'), or choose pyav")
    return name


class VideoDataModule(L.LightningDataModule):
    """WebDataset sources -> an endless, exactly resumable loader of homogeneous batches.

    ``sources``: list of ``{urls, type: video | image | latent, weight, caption_required}``; ``urls`` is a
    path, brace pattern or ``pipe:`` URL, or a list of them. Without ``buckets``, a batch comes from source
    ``i`` with probability ``weight_i / sum(weights)`` (0 disables a source), ``batch_size`` videos of
    ``num_frames`` frames or ``image_batch_size`` images, at ``resolution`` ``[width, height]``.
    With ``buckets`` (list of ``{frames, width, height, batch_size, probability}``), those shapes are drawn
    per batch (``bucket_mode: batch``) or fixed per rank (``bucket_mode: rank``, VGen's per-rank frame
    lengths) instead, and the source among those that fit the bucket by weight. ``sample_fps`` sets the frame
    stride (see :func:`vgen.data.video.frame_stride`); ``random_start=False`` takes the centre window.
    ``video_backend`` decodes videos with ``pyav`` (default) or ``decord`` (optional dependency).
    ``conditions``: condition maps every clip brings (:mod:`vgen.data.condition_maps`: stored shard members, or
    extracted from the decoded clip), batch members of the same names. ``cues``: every clip of two or more frames
    brings HiGen's cues as batch members ``motion`` (measured from its frames) and ``appearance`` (from the
    embeddings ``data_pipelines/cues.py`` stored; without them the stage measures it): see
    :func:`vgen.data.conditions.cues.window_cues`.
    ``shuffle_buffer`` consecutive samples of a shard are shuffled together (0 = shard order).
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
        buckets: Sequence[Mapping] | Mapping | None = None,
        bucket_mode: str = "batch",
        video_backend: str = "pyav",
        conditions: Mapping | None = None,
        cues: bool = False,
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
        self.buckets = None if buckets is None else parse_buckets(buckets, f"{CONFIG_PREFIX}.buckets")
        if bucket_mode not in BUCKET_MODES:
            raise ValueError(f"{CONFIG_PREFIX}.bucket_mode must be one of {list(BUCKET_MODES)}, got {bucket_mode!r}")
        self.bucket_mode = bucket_mode
        self.video_backend = _video_backend(video_backend)
        self.conditions = parse_conditions(conditions)
        self.cues = self._cues(cues)
        self.dataset: BatchStream | None = None
        self._consumed = 0  # batches of this rank that training has taken (the loader prefetches more)
        self._cursors: list[dict | None] = []  # per reader slot: its position after its last consumed batch
        self._pending_state: dict | None = None

    def _cues(self, cues: bool) -> bool:
        if not isinstance(cues, bool):
            raise TypeError(f"{CONFIG_PREFIX}.cues must be true or false, got {cues!r}")
        clashing = [c.name for c in self.conditions if c.name in ("motion", "appearance")]
        if cues and clashing:
            raise ValueError(f"{CONFIG_PREFIX}.cues makes the batch members motion and appearance: rename "
                             f"{CONFIG_PREFIX}.conditions.{clashing[0]}")
        if cues and self.clip_frames() > MAX_FRAMES:
            raise ValueError(f"{CONFIG_PREFIX}.cues: HiGen's appearance cue spans {MAX_FRAMES} frames at most, but "
                             f"clips have {self.clip_frames()}")
        return cues

    @staticmethod
    def _key(index: int) -> str:
        return f"{CONFIG_PREFIX}.sources[{index}]"

    def check_sources(self) -> None:
        """Fail fast (before any model is built) if an enabled source has no readable shards, or if no clip of a
        video source's first shard is long enough for a training clip; say per video source how many source
        frames a clip needs at ``sample_fps``."""
        for index, source in enumerate(self.sources):
            if source.weight > 0:
                shards = resolve_shards(source.urls, f"{self._key(index)}.urls")
                if source.type == "video" and _is_local(shards[0]):
                    self._check_clip_length(self._key(index), shards[0])

    def clip_frames(self) -> int:
        """The most frames a video batch asks for (``num_frames``, or the longest video bucket)."""
        if self.buckets:
            return max((b.frames for b in self.buckets if b.kind == "video"), default=self.num_frames)
        return self.num_frames

    def _check_clip_length(self, key: str, url: str, probes: int = 8) -> None:
        """Probe up to ``probes`` clips of the shard ``url`` (headers only): log the source frames one training clip
        spans at their frame rate, and raise if none of them has that many."""
        from vgen.data.clips import probe_video
        from vgen.data.errors import SampleError
        from vgen.data.shards import read_shard
        from vgen.data.video import VIDEO_EXTENSIONS, frame_stride

        frames, found = self.clip_frames(), []  # (native fps, frames) per probed clip
        samples = read_shard(url, lambda _url, _error: None)
        try:
            for sample in samples:
                media = next((v for k, v in sample.items() if k.rsplit(".", 1)[-1] in VIDEO_EXTENSIONS and v), None)
                if media is None:
                    continue
                try:
                    info = probe_video(media)
                except SampleError:
                    continue
                found.append((info.fps, info.frames))
                if len(found) == probes:
                    break
        finally:
            samples.close()
        if not found:
            return  # nothing decodable here: the stream skips and counts what it cannot use
        fps = found[0][0]
        stride = frame_stride(fps, self.sample_fps)
        span = (frames - 1) * stride + 1
        longest = max(n for _, n in found)
        usable = [n >= (frames - 1) * frame_stride(f, self.sample_fps) + 1 for f, n in found]
        what = (f"{CONFIG_PREFIX}.num_frames={frames}" if not self.buckets else f"{frames} frames ({CONFIG_PREFIX}.buckets)")
        if not any(usable):
            raise ValueError(
                f"{key}: no clip is long enough: {what} at {CONFIG_PREFIX}.sample_fps={self.sample_fps:g} needs "
                f"{span} source frames of a {fps:g}-fps clip (frame stride {stride}), but the {len(found)} clips "
                f"probed in {url} have at most {longest}; lower {CONFIG_PREFIX}.sample_fps or "
                f"{CONFIG_PREFIX}.num_frames, or use longer clips"
            )
        if rank_zero_only.rank == 0:
            log.info("%s: a training clip (%s at %s.sample_fps=%g) needs %d source frames of a %g-fps clip (frame "
                     "stride %d); %d of %d clips probed in %s are that long (longest: %d frames)", key, what,
                     CONFIG_PREFIX, self.sample_fps, span, fps, stride, sum(usable), len(found), url, longest)

    @property
    def readers_per_rank(self) -> int:
        return max(self.num_workers, 1)

    def _topology(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        """Resolve and check every enabled source's shards, then build the batch stream."""
        if self.dataset is not None:
            return
        sources = []
        for index, config in enumerate(self.sources):
            if config.weight == 0:
                continue
            key = self._key(index)
            decoder = SampleDecoder(
                kind=config.type,
                sample_fps=self.sample_fps,
                start="random" if self.random_start else "center",
                caption_required=config.caption_required,
                video_backend=self.video_backend,
                conditions=self.conditions,
                cues=self.cues,
            )
            schedule = ShardSchedule(resolve_shards(config.urls, f"{key}.urls"), self.seed, key)
            sources.append(Source(key, config.type, float(config.weight), schedule, decoder))
        video = Bucket(self.num_frames, self.width, self.height, self.batch_size)
        image = Bucket(1, self.width, self.height, self.image_batch_size)
        plan = BatchPlan(sources, video, image, self.buckets, self.bucket_mode)
        if plan.unfit_buckets():
            index = plan.unfit_buckets()[0]
            raise ValueError(
                f"{CONFIG_PREFIX}.buckets[{index}] ({self.buckets[index].kind}, {self.buckets[index].frames} "
                f"frames) has no enabled source of a fitting type; sources: {[s.kind for s in sources]}"
            )
        rank, world_size = self._topology()
        self.dataset = BatchStream(plan, self.seed, self.readers_per_rank, self.shuffle_buffer, rank, world_size)
        self._cursors = [None] * self.readers_per_rank
        if self._pending_state is not None:
            self._apply_state(self._pending_state)

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("fit")
        module = getattr(self.trainer, "lightning_module", None)
        if module is not None and is_overridden("on_before_batch_transfer", module):
            raise TypeError(
                f"{type(module).__name__} overrides on_before_batch_transfer, which hides VideoDataModule's: the "
                "loader position would not be recorded and resume would not be exact; move that logic elsewhere"
            )
        from vgen.callbacks.preemption import ignore_preemption_signals_in_worker

        return DataLoader(
            self.dataset,
            batch_size=None,  # the stream batches itself: each batch is all video or all image, one shape
            num_workers=self.num_workers,
            worker_init_fn=ignore_preemption_signals_in_worker,  # SLURM's SIGTERM must not kill the workers first
        )

    # ------------------------------------------------------------------ position and counters
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Record the position after ``batch`` (it is about to be trained on) and drop it from the batch."""
        if isinstance(batch, dict) and LOADER_KEY in batch:
            self.consume(batch)
        return batch

    def consume(self, batch: dict) -> dict:
        """Take the loader position out of ``batch`` and count it as trained on (Lightning calls this)."""
        state = batch.pop(LOADER_KEY)
        self._cursors[state["slot"]] = state["cursor"]
        self._consumed += 1
        return batch

    def skip_counts(self) -> dict[str, Counter]:
        """Samples skipped so far by this rank's readers (up to the last consumed batch): source -> reason."""
        totals: dict[str, Counter] = {}
        for cursor in self._cursors:
            for source, counts in (cursor or {}).get("skipped", {}).items():
                totals.setdefault(source, Counter()).update(counts)
        return totals

    def _fingerprint(self) -> list:
        return [[source.name, len(source.schedule)] for source in self.dataset.plan.sources]

    def state_dict(self) -> dict:
        """Every rank's loader position (gathered from all ranks: Lightning saves rank 0's copy)."""
        if self.dataset is None:
            return {}
        local = {"consumed": self._consumed, "cursors": list(self._cursors)}
        gathered = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        seed = (self.dataset.resume or {}).get("seed", str(self.seed))
        return {
            "version": STATE_VERSION,
            "seed": seed,
            "sources": self._fingerprint(),
            "readers_per_rank": self.readers_per_rank,
            "consumed": [entry["consumed"] for entry in gathered],
            "cursors": [entry["cursors"] for entry in gathered],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if self.dataset is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict) -> None:
        rank, world_size = self._topology()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint data-loader state has version {state.get('version')!r}, "
                             f"this vgen reads version {STATE_VERSION}")
        saved = (len(state["consumed"]), state["readers_per_rank"], state["sources"])
        now = (world_size, self.readers_per_rank, self._fingerprint())
        consumed = state["consumed"][rank] if rank < len(state["consumed"]) else max(state["consumed"])
        if saved != now:
            log.warning(
                "data: the checkpoint's loader position is for %d rank(s) x %d reader(s) over sources %s; this "
                "run has %d x %d over %s. Starting fresh shard streams (reseeded by the %d batches already "
                "trained) instead of resuming exactly.", *saved, *now, consumed,
            )
            self.dataset.resume = {"consumed": 0, "cursors": None, "seed": f"{state['seed']}+{consumed}"}
            self._consumed, self._cursors = 0, [None] * self.readers_per_rank
        else:
            cursors = list(state["cursors"][rank])
            self.dataset.resume = {"consumed": consumed, "cursors": cursors, "seed": state["seed"]}
            self._consumed, self._cursors = consumed, cursors
        self._pending_state = None
