"""Write the synthetic demo shards: moving-shape clips (video2dataset layout) and stills (img2dataset layout).

    python data_pipelines/synthetic.py --out data/demo [--videos 512] [--images 256] [--shard-size 64]
        [--frames 16] [--size 64] [--fps 8] [--seed 0] [--shard-range A:B] [--paths random|edge|fixed]
        [--travel 0.05:0.75]

writes ``videos-000000.tar`` ... (``<key>.mp4`` H.264, ``<key>.txt`` caption, ``<key>.json`` metadata),
``images-000000.tar`` ... (``<key>.jpg``, ``<key>.txt``, ``<key>.json``) and ``manifest.json`` (counts, shard
names, attribute lists, the held-out prompts). The same arguments give the same bytes. Shard ``i`` depends
only on the seed and ``i``, so parallel jobs can split the work with ``--shard-range``; a rerun skips shards
that are already complete (each is written to a temporary name, then renamed).

The rendering and the direction tracker live in :mod:`vgen.data.synthetic` (re-exported here).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from vgen.data.synthetic import (  # noqa: F401  (re-exported for benchmarks and notebooks)
    ATTRIBUTES,
    EXTENT,
    HELD_OUT,
    PATHS,
    RADIUS_RANGE,
    TRAINING_COMBOS,
    TRAVEL_RANGE,
    caption,
    centroid_track,
    render_clip,
    render_frame,
    sample_motion,
)
from vgen.data.video import encode_video

KIND_STREAMS = {"videos": 0, "images": 1}  # separate random streams per kind: videos never shift images
IMAGE_COMBOS = tuple(itertools.product(ATTRIBUTES["color"], ATTRIBUTES["shape"]))


def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:06d}.tar"


def write_shards(
    out: str | Path,
    videos: int = 512,
    images: int = 256,
    shard_size: int = 64,
    frames: int = 16,
    size: int = 64,
    fps: int = 8,
    seed: int = 0,
    shard_range: tuple[int, int] | None = None,
    paths: str = "random",
    travel: tuple[float, float] | None = None,
) -> list[Path]:
    """Write the shards in ``shard_range`` ([start, stop) shard indices, default all) and the manifest.

    Shards that already exist are complete (they appear only by rename) and are skipped.
    ``travel``: the range of the distance a clip's shape covers, as fractions of the frame size (``random`` paths;
    default :data:`TRAVEL_RANGE`), e.g. (0.05, 0.75) for speeds from nearly still to fast (the HiGen toy).
    Returns the shard paths written by this call.
    """
    if paths not in PATHS:
        raise ValueError(f"--paths must be one of {PATHS}, got {paths!r}")
    if travel is not None:
        travel = (float(travel[0]), float(travel[1]))
        if not 0.0 <= travel[0] <= travel[1] <= 1.0:
            raise ValueError(f"--travel must be A:B with 0 <= A <= B <= 1 (fractions of the frame size), got {travel}")
        if paths != "random":
            raise ValueError(f"--travel needs --paths random (edge and fixed paths cross the whole frame), got {paths!r}")
        if travel == TRAVEL_RANGE:
            travel = None
    if size < 16 or size % 2 or frames < 1 or shard_size < 1 or videos < 0 or images < 0 or fps < 1:
        raise ValueError(
            f"need an even size >= 16 and positive frames, shard_size, fps; non-negative counts "
            f"(got size={size}, frames={frames}, shard_size={shard_size}, fps={fps}, videos={videos}, "
            f"images={images})"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"videos": videos, "images": images}
    _check_existing(out, _manifest(counts, shard_size, frames, size, fps, seed, paths, travel))
    written = []
    for kind, count in counts.items():
        for shard in range(*_clip_range(shard_range, _num_shards(count, shard_size))):
            path = out / shard_name(kind, shard)
            if path.exists():
                continue
            indices = range(shard * shard_size, min((shard + 1) * shard_size, count))
            if kind == "videos":
                samples = [_video_sample(i, seed, frames, size, fps, paths, travel) for i in indices]
            else:
                samples = [_image_sample(i, seed, size) for i in indices]
            _atomic_write(path, _tar_bytes(samples))
            written.append(path)
    manifest = _manifest(counts, shard_size, frames, size, fps, seed, paths, travel)
    _atomic_write(out / "manifest.json", json.dumps(manifest, indent=2).encode() + b"\n")
    return written


GENERATION_SETTINGS = ("seed", "paths", "frames", "size", "fps", "shard_size", "counts", "travel")


def _check_existing(out: Path, wanted: dict) -> None:
    """Refuse to add to (or skip over) shards written with other settings: a rerun skips complete shards, so
    mixing settings would silently keep the old clips under a manifest that describes the new ones."""
    path = out / "manifest.json"
    if not path.exists():
        return
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is unreadable ({error}); delete {out} or choose another --out") from None
    differ = [f"{key}: {existing.get(key)!r} there, {wanted.get(key)!r} asked" for key in GENERATION_SETTINGS
              if existing.get(key) != wanted.get(key)]
    if differ:
        raise ValueError(f"{out} already holds shards written with other settings ({'; '.join(differ)}); "
                         f"delete it or choose another --out")


def _num_shards(count: int, shard_size: int) -> int:
    return math.ceil(count / shard_size)


def _clip_range(shard_range: tuple[int, int] | None, num_shards: int) -> tuple[int, int]:
    if shard_range is None:
        return 0, num_shards
    start, stop = shard_range
    return min(max(start, 0), num_shards), min(max(stop, 0), num_shards)


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, KIND_STREAMS[kind], index])


def _video_sample(index: int, seed: int, frames: int, size: int, fps: int, paths: str,
                  travel: tuple[float, float] | None = None) -> dict[str, bytes]:
    color, shape, direction = TRAINING_COMBOS[index % len(TRAINING_COMBOS)]
    motion = sample_motion(direction, frames, size, _rng(seed, "videos", index), paths, travel or TRAVEL_RANGE)
    text = caption(color, shape, direction)
    meta = {
        "key": f"{index:08d}",
        "caption": text,
        "color": color,
        "shape": shape,
        "direction": direction,
        "fps": fps,
        "num_frames": frames,
        "width": size,
        "height": size,
        "start": [round(v, 3) for v in motion.start],
        "speed": round(motion.speed, 4),
        "radius": round(motion.radius, 3),
    }
    clip = render_clip(color, shape, direction, motion, frames, size)
    return _members(meta, "mp4", encode_video(clip, fps))


def _image_sample(index: int, seed: int, size: int) -> dict[str, bytes]:
    color, shape = IMAGE_COMBOS[index % len(IMAGE_COMBOS)]
    rng = _rng(seed, "images", index)
    radius = rng.uniform(*RADIUS_RANGE) * size
    center = tuple(rng.uniform(EXTENT * radius, size - EXTENT * radius, size=2))
    meta = {
        "key": f"{index:08d}",
        "caption": caption(color, shape),
        "color": color,
        "shape": shape,
        "width": size,
        "height": size,
        "center": [round(v, 3) for v in center],
        "radius": round(radius, 3),
    }
    buffer = io.BytesIO()
    Image.fromarray(render_frame(color, shape, center, radius, size)).save(buffer, format="JPEG", quality=95)
    return _members(meta, "jpg", buffer.getvalue())


def _members(meta: dict, media_extension: str, media: bytes) -> dict[str, bytes]:
    key = meta["key"]
    return {
        f"{key}.{media_extension}": media,
        f"{key}.txt": meta["caption"].encode(),
        f"{key}.json": json.dumps(meta, sort_keys=True).encode(),
    }


def _tar_bytes(samples: list[dict[str, bytes]]) -> bytes:
    """A tar with fixed metadata (mtime 0, root, 0644) so the bytes depend only on the contents."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a per-process temporary name and rename, so ``path`` exists only when complete."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _manifest(
    counts: dict[str, int], shard_size: int, frames: int, size: int, fps: int, seed: int, paths: str,
    travel: tuple[float, float] | None = None,
) -> dict:
    extra = {} if travel is None else {"travel": list(travel)}  # only when not the default: same demo bytes
    return {
        "generator": "data_pipelines/synthetic.py",
        "seed": seed,
        "paths": paths,
        **extra,
        "frames": frames,
        "size": size,
        "fps": fps,
        "shard_size": shard_size,
        "counts": counts,
        "shards": {
            kind: [shard_name(kind, i) for i in range(_num_shards(n, shard_size))]
            for kind, n in counts.items()
        },
        "attributes": ATTRIBUTES,
        "held_out": [
            {"color": c, "shape": s, "direction": d, "caption": caption(c, s, d)} for c, s, d in HELD_OUT
        ],
    }


