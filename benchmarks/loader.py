"""Data-loader throughput and decode memory.

    .venv/bin/python benchmarks/loader.py [--clips 64] [--frames 32] [--size 64] [--num-frames 16]
        [--batches 40] [--decodes 5000]

1. clips/s of ``VideoDataModule`` (shards on local disk, batch 4, 0 / 1 / 2 DataLoader workers) against raw
   PyAV decoding of the same clips (same windows, same resize) in one process with the bytes already in memory;
   the ratio at 0 workers is the loader's own overhead (tar reading, shuffling, bookkeeping, collation).
   torch runs single-threaded in every setting, as in DataLoader workers.
2. RSS of this process over ``--decodes`` PyAV decodes from bytes (and of the loader with 0 workers over as
   many clips): growth after the first 10% would show a leak.
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from vgen.data import VideoDataModule, decode_video, encode_video
from vgen.data.shardio import atomic_write, tar_bytes
from vgen.data.synthetic import TRAINING_COMBOS, render_clip, sample_motion
from vgen.data.transforms import resize_center_crop

BATCH = 4


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def write_clips(root: Path, clips: int, frames: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    data = []
    for index in range(clips):
        color, shape, direction = TRAINING_COMBOS[index % len(TRAINING_COMBOS)]
        clip = render_clip(color, shape, direction, sample_motion(direction, frames, size, rng), frames, size)
        data.append(encode_video(clip, fps=8, keyframe_interval=8))
    for shard in range(8):
        samples = [{"__key__": f"{i:06d}", "mp4": data[i], "txt": b"a clip"} for i in range(shard, clips, 8)]
        atomic_write(root / f"b-{shard:06d}.tar", tar_bytes(samples))
    return data


def raw_decode(data: list[bytes], count: int, num_frames: int, width: int) -> float:
    rng = random.Random(0)
    start = time.perf_counter()
    for index in range(count):
        clip = decode_video(data[index % len(data)], num_frames, 8, "random", rng)
        resize_center_crop(clip.frames, width=width, height=width)
    return count / (time.perf_counter() - start)


def loader_rate(root: Path, workers: int, batches: int, num_frames: int, width: int) -> float:
    module = VideoDataModule([{"urls": f"{root}/b-{{000000..000007}}.tar", "type": "video"}],
                             num_frames=num_frames, sample_fps=8, resolution=[width, width], batch_size=BATCH,
                             num_workers=workers, shuffle_buffer=8)
    stream = iter(module.train_dataloader())
    next(stream)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in islice(stream, batches):
        pass
    rate = batches * BATCH / (time.perf_counter() - start)
    del stream
    return rate


def rss_track(step, count: int) -> tuple[float, float, float]:
    gc.collect()
    marks = {}
    for index in range(count):
        step(index)
        if index + 1 in (count // 10, count):
            gc.collect()
            marks[index + 1] = rss_mib()
    return marks[count // 10], marks[count], marks[count] - marks[count // 10]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--frames", type=int, default=32, help="frames per stored clip")
    parser.add_argument("--size", type=int, default=64, help="stored clip width and height")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per training clip")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per loader setting")
    parser.add_argument("--decodes", type=int, default=5000, help="decodes for the RSS check")
    args = parser.parse_args()
    # DataLoader workers run torch with one thread; do the same here so that 0 workers, the raw baseline and
    # the workers compare decoding, not OpenMP thread contention (on a loaded 2-core machine that cost ~10x).
    torch.set_num_threads(1)
    width = args.size // 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_clips(root, args.clips, args.frames, args.size)
        raw_decode(data, 20, args.num_frames, width)  # warm-up
        raw = raw_decode(data, args.batches * BATCH, args.num_frames, width)
        rates = {w: loader_rate(root, w, args.batches, args.num_frames, width) for w in (0, 1, 2)}
        raw_after = raw_decode(data, args.batches * BATCH, args.num_frames, width)
        raw = (raw + raw_after) / 2  # before and after the loader runs, to even out machine load
        print(f"clips: {args.clips} x {args.frames} frames {args.size}x{args.size} H.264; training clip "
              f"{args.num_frames} frames -> {width}x{width}; batch {BATCH}; {args.batches} batches per setting\n")
        print("| reader | clips/s | vs raw PyAV |\n| --- | ---: | ---: |")
        print(f"| raw PyAV decode + resize, one process, bytes in memory | {raw:.1f} | 1.00 |")
        for workers, rate in rates.items():
            print(f"| VideoDataModule, {workers} worker(s) | {rate:.1f} | {rate / raw:.2f} |")

        rng = random.Random(1)
        decode = lambda i: decode_video(data[i % len(data)], args.num_frames, 8, "random", rng)
        first, last, growth = rss_track(decode, args.decodes)
        module = VideoDataModule([{"urls": f"{root}/b-{{000000..000007}}.tar", "type": "video"}],
                                 num_frames=args.num_frames, sample_fps=8, resolution=[width, width], batch_size=1,
                                 num_workers=0, shuffle_buffer=8)
        stream = iter(module.train_dataloader())
        l_first, l_last, l_growth = rss_track(lambda i: next(stream), args.decodes)
        print(f"\n| RSS over {args.decodes} decodes | after {args.decodes // 10} | after {args.decodes} | growth |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| decode_video (PyAV from bytes) | {first:.1f} MiB | {last:.1f} MiB | {growth:+.1f} MiB |")
        print(f"| VideoDataModule, 0 workers, batch 1 | {l_first:.1f} MiB | {l_last:.1f} MiB | {l_growth:+.1f} MiB |")


if __name__ == "__main__":
    main()
