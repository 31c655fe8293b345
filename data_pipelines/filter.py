"""Filter WebDataset shards by resolution, duration, motion and aspect ratio into new shards.

    python data_pipelines/filter.py --input 'in/clips-{000000..000099}.tar' --out OUT
        [--min-width W] [--min-height H] [--min-short-side S] [--min-duration S] [--max-duration S]
        [--min-motion M] [--max-motion M] [--min-aspect A] [--max-aspect A]
        [--shard-range A:B] [--workers N] [--overwrite]

Reads shards as make_shards, video2dataset and img2dataset write them (``<key>.mp4`` or ``.jpg`` etc., with
``.txt`` / ``.json``). The numbers come from the ``.json`` metadata where it has them (``width``, ``height``,
``duration``, ``motion_score``; img2dataset's ``width``/``height``) and are otherwise measured from the media
(sizes and durations from the headers; motion from up to 32 decoded frames, only when a motion bound is set).
Duration and motion bounds apply to videos only; images pass them.
Aspect ratio is width / height. Kept samples are copied byte for byte; every input shard gives the output
shard of the same name (empty when nothing is kept), with a ``.stats.json`` sidecar (kept, dropped per
reason: a bound's name, or a skip reason of ``vgen.data.errors.SKIP_REASONS`` such as ``empty_member``);
``filter_stats.json`` merges the sidecars present. Samples with pickle-capable members are dropped.
Missing or empty input shards stop the tool before it writes anything; an input shard that cannot be read
whole gets no output (so a rerun retries it) and the tool exits 1 naming it.

Parallel and resumable: {slurm} Here the shards are the input shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from vgen.data.clips import image_size, probe_video, video_motion
from vgen.data.errors import SampleError
from vgen.data.image import IMAGE_EXTENSIONS
from vgen.data.shardio import (
    SLURM_HELP,
    ToolParser,
    add_work_arguments,
    atomic_write,
    report_failed,
    run_annotation,
    shard_samples,
    tar_bytes,
)
from vgen.data.stream import UNSAFE_EXTENSIONS
from vgen.data.video import VIDEO_EXTENSIONS

__doc__ = __doc__.replace("{slurm}", SLURM_HELP)
BOUNDS = ("min_width", "min_height", "min_short_side", "min_duration", "max_duration", "min_motion", "max_motion",
          "min_aspect", "max_aspect")


def measure(sample: dict, need_motion: bool) -> dict:
    """width, height, duration (videos) and motion_score (when asked) of one sample."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(meta, dict):
        raise SampleError("the .json metadata is not an object", reason="bad_metadata")
    video = next((k for k in sample if k.rsplit(".", 1)[-1] in VIDEO_EXTENSIONS), None)
    image = next((k for k in sample if k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    media = video if video is not None else image
    if media is not None and not sample[media]:
        raise SampleError(f"member .{media} is empty (0 bytes)", reason="empty_member")  # as the training loader
    values = {k: meta[k] for k in ("width", "height", "duration", "motion_score") if isinstance(meta.get(k), (int, float))}
    if video is not None:
        if not {"width", "height", "duration"} <= set(values):
            info = probe_video(sample[video])
            values = {"width": info.width, "height": info.height, "duration": info.duration} | values
        if need_motion and "motion_score" not in values:
            values["motion_score"] = video_motion(sample[video])
    elif image is not None:
        if not {"width", "height"} <= set(values):
            values["width"], values["height"] = image_size(sample[image])
    else:
        raise SampleError(f"no video or image member (has {sorted(k for k in sample if not k.startswith('__'))})",
                          reason="missing_member")
    return values


def verdict(values: dict, args) -> str | None:
    """The first bound ``values`` break (e.g. ``"min_duration"``), or None to keep the sample."""
    width, height = values["width"], values["height"]
    checks = {
        "min_width": width, "min_height": height, "min_short_side": min(width, height),
        "min_duration": values.get("duration"), "max_duration": values.get("duration"),
        "min_motion": values.get("motion_score"), "max_motion": values.get("motion_score"),
        "min_aspect": width / height, "max_aspect": width / height,
    }
    for bound in BOUNDS:
        limit, value = getattr(args, bound), checks[bound]
        if limit is None or value is None:
            continue
        if (bound.startswith("min") and value < limit) or (bound.startswith("max") and value > limit):
            return bound
    return None


def filter_shard(index: int, urls: list[str], args) -> dict | None:
    out = args.out / Path(urls[index]).name
    if out.exists() and not args.overwrite:
        return None
    samples, errors = shard_samples(urls[index])
    kept, dropped = [], Counter()
    need_motion = args.min_motion is not None or args.max_motion is not None
    for sample in samples:
        if any(k.rsplit(".", 1)[-1] in UNSAFE_EXTENSIONS for k in sample):
            dropped["unsafe_member"] += 1
            continue
        try:
            reason = verdict(measure(sample, need_motion), args)
        except (SampleError, ValueError) as error:
            reason = getattr(error, "reason", "bad_metadata")
        if reason is None:
            kept.append({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
        else:
            dropped[reason] += 1
    if errors:  # not read whole: no output, so the shard is not complete and a rerun retries it
        return {"input": urls[index], "failed": errors}
    atomic_write(out, tar_bytes(kept))
    stats = {"input": urls[index], "kept": len(kept), "dropped": dict(dropped), "read_errors": errors}
    atomic_write(out.with_name(out.name + ".stats.json"), json.dumps(stats, sort_keys=True).encode())
    return stats


def merge(sidecars: list[dict]) -> dict:
    dropped = sum((Counter(s["dropped"]) for s in sidecars), Counter())
    return {"kept": sum(s["kept"] for s in sidecars), "dropped": dict(dropped),
            "read_errors": {s["input"]: s["read_errors"] for s in sidecars if s["read_errors"]}}


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="shards: brace patterns, files or folders")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    for bound in BOUNDS:
        unit = {"duration": "seconds", "motion": "mean grey-thumbnail difference, 0..1", "aspect": "width/height"}
        what = next((u for k, u in unit.items() if k in bound), "pixels")
        parser.add_argument(f"--{bound.replace('_', '-')}", type=float, help=f"{bound.replace('_', ' ')} ({what})")
    add_work_arguments(parser)
    args = parser.parse_args(argv)
    written, shards, report, failed = run_annotation(parser.prog, parser, args, filter_shard, "filter_stats.json",
                                                     merge)
    print(f"filter: wrote {len(written)} of shards {shards.start}..{shards.stop - 1} to {args.out}; all shards so "
          f"far: kept {report['kept']}, dropped {report['dropped']} -> {args.out / 'filter_stats.json'}")
    report_failed(parser.prog, failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
