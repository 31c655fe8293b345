"""WebDataset sources -> decoded, bucketed batches whose stream position can be saved and restored exactly.

:class:`BatchStream` is the ``IterableDataset`` the datamodule hands to a ``DataLoader``. Every DataLoader
worker (or the main process with ``num_workers=0``) runs one :class:`Reader`. Reader ``j``'s ``b``-th batch is
a pure function of the seed, the reader's place and its position in each source (see
:mod:`vgen.data.shards`), so:

* the stream never ends on any rank (equal batch counts by construction: training length is ``max_steps``);
* each batch carries its reader's position *after* it (``batch["_loader"]``); the datamodule keeps the
  position of the last batch training actually consumed (Lightning prefetches) and a restart resumes every
  reader from there, with the DataLoader's round-robin over workers lined up again (see ``BatchStream``).

Only our member types are decoded (video -> PyAV, image -> PIL, latents -> safetensors, ``txt``, ``json``);
members that could hold pickles are refused, never loaded. A sample that cannot be used is skipped with a
warning naming its source, shard and key, and counted under a reason (:data:`SKIP_REASONS`).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vgen.data.buckets import Bucket
from vgen.data.condition_maps import ConditionMap
from vgen.data.conditions.cues import window_cues
from vgen.data.errors import SKIP_REASONS as REASONS
from vgen.data.errors import DataError, SampleError
from vgen.data.image import IMAGE_EXTENSIONS, decode_image
from vgen.data.shards import Position, RawSamples, ShardSchedule, seeded
from vgen.data.transforms import resize_center_crop
from vgen.data.video import VIDEO_EXTENSIONS, decode_video

log = logging.getLogger(__name__)

UNSAFE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "ckpt", "bin"})
LATENT_EXTENSIONS = ("safetensors",)
SOURCE_TYPES = ("video", "image", "latent")
SKIP_REASONS = tuple(REASONS)  # the one vocabulary (vgen.data.errors.SKIP_REASONS: reason -> cause)
IMAGE_FPS = 1  # the fps an image batch reports (VGen trains image ranks with sample_fps 1)
MAX_CONSECUTIVE_FAILURES = 100  # a source whose samples all fail stops training instead of spinning
LOADER_KEY = "_loader"  # the batch entry that carries the reader's position; the datamodule removes it


@dataclass(frozen=True)
class SampleDecoder:
    """One raw WebDataset sample (extension -> bytes) -> a decoded sample shaped by a :class:`Bucket`.

    ``kind`` is the source type: ``video`` and ``image`` give ``{video [3,F,H,W] in [-1, 1], caption, key,
    fps, has_caption}``; ``latent`` gives ``latent`` (and ``text_embedding`` / ``image_embedding`` when the
    shard stored them) instead of ``video``. ``start`` places video windows and ``video_backend`` decodes them
    (see :func:`decode_video`).
    """

    kind: str
    sample_fps: float
    start: str = "random"
    caption_required: bool = True
    video_backend: str = "pyav"
    conditions: tuple[ConditionMap, ...] = ()  # condition maps every sample brings (data.conditions)
    cues: bool = False  # HiGen's cues of every clip (data.cues)

    def __call__(self, sample: dict, rng: random.Random, bucket: Bucket) -> dict:
        unsafe = _members(sample, UNSAFE_EXTENSIONS)
        if unsafe:
            raise SampleError(
                f"refusing pickle-capable member(s) {unsafe}: they are never unpickled; "
                "store metadata as .json, media as .mp4/.jpg and tensors as .safetensors",
                reason="unsafe_member",
            )
        text = _caption(sample)
        if self.caption_required and not text:
            raise SampleError("no caption (.txt member or 'caption' in .json)", reason="no_caption")
        decoded = {"caption": text, "key": sample["__key__"], "has_caption": bool(text)}
        if self.kind == "latent":
            latents = _latents(_media(sample, LATENT_EXTENSIONS))
            if self.conditions:
                raise SampleError("latent sources cannot bring data.conditions (no frames to extract or index them "
                                  "by): train the conditions on video sources", reason="missing_condition")
            return decoded | latents
        indices = None
        if self.kind == "video":
            clip = decode_video(_media(sample, VIDEO_EXTENSIONS), bucket.frames, self.sample_fps, self.start, rng,
                                self.video_backend)
            frames, fps = clip.frames, int(clip.fps + 0.5) if bucket.frames > 1 else IMAGE_FPS
            indices = [clip.start + i * clip.stride for i in range(len(frames))]
        else:
            frames, fps = decode_image(_media(sample, IMAGE_EXTENSIONS))[None], IMAGE_FPS
        video = resize_center_crop(frames, width=bucket.width, height=bucket.height)
        decoded |= {"video": video, "fps": fps}
        cues = self.cues and len(frames) > 1  # stills (and 1-frame windows) take the stage's neutral cues
        if self.conditions or cues:
            pixels = ((video + 1) * 127.5).round_().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        if self.conditions:
            decoded["conditions"] = {c.name: c(sample, pixels, indices, rng) for c in self.conditions}
        if cues:
            decoded["cues"] = window_cues(sample, pixels, indices)
        return decoded


def _members(sample: dict, extensions) -> list[str]:
    """Member names whose last extension is in ``extensions`` (``clip.mp4`` counts as ``mp4``)."""
    return sorted(k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in extensions)


def _media(sample: dict, extensions) -> bytes:
    found = _members(sample, extensions)
    if not found:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError(
            f"no member of type {'/'.join(extensions)} (has {members})", reason="missing_member"
        )
    data = sample[found[0]]
    if not data:
        raise SampleError(f"member .{found[0]} is empty (0 bytes)", reason="empty_member")
    return data


def _caption(sample: dict) -> str:
    meta = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, ValueError) as exc:
            raise SampleError(f"unreadable .json metadata: {exc}", reason="bad_metadata") from exc
        if not isinstance(meta, dict):
            raise SampleError(f".json metadata is a {type(meta).__name__}, not an object", reason="bad_metadata")
    if "txt" in sample:
        try:
            return sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise SampleError(f"the .txt caption is not UTF-8: {exc}", reason="bad_metadata") from exc
    caption = (meta or {}).get("caption")
    if caption is not None and not isinstance(caption, str):
        raise SampleError(f".json 'caption' is a {type(caption).__name__}, not text", reason="bad_metadata")
    return (caption or "").strip()


def _latents(data: bytes) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SampleError(f"undecodable latents ({len(data)} bytes): {exc}") from exc
    if tensors.get("latent") is None or tensors["latent"].ndim != 4:
        raise SampleError(f"latents need a 'latent' tensor [C, F, h, w]; got {sorted(tensors)}", "bad_metadata")
    out = {"latent": tensors["latent"].float(), "fps": int(tensors["fps"]) if "fps" in tensors else IMAGE_FPS}
    for name, key in (("text", "text_embedding"), ("image", "image_embedding")):
        if name in tensors:
            out[key] = tensors[name].float()
    return out


def collate(samples: list[dict], kind: str) -> dict:
    """Decoded samples -> a batch: ``video`` [B,3,F,H,W] (or ``latent`` ...), ``caption``/``key`` lists,
    ``fps`` int64 [B], ``has_caption`` bool [B], ``kind``; condition maps and HiGen cues under their names (a cue
    only when every sample has it)."""
    batch = {
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.long),
        "has_caption": torch.tensor([s["has_caption"] for s in samples], dtype=torch.bool),
        "kind": kind,
    }
    for name in ("video", "latent", "text_embedding", "image_embedding"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    for name in samples[0].get("conditions", {}):
        batch[name] = torch.stack([s["conditions"][name] for s in samples])
    for name in samples[0].get("cues", {}):
        if all(name in s.get("cues", {}) for s in samples):  # else the stage measures it for the whole batch
            batch[name] = torch.stack([s["cues"][name] for s in samples])
    return batch


@dataclass
class Source:
    """One enabled source: its config key (``name``), shards, how to decode it and how often to draw it."""

    name: str
    kind: str
    weight: float
    schedule: ShardSchedule
    decoder: SampleDecoder

    def fits(self, bucket: Bucket) -> bool:
        return self.kind == bucket.kind or (self.kind == "latent" and bucket.kind == "video")


@dataclass
class BatchPlan:
    """Which source and bucket each batch uses.

    Without ``buckets``: a source is drawn by weight and its batch has the ``video`` or ``image`` shape.
    With ``buckets``: the bucket is drawn by probability (``mode="batch"``) or fixed per rank
    (``mode="rank"``), then a source that fits it (image buckets: image sources, or video sources when there
    are none; video buckets: video and latent sources) by weight.
    """

    sources: list[Source]
    video: Bucket | None = None
    image: Bucket | None = None
    buckets: list[Bucket] | None = None
    mode: str = "batch"
    _fitting: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for index, bucket in enumerate(self.buckets or []):
            fitting = [i for i, s in enumerate(self.sources) if s.fits(bucket)]
            if bucket.kind == "image" and not fitting:
                fitting = [i for i, s in enumerate(self.sources) if s.kind == "video"]
            self._fitting[index] = fitting

    def unfit_buckets(self) -> list[int]:
        return [i for i, fitting in self._fitting.items() if not fitting and self.buckets[i].probability > 0]

    def choose(self, rng: random.Random, rank: int) -> tuple[int, Bucket]:
        if self.buckets is None:
            index = rng.choices(range(len(self.sources)), weights=[s.weight for s in self.sources])[0]
            return index, self.image if self.sources[index].kind == "image" else self.video
        if self.mode == "rank":
            bucket_index = rank % len(self.buckets)
        else:
            bucket_index = rng.choices(range(len(self.buckets)), [b.probability for b in self.buckets])[0]
        fitting = self._fitting[bucket_index]
        index = rng.choices(fitting, weights=[self.sources[i].weight for i in fitting])[0]
        return index, self.buckets[bucket_index]


def empty_cursor(num_sources: int) -> dict:
    """The position of a reader that has produced nothing yet."""
    return {"batches": 0, "positions": [[0, 0] for _ in range(num_sources)], "skipped": {}}


class Reader:
    """One reader's endless batch stream (see the module docstring), resumable from a cursor dict:
    ``{"batches": n, "positions": [[shard ordinal, offset] per source], "skipped": {source: {reason: n}}}``."""

    def __init__(
        self,
        plan: BatchPlan,
        seed: str,
        rank: int,
        reader: int,
        num_readers: int,
        shuffle_block: int,
        cursor: dict | None,
        slot: int = 0,
    ):
        cursor = cursor or empty_cursor(len(plan.sources))
        self.plan, self.seed, self.rank, self.reader, self.slot = plan, seed, rank, reader, slot
        self.batches = int(cursor["batches"])
        self.positions = [Position(int(o), int(k)) for o, k in cursor["positions"]]
        self.skipped = {name: Counter(counts) for name, counts in cursor["skipped"].items()}
        self.streams = [
            iter(RawSamples(source.schedule, reader, num_readers, shuffle_block, position,
                            self._shard_error(source.name)))
            for source, position in zip(plan.sources, self.positions)
        ]

    def cursor(self) -> dict:
        return {
            "batches": self.batches,
            "positions": [[p.ordinal, p.offset] for p in self.positions],
            "skipped": {name: dict(counts) for name, counts in self.skipped.items() if counts},
        }

    def _count(self, source: str, reason: str) -> None:
        self.skipped.setdefault(source, Counter())[reason] += 1

    def _shard_error(self, name: str):
        def on_error(url: str, error: Exception) -> None:
            self._count(name, "unreadable_shard")
            log.warning("%s: could not read shard %s, moving on to the next: %s", name, url, error)

        return on_error

    def __iter__(self):
        while True:
            index, bucket = self.plan.choose(seeded(self.seed, "batch", self.reader, self.batches), self.rank)
            samples = self._fill(index, bucket)
            self.batches += 1
            batch = collate(samples, bucket.kind)
            batch[LOADER_KEY] = {"slot": self.slot, "cursor": self.cursor()}
            yield batch

    def _fill(self, index: int, bucket: Bucket) -> list[dict]:
        source = self.plan.sources[index]
        samples, failures = [], 0
        while len(samples) < bucket.batch_size:
            raw, (shard_position, offset) = next(self.streams[index])
            rng = seeded(self.seed, source.name, "sample", shard_position, offset)
            try:
                decoded = source.decoder(raw, rng, bucket)
                if samples and "latent" in decoded and decoded["latent"].shape != samples[0]["latent"].shape:
                    raise SampleError(
                        f"latent shape {tuple(decoded['latent'].shape)} differs from the batch's "
                        f"{tuple(samples[0]['latent'].shape)}",
                        reason="bad_metadata",
                    )
            except SampleError as error:
                self._count(source.name, error.reason)
                log.warning("%s: skipping sample %r of shard %s: %s", source.name, raw.get("__key__"),
                            raw.get("__url__"), error)
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise DataError(
                        f"{source.name}: {failures} samples in a row could not be used (last: {error.reason}: "
                        f"{' '.join(str(error).split())}, in {raw.get('__url__')}); check that the shards hold what "
                        f"the source's type ({source.kind}) expects"
                    ) from error
                continue
            failures = 0
            samples.append(decoded)
        return samples


class BatchStream(IterableDataset):
    """The datamodule's dataset: ``readers_per_rank`` readers per rank (one per DataLoader worker, or one in
    the main process), each an endless :class:`Reader`.

    ``resume`` (set by the datamodule from a checkpoint) is ``{"consumed": N, "cursors": [cursor | None per
    reader slot], "seed": str}``: N batches of this rank were trained on, and slot ``s``'s cursor is the
    position after the last of them it produced. The DataLoader hands out batch ``b`` from worker
    ``b % workers``; global batch ``N + b`` belongs to slot ``(N + b) % workers``, so worker ``w`` runs slot
    ``(N + w) % workers`` and the sequence continues exactly where training stopped.
    """

    def __init__(
        self,
        plan: BatchPlan,
        seed: int | str,
        readers_per_rank: int,
        shuffle_block: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.plan, self.seed, self.shuffle_block = plan, str(seed), shuffle_block
        self.readers_per_rank, self.rank, self.world_size = readers_per_rank, rank, world_size
        self.resume: dict | None = None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.readers_per_rank:
            raise RuntimeError(
                f"BatchStream was built for {self.readers_per_rank} reader(s) per rank but runs in {workers}; "
                "build the DataLoader with num_workers = data.num_workers"
            )
        resume = self.resume or {}
        slot = (int(resume.get("consumed", 0)) + worker) % workers
        cursors = resume.get("cursors") or [None] * workers
        reader = Reader(
            self.plan,
            resume.get("seed", self.seed),
            self.rank,
            reader=self.rank * workers + slot,
            num_readers=self.world_size * workers,
            shuffle_block=self.shuffle_block,
            cursor=cursors[slot],
            slot=slot,
        )
        return iter(reader)
