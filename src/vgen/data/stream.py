"""WebDataset streams: shard URLs -> decoded, resized, batched samples; several sources mixed per batch.

Each source is read forever: its shards are reshuffled (seeded) on every pass, then split between ranks
and DataLoader workers with webdataset's ``split_by_node`` / ``split_by_worker``; training length is set by
``max_steps``. Only our member types are decoded (video -> PyAV, image -> PIL, ``txt``, ``json``);
members that could hold pickles are refused, never loaded. A sample that cannot be used is skipped with a
warning naming its source, shard and key, and counted in ``skipped`` (per process: with DataLoader workers
each worker logs and counts its own).
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from vgen.data.errors import SampleError
from vgen.data.image import IMAGE_EXTENSIONS, decode_image
from vgen.data.transforms import resize_center_crop
from vgen.data.video import VIDEO_EXTENSIONS, decode_video

log = logging.getLogger(__name__)

UNSAFE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "npy", "npz"})
IMAGE_FPS = 1  # the fps an image batch reports (VGen trains image ranks with sample_fps 1)
MAX_CONSECUTIVE_FAILURES = 100  # a source whose samples all fail stops training instead of spinning


@dataclass(frozen=True)
class SampleDecoder:
    """One raw WebDataset sample (extension -> bytes) -> ``{video [3,F,H,W], caption, key, fps}``.

    ``kind`` is "video" or "image"; ``start`` places video windows (see :func:`decode_video`).
    """

    kind: str
    num_frames: int
    sample_fps: float
    width: int
    height: int
    start: str = "random"
    caption_required: bool = True

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        unsafe = _members(sample, UNSAFE_EXTENSIONS)
        if unsafe:
            raise SampleError(
                f"refusing pickle-capable member(s) {unsafe}: they are never unpickled; "
                "store metadata as .json and media as .mp4/.jpg",
                reason="unsafe_member",
            )
        text = _caption(sample)
        if self.caption_required and not text:
            raise SampleError("no caption (.txt member or 'caption' in .json)", reason="no_caption")
        if self.kind == "video":
            clip = decode_video(
                _media(sample, VIDEO_EXTENSIONS), self.num_frames, self.sample_fps, self.start, rng
            )
            frames, fps = clip.frames, int(clip.fps + 0.5)
        else:
            frames, fps = decode_image(_media(sample, IMAGE_EXTENSIONS))[None], IMAGE_FPS
        video = resize_center_crop(frames, width=self.width, height=self.height)
        return {"video": video, "caption": text, "key": sample["__key__"], "fps": fps}


def _members(sample: dict, extensions) -> list[str]:
    """Member names whose last extension is in ``extensions`` (``clip.mp4`` counts as ``mp4``)."""
    return sorted(k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in extensions)


def _media(sample: dict, extensions: tuple[str, ...]) -> bytes:
    found = _members(sample, extensions)
    if not found:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError(
            f"no member of type {'/'.join(extensions)} (has {members})", reason="missing_member"
        )
    return sample[found[0]]


def _caption(sample: dict) -> str:
    try:
        if "txt" in sample:
            return sample["txt"].decode("utf-8").strip()
        if "json" in sample:
            return str(json.loads(sample["json"]).get("caption") or "").strip()
    except (UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise SampleError(f"unreadable caption: {exc}") from exc
    return ""


def collate(samples: list[dict], kind: str) -> dict:
    """Decoded samples -> a batch: ``video`` [B,3,F,H,W], ``caption``/``key`` lists, ``fps`` [B], ``kind``."""
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.long),
        "kind": kind,
    }


class SourceStream(IterableDataset):
    """An endless stream of homogeneous batches from one source's shards.

    ``name`` (the config key, e.g. ``data.sources[0]``) labels warnings and errors. ``shuffle_buffer`` raw
    (still encoded) samples are held per worker for shuffling; 0 or 1 disables it. ``skipped`` counts
    unusable samples by reason: undecodable, too_short, missing_member, no_caption, unsafe_member, and
    unreadable_shard for shards that fail to open or end mid-member.
    """

    def __init__(
        self,
        name: str,
        urls: list[str],
        decoder: SampleDecoder,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
    ):
        super().__init__()
        self.name, self.urls, self.decoder = name, list(urls), decoder
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.skipped: Counter[str] = Counter()

    def __iter__(self):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}/{self.name}/{rank}/{worker}")
        pipeline = wds.DataPipeline(
            self._shards(),
            wds.tarfile_to_samples(handler=self._shard_failed),
            wds.detshuffle(self.shuffle_buffer, seed=self.seed) if self.shuffle_buffer > 1 else None,
            functools.partial(self._decoded, rng=rng),
            wds.batched(
                self.batch_size,
                collation_fn=functools.partial(collate, kind=self.decoder.kind),
                partial=False,
            ),
        )
        return iter(pipeline)

    def _shards(self) -> wds.DataPipeline:
        """Shard URLs forever; each pass is a fresh seeded permutation, dealt out to ranks, then workers."""
        return wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.detshuffle(len(self.urls), initial=len(self.urls), seed=self.seed),
            wds.split_by_node,
            wds.split_by_worker,
        ).repeat()

    def _decoded(self, samples, rng: random.Random):
        failures = 0
        for sample in samples:
            try:
                decoded = self.decoder(sample, rng)
            except SampleError as error:
                self.skipped[error.reason] += 1
                log.warning(
                    "%s: skipping sample %r of shard %s: %s",
                    self.name,
                    sample.get("__key__"),
                    sample.get("__url__"),
                    error,
                )
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(
                        f"{self.name}: {failures} samples in a row could not be used (last: {error}); "
                        "check that the shards hold what the source's type expects"
                    ) from error
                continue
            failures = 0
            yield decoded

    def _shard_failed(self, error: Exception) -> bool:
        self.skipped["unreadable_shard"] += 1
        log.warning("%s: could not read a shard, moving on to the next: %s", self.name, error)
        return True


class MixedBatches(IterableDataset):
    """Batches from several sources; each batch comes whole from one source, chosen by weight.

    The choice is seeded per (seed, rank, worker), so the batch sequence is reproducible.
    """

    def __init__(self, sources: list[SourceStream], weights: list[float], seed: int):
        super().__init__()
        self.sources, self.weights, self.seed = sources, list(weights), seed

    @property
    def skipped(self) -> Counter[str]:
        """Skipped samples by reason, summed over sources (this process only)."""
        return sum((source.skipped for source in self.sources), Counter())

    def __iter__(self):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}/mix/{rank}/{worker}")
        streams = [iter(source) for source in self.sources]
        while True:
            index = rng.choices(range(len(streams)), weights=self.weights)[0]
            batch = next(streams[index], None)
            if batch is None:
                raise RuntimeError(
                    f"{self.sources[index].name} ran out of shards for rank {rank} worker {worker}; "
                    "every reader needs at least one shard"
                )
            yield batch
