"""Raw videos/images with captions -> WebDataset shards of clips, with metadata and a stats report.

    python data_pipelines/make_shards.py --input DIR_OR_LIST --out OUT [--fps 8] [--size 256]
        [--split fixed|scenes] [--clip-seconds 4] [--min-clip-seconds 1] [--max-clip-seconds 10]
        [--cut-threshold 0.25] [--inputs-per-shard 100] [--prefix clips] [--crf 20]
        [--shard-range A:B] [--workers N] [--overwrite]

Input: a folder (every video/image in it, recursively; the caption of ``a/b.mp4`` is ``a/b.txt`` if present),
or a ``.csv`` / ``.jsonl`` list with a ``path`` (or ``video`` / ``image`` / ``file``) column and an optional
``caption`` (or ``text``) column; relative paths are relative to the list. Each video is resampled to
``--fps``, resized so its short side is ``--size`` (aspect kept) and cut into clips: fixed ``--clip-seconds``
windows, or at scene cuts (grey-thumbnail difference above ``--cut-threshold``), clips longer than
``--max-clip-seconds`` split and ones shorter than ``--min-clip-seconds`` dropped; then re-encoded to H.264.
Images are resized the same way and stored as JPEG.

Output shard ``<prefix>-NNNNNN.tar`` holds the clips of inputs ``N*k .. N*k+k-1`` (``k = --inputs-per-shard``,
as video2dataset's ``number_sample_per_shard``): ``<key>.mp4`` (or ``.jpg``), ``<key>.txt`` (when there is a
caption) and ``<key>.json`` (source, clip, start/end, fps, duration, frames, width, height, motion_score,
caption or null). Each shard has a ``.stats.json`` sidecar; ``stats.json`` merges the sidecars present
(inputs, failures, clips, hours, motion and duration quantiles). Inputs that give no sample are counted by reason
(``skipped_inputs``, in the vocabulary of ``vgen.data.errors.SKIP_REASONS``: ``too_short`` for a video shorter
than one clip, ``undecodable``, ``empty_member`` for a zero-byte file, ``unreadable_input`` for a listed file
that is missing or cannot be opened; each is named in ``failures``), as are clips dropped for being shorter than
``--min-clip-seconds`` (``dropped_clips``). A missing ``--input`` folder or list stops the tool before it writes
anything. Same inputs and options give the same bytes.

Parallel and resumable: {slurm}
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vgen.data.clips import motion_score, read_frames, scaled_size, thumbnail
from vgen.data.errors import SampleError
from vgen.data.image import IMAGE_EXTENSIONS, decode_image
from vgen.data.shardio import (
    SLURM_HELP,
    ToolParser,
    add_work_arguments,
    atomic_write,
    fail,
    quantiles,
    run_shards,
    tar_bytes,
    task_shards,
    write_report,
)
from vgen.data.video import VIDEO_EXTENSIONS, encode_video

__doc__ = __doc__.replace("{slurm}", SLURM_HELP)
PATH_COLUMNS = ("path", "video", "image", "file")
CAPTION_COLUMNS = ("caption", "text")


def list_inputs(source: Path) -> list[tuple[str, str | None]]:
    """(path, caption or None) for every input, in a fixed order."""
    if source.is_dir():
        media = sorted(p for p in source.rglob("*") if p.suffix.lower().lstrip(".") in
                       VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
        captions = [p.with_suffix(".txt") for p in media]
        return [(str(p), c.read_text().strip() if c.exists() else None) for p, c in zip(media, captions)]
    if source.suffix == ".jsonl":
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    elif source.suffix == ".csv":
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"--input must be a folder, a .csv or a .jsonl list, got {source}")
    inputs = []
    for number, row in enumerate(rows, 1):
        path = next((row[c] for c in PATH_COLUMNS if row.get(c)), None)
        if path is None:
            raise ValueError(f"{source} row {number} has none of the columns {PATH_COLUMNS}: {row}")
        caption = next((str(row[c]).strip() for c in CAPTION_COLUMNS if row.get(c)), None)
        inputs.append((str((source.parent / path) if not Path(path).is_absolute() else Path(path)), caption))
    return inputs


def video_samples(path: str, caption: str | None, key: str, args, dropped: Counter | None = None) -> list[dict]:
    """The clips of one video, read as a stream: only the clip being built is held in memory. Clips shorter than
    the shortest allowed are counted in ``dropped`` (``too_short``); a video that gives no clip at all raises
    :class:`SampleError` (``too_short``)."""
    info, frames = read_frames(path, args.fps, args.size)
    fps = float(args.fps or info.fps)
    limit = max(1, round((args.clip_seconds if args.split == "fixed" else args.max_clip_seconds) * fps))
    shortest = limit if args.split == "fixed" else max(1, math.ceil(args.min_clip_seconds * fps - 1e-6))
    samples, clip, thumbs, start = [], [], [], 0
    dropped = Counter() if dropped is None else dropped
    longest = 0

    def flush() -> None:
        nonlocal longest
        longest = max(longest, len(clip))
        if len(clip) < shortest:
            if clip:
                dropped["too_short"] += 1
            return
        video = np.stack(clip)
        meta = {
            "source": path, "clip": len(samples), "start": round(start / fps, 3),
            "end": round((start + len(clip)) / fps, 3), "fps": fps, "duration": round(len(clip) / fps, 3),
            "frames": len(clip), "width": video.shape[2], "height": video.shape[1],
            "motion_score": round(motion_score(thumbs), 5), "caption": caption, "source_fps": round(info.fps, 3),
            "source_width": info.width, "source_height": info.height,
        }
        samples.append(sample(f"{key}_{len(samples):03d}", "mp4", encode_video(video, fps, crf=args.crf), meta))

    for index, frame in enumerate(frames):
        thumb = thumbnail(frame)
        cut = args.split == "scenes" and thumbs and np.abs(thumb - thumbs[-1]).mean() > args.cut_threshold
        if cut or len(clip) == limit:
            flush()
            clip, thumbs, start = [], [], index
        clip.append(frame)
        thumbs.append(thumb)
    flush()
    if not samples:
        option = "--clip-seconds (--split fixed)" if args.split == "fixed" else "--min-clip-seconds"
        raise SampleError(f"shorter than one clip: its longest piece has {longest} frames at {fps:g} fps, a clip "
                          f"needs {shortest} ({option})", reason="too_short")
    return samples


def image_samples(path: str, caption: str | None, key: str, args) -> list[dict]:
    image = decode_image(Path(path).read_bytes())
    width, height = scaled_size(image.shape[1], image.shape[0], args.size)
    buffer = io.BytesIO()
    Image.fromarray(image).resize((width, height), Image.BICUBIC).save(buffer, format="JPEG", quality=95)
    meta = {"source": path, "width": width, "height": height, "caption": caption,
            "source_width": image.shape[1], "source_height": image.shape[0], "frames": 1}
    return [sample(f"{key}_000", "jpg", buffer.getvalue(), meta)]


def sample(key: str, extension: str, media: bytes, meta: dict) -> dict:
    members = {"__key__": key, extension: media}
    if meta["caption"]:
        members["txt"] = meta["caption"].encode()
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return members


def make_shard(index: int, inputs: list, args) -> dict | None:
    out = args.out / f"{args.prefix}-{index:06d}.tar"
    if out.exists() and not args.overwrite:
        return None
    first = index * args.inputs_per_shard
    samples, failures, skipped, dropped = [], {}, Counter(), Counter()
    for number, (path, caption) in enumerate(inputs[first:first + args.inputs_per_shard], first):
        key = f"{index:06d}_{number:08d}"
        try:
            if Path(path).stat().st_size == 0:
                raise SampleError("empty file (0 bytes)", reason="empty_member")
            if Path(path).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                samples += image_samples(path, caption, key, args)
            else:
                samples += video_samples(path, caption, key, args, dropped)
        except SampleError as error:
            skipped[error.reason] += 1
            failures[path] = f"{error.reason}: {error}"
        except OSError as error:
            skipped["unreadable_input"] += 1
            failures[path] = f"unreadable_input: {type(error).__name__}: {error}"
    atomic_write(out, tar_bytes(samples))
    metas = [json.loads(s["json"]) for s in samples]
    stats = {
        "inputs": len(inputs[first:first + args.inputs_per_shard]), "failed": failures,
        "skipped_inputs": dict(skipped), "dropped_clips": dict(dropped),
        "clips": sum(1 for s in samples if "mp4" in s), "images": sum(1 for s in samples if "jpg" in s),
        "without_caption": sum(1 for m in metas if not m["caption"]), "bytes": out.stat().st_size,
        "durations": [m["duration"] for m in metas if "duration" in m],
        "motion": [m["motion_score"] for m in metas if "motion_score" in m],
        "resolutions": dict(Counter(f"{m['width']}x{m['height']}" for m in metas)),
    }
    atomic_write(out.with_name(out.name + ".stats.json"), json.dumps(stats, sort_keys=True).encode())
    return stats


def merge(sidecars: list[dict]) -> dict:
    durations = [d for s in sidecars for d in s["durations"]]
    return {
        "inputs": sum(s["inputs"] for s in sidecars),
        "failed_inputs": sum(len(s["failed"]) for s in sidecars),
        "failures": {path: why for s in sidecars for path, why in s["failed"].items()},
        "skipped_inputs": dict(sum((Counter(s.get("skipped_inputs", {})) for s in sidecars), Counter())),
        "dropped_clips": dict(sum((Counter(s.get("dropped_clips", {})) for s in sidecars), Counter())),
        "clips": sum(s["clips"] for s in sidecars), "images": sum(s["images"] for s in sidecars),
        "without_caption": sum(s["without_caption"] for s in sidecars),
        "hours": round(sum(durations) / 3600, 4), "bytes": sum(s["bytes"] for s in sidecars),
        "duration_s": quantiles(durations), "motion_score": quantiles([m for s in sidecars for m in s["motion"]]),
        "resolutions": dict(sum((Counter(s["resolutions"]) for s in sidecars), Counter()).most_common(20)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="folder of media, or a .csv/.jsonl list")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the shards and stats.json")
    parser.add_argument("--fps", type=float, default=8, help="target frame rate (0 = keep the source's)")
    parser.add_argument("--size", type=int, default=256, help="short side in pixels (0 = keep)")
    parser.add_argument("--split", choices=("fixed", "scenes"), default="fixed", help="how videos become clips")
    parser.add_argument("--clip-seconds", type=float, default=4.0, help="clip length with --split fixed")
    parser.add_argument("--min-clip-seconds", type=float, default=1.0, help="drop shorter clips")
    parser.add_argument("--max-clip-seconds", type=float, default=10.0, help="split longer scenes")
    parser.add_argument("--cut-threshold", type=float, default=0.25,
                        help="scene cut where the mean grey-thumbnail difference exceeds this (0..1)")
    parser.add_argument("--inputs-per-shard", type=int, default=100, help="inputs whose clips form one shard")
    parser.add_argument("--prefix", default="clips", help="shard file name prefix")
    parser.add_argument("--crf", type=int, default=20, help="H.264 quality (lower = better, larger)")
    add_work_arguments(parser)
    args = parser.parse_args(argv)
    args.fps, args.size = args.fps or None, args.size or None
    if args.inputs_per_shard < 1 or args.clip_seconds <= 0 or args.max_clip_seconds <= 0:
        parser.error("--inputs-per-shard, --clip-seconds and --max-clip-seconds must be positive")
    if not args.input.exists():
        fail(parser.prog, f"--input: no such folder or list: {args.input}")
    try:
        inputs = list_inputs(args.input)
    except (ValueError, OSError) as error:
        fail(parser.prog, f"--input: {error}")
    if not inputs:
        fail(parser.prog, f"--input: no videos or images in {args.input}")
    shards = task_shards(math.ceil(len(inputs) / args.inputs_per_shard), args.shard_range)
    args.out.mkdir(parents=True, exist_ok=True)
    written = run_shards(functools.partial(make_shard, inputs=inputs, args=args), shards, args.workers)
    report = write_report(args.out, "stats.json", merge)
    print(f"make_shards: wrote {len(written)} of shards {shards.start}..{shards.stop - 1} to {args.out} "
          f"(complete ones skipped); all shards so far: {report['clips']} clips, {report['images']} images, "
          f"{report['hours']} h, {report['failed_inputs']} inputs gave no sample {report['skipped_inputs']}, "
          f"{sum(report['dropped_clips'].values())} short clips dropped -> {args.out / 'stats.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
