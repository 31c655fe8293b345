"""Precompute VideoComposer condition maps into shards, so a large run reads them instead of extracting them.

    python data_pipelines/conditions.py --input 'shards/clips-{000000..000099}.tar' --out with_conditions/
        --kinds sketch motion depthmap [--depth-weights DPT_FOLDER] [--sketch-weights PIDINET_FILE]
        [--fps 8] [--size 256] [--max-frames 1024] [--shard-range A:B] [--workers N] [--overwrite]

Every sample is copied byte for byte, plus one member per kind, ``<key>.<kind>.safetensors.gz`` (gzip of a
safetensors file): ``maps`` [C, N, H, W] (uint8 = value x 255 for sketch, single_sketch, canny and local_image;
float16 for depthmap, motion and mask; float32 [N, bins] for palette) and ``indices`` [N], the source frame number
of each map. Every source frame is stored (up to ``--max-frames``), at ``--size`` pixels on the short side, so
any training window (random start, any stride) finds its frames; training resizes them like the frames. Motion
vectors are the motion between frames ``stride`` apart, ``stride = round(native fps / --fps)``: set ``--fps`` to
the run's ``data.sample_fps``. Images get maps of their one frame. A source reads the members with
``data.conditions.<name>: {kind: <kind>, extract: false}`` (or extracts the kinds a shard lacks). Samples that
cannot be decoded are dropped and counted under the loader's skip reasons in the ``.stats.json`` sidecar;
``conditions_stats.json`` merges them. Missing or empty input shards stop the tool before it writes anything; an
input shard that cannot be read whole gets no output (a rerun retries it) and the tool exits 1 naming it.

Parallel and resumable: {slurm} Here the shards are the input shards.
"""

from __future__ import annotations

import argparse
import gzip
import random
import sys
from pathlib import Path

import numpy as np
import torch

from vgen.data.clips import read_frames
from vgen.data.condition_maps import KINDS, encode_maps, extract
from vgen.data.errors import SampleError
from vgen.data.image import IMAGE_EXTENSIONS, decode_image
from vgen.data.shardio import (
    SLURM_HELP,
    ToolParser,
    add_members,
    add_work_arguments,
    fail,
    report_failed,
    run_annotation,
)
from vgen.data.video import VIDEO_EXTENSIONS, frame_stride

__doc__ = __doc__.replace("{slurm}", SLURM_HELP)


def source_frames(sample: dict, size: int, max_frames: int) -> tuple[np.ndarray, float]:
    """Every frame of the sample's video (or its image), short side ``size``: uint8 [N, H, W, 3], native fps."""
    media = next((k for k in sample if k.rsplit(".", 1)[-1] in VIDEO_EXTENSIONS), None)
    if media is not None:
        if not sample[media]:
            raise SampleError(f"member .{media} is empty (0 bytes)", reason="empty_member")
        info, frames = read_frames(sample[media], None, size)
        stack = []
        for frame in frames:
            stack.append(frame)
            if len(stack) == max_frames:
                frames.close()
                break
        if not stack:
            raise SampleError("the video has no frame")
        return np.stack(stack), info.fps
    media = next((k for k in sample if k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if media is None:
        raise SampleError(f"no video or image member (has {sorted(k for k in sample if not k.startswith('__'))})",
                          reason="missing_member")
    image = torch.from_numpy(decode_image(sample[media])).permute(2, 0, 1)[None].float()
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    image = torch.nn.functional.interpolate(image, size=(round(height * scale), round(width * scale)),
                                            mode="bilinear", antialias=True, align_corners=False)
    return image.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), 0.0


def condition_maps(frames: np.ndarray, native_fps: float, kind: str, fps: float, rng: random.Random,
                   weights: str | None) -> torch.Tensor:
    """The ``kind`` map of every frame. Motion: between frames ``stride`` apart (each residue class of the stride
    re-encoded on its own), so a training window at ``fps`` sees the motion between its own frames."""
    if kind != "motion" or native_fps <= 0 or len(frames) < 2:
        return extract(kind, frames, rng, weights)
    stride = frame_stride(native_fps, fps)
    field = torch.zeros(2, *frames.shape[:3])
    for offset in range(min(stride, len(frames))):
        field[:, offset::stride] = extract(kind, frames[offset::stride], rng)
    return field


def annotate_shard(index: int, urls: list[str], args) -> dict | None:
    weights = {"depthmap": args.depth_weights, "sketch": args.sketch_weights, "single_sketch": args.sketch_weights}

    def members(sample: dict) -> dict[str, bytes]:
        frames, native = source_frames(sample, args.size, args.max_frames)
        rng = random.Random(f"{sample['__key__']}")
        return {f"{kind}.safetensors.gz": gzip.compress(encode_maps(
            condition_maps(frames, native, kind, args.fps, rng, weights.get(kind)), range(len(frames)), kind),
            compresslevel=6) for kind in args.kinds}

    return add_members(urls[index], args.out / Path(urls[index]).name, args.overwrite, members)


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="shards: brace patterns, files or folders")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--kinds", nargs="+", required=True, choices=sorted(KINDS), help="condition maps to store")
    parser.add_argument("--fps", type=float, default=8.0, help="the training sample_fps (motion vectors' stride)")
    parser.add_argument("--size", type=int, default=256, help="short side of the stored maps, pixels")
    parser.add_argument("--max-frames", type=int, default=1024, help="frames per clip at most (from the start)")
    parser.add_argument("--depth-weights", help="DPT depth model (folder or file) for --kinds depthmap")
    parser.add_argument("--sketch-weights", help="PiDiNet weights for sketch / single_sketch (default: classical)")
    add_work_arguments(parser)
    args = parser.parse_args(argv)
    if args.fps <= 0 or args.size < 8 or args.max_frames < 1:
        fail(parser.prog, f"need --fps > 0, --size >= 8 and --max-frames >= 1, got {args.fps}, {args.size} and "
                          f"{args.max_frames}")
    if "depthmap" in args.kinds and not args.depth_weights:
        fail(parser.prog, "--kinds depthmap needs --depth-weights (a DPT depth model folder or file)")
    for flag, path in (("--depth-weights", args.depth_weights), ("--sketch-weights", args.sketch_weights)):
        if path and not Path(path).exists():
            fail(parser.prog, f"{flag} {path}: no such file or folder")
    written, shards, report, failed = run_annotation(parser.prog, parser, args, annotate_shard,
                                                     "conditions_stats.json")
    print(f"conditions: wrote {len(written)} of shards {shards.start}..{shards.stop - 1} to {args.out}; all shards "
          f"so far: {report['written']} samples, dropped {report['dropped']} -> {args.out / 'conditions_stats.json'}")
    report_failed(parser.prog, failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