def _parse_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(start) >= int(stop):
        raise argparse.ArgumentTypeError(
            f"expected A:B with 0 <= A < B (shard indices, B excluded), got {text!r}"
        )
    return int(start), int(stop)


def _parse_fractions(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        values = (float(low), float(high)) if sep else None
    except ValueError:
        values = None
    if values is None or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise argparse.ArgumentTypeError(f"expected A:B with 0 <= A <= B <= 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--videos", type=int, default=512, help="number of video clips")
    parser.add_argument("--images", type=int, default=256, help="number of still images")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--size", type=int, default=64, help="frame width and height (even)")
    parser.add_argument("--fps", type=int, default=8, help="frame rate written into the mp4")
    parser.add_argument("--seed", type=int, default=0, help="seed for positions, speeds and sizes")
    parser.add_argument("--shard-range", type=_parse_range, help="write only shards A..B-1 (of each kind)")
    parser.add_argument("--paths", choices=PATHS, default="random",
                        help="random: random start and distance; edge: edge to edge along the motion, random across; "
                             "fixed: edge to edge through the centre (one path per direction)")
    parser.add_argument("--travel", type=_parse_fractions, metavar="A:B",
                        help="random paths: the distance covered over a clip, fractions of the frame size "
                             f"(default {TRAVEL_RANGE[0]}:{TRAVEL_RANGE[1]}; e.g. 0.05:0.75 for many speeds)")
    args = parser.parse_args(argv)
    try:
        written = write_shards(**vars(args))  # the option names are write_shards' parameter names
    except ValueError as error:
        parser.error(str(error))
    held_out = ", ".join(caption(*combo) for combo in HELD_OUT)
    print(f"wrote {len(written)} shards to {args.out} (complete ones skipped); held out: {held_out}")


if __name__ == "__main__":
    main()
