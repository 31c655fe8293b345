"""Precompute VAE latents and text (and image) embeddings into shards that training reads as ``type: latent``.

    python data_pipelines/encode.py --input 'shards/clips-{000000..000099}.tar' --out latents/
        [--vae sd21] [--text-encoder open_clip_vit_h14] [--image-encoder none] [--frames 16] [--fps 8]
        [--width 448] [--height 256] [--batch-size 8] [--device cuda] [--override model.vae.weights=...]
        [--shard-range A:B] [--workers N] [--overwrite]

Encoders are the ``conf/model/{vae,text_encoder,image_encoder}`` options (``--override`` takes any other Hydra
override of ``conf/train.yaml``). Each video sample is decoded like the loader does (``--frames`` at ``--fps``,
the centre window, resized to cover ``--width`` x ``--height`` and centre-cropped; images as 1 frame) and stored
as ``<key>.latents.safetensors`` with ``latent`` [C, F, h, w] (the VAE posterior mean, scaled), ``text``
[L, D] (when the sample has a caption), ``image`` [D] (with ``--image-encoder``) and ``fps``, next to its
``.txt`` and ``.json``. Samples the loader would skip are skipped and counted in the ``.stats.json`` sidecar;
``encode_stats.json`` merges them. Point a source at the output with ``type: latent``.

Parallel and resumable: {slurm} Here the shards are the input shards.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch

from vgen.data.buckets import Bucket
from vgen.data.errors import SampleError
from vgen.data.image import IMAGE_EXTENSIONS
from vgen.data.shardio import (
    SLURM_HELP,
    add_work_arguments,
    atomic_write,
    expand_inputs,
    run_shards,
    shard_samples,
    tar_bytes,
    task_shards,
    write_report,
)
from vgen.data.stream import SampleDecoder

__doc__ = __doc__.replace("{slurm}", SLURM_HELP)
_ENCODERS: dict = {}


def encoders(args) -> dict:
    """The frozen encoders, built once per process from the Hydra configs."""
    if not _ENCODERS:
        from hydra import compose, initialize_config_dir
        from hydra.utils import instantiate

        from vgen.config import CONF_DIR

        overrides = [f"model/vae={args.vae}", f"model/text_encoder={args.text_encoder}", *args.override]
        if args.image_encoder:
            overrides.append(f"model/image_encoder={args.image_encoder}")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        for name in ("vae", "text_encoder", "image_encoder"):
            node = cfg.model.get(name)
            _ENCODERS[name] = instantiate(node).to(args.device).eval() if node else None
    return _ENCODERS


def encode_samples(samples: list[tuple[dict, dict]], args) -> list[dict]:
    """(raw sample, decoded sample) pairs of one shape -> output samples with ``latents.safetensors``."""
    from safetensors.torch import save

    models = encoders(args)
    video = torch.stack([decoded["video"] for _, decoded in samples]).to(args.device)
    with torch.no_grad():
        latents = models["vae"].encode(video, sample=False).float().cpu()
        captions = [decoded["caption"] for _, decoded in samples]
        text = models["text_encoder"](captions).float().cpu()
        image = models["image_encoder"](video[:, :, 0]).float().cpu() if models["image_encoder"] else None
    out = []
    for index, (raw, decoded) in enumerate(samples):
        tensors = {"latent": latents[index].contiguous(), "fps": torch.tensor(decoded["fps"])}
        if decoded["caption"]:
            tensors["text"] = text[index].contiguous()
        if image is not None:
            tensors["image"] = image[index].contiguous()
        sample = {"__key__": raw["__key__"], "latents.safetensors": save(tensors)}
        sample |= {k: raw[k] for k in ("txt", "json") if k in raw}
        out.append(sample)
    return out


def encode_shard(index: int, urls: list[str], args) -> dict | None:
    out = args.out / Path(urls[index]).name
    if out.exists() and not args.overwrite:
        return None
    raw_samples, errors = shard_samples(urls[index])
    buckets = {"video": Bucket(args.frames, args.width, args.height, 1), "image": Bucket(1, args.width, args.height, 1)}
    decoders = {kind: SampleDecoder(kind, args.fps, start="center", caption_required=False) for kind in buckets}
    pending = {kind: [] for kind in buckets}
    written, skipped = [], Counter()
    for raw in raw_samples:
        kind = "image" if any(k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS for k in raw) else "video"
        try:
            pending[kind].append((raw, decoders[kind](raw, random.Random(0), buckets[kind])))
        except SampleError as error:
            skipped[error.reason] += 1
            continue
        if len(pending[kind]) == args.batch_size:
            written += encode_samples(pending[kind], args)
            pending[kind] = []
    for kind, rest in pending.items():
        if rest:
            written += encode_samples(rest, args)
    atomic_write(out, tar_bytes(written))
    stats = {"input": urls[index], "encoded": len(written), "skipped": dict(skipped), "read_errors": errors}
    atomic_write(out.with_name(out.name + ".stats.json"), json.dumps(stats, sort_keys=True).encode())
    return stats


def merge(sidecars: list[dict]) -> dict:
    return {"encoded": sum(s["encoded"] for s in sidecars),
            "skipped": dict(sum((Counter(s["skipped"]) for s in sidecars), Counter())),
            "read_errors": {s["input"]: s["read_errors"] for s in sidecars if s["read_errors"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="shards: brace patterns, files or folders")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--vae", default="sd21", help="conf/model/vae option")
    parser.add_argument("--text-encoder", default="open_clip_vit_h14", help="conf/model/text_encoder option")
    parser.add_argument("--image-encoder", default=None, help="conf/model/image_encoder option (default: none)")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides of conf/train.yaml")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--fps", type=float, default=8, help="sample fps (frame stride = native fps / this)")
    parser.add_argument("--width", type=int, default=448, help="clip width after resize and centre crop")
    parser.add_argument("--height", type=int, default=256, help="clip height after resize and centre crop")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per encoder call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add_work_arguments(parser)
    args = parser.parse_args(argv)
    try:
        urls = expand_inputs(args.input)
    except FileNotFoundError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    shards = task_shards(len(urls), args.shard_range)
    written = run_shards(functools.partial(encode_shard, urls=urls, args=args), shards, args.workers)
    report = write_report(args.out, "encode_stats.json", merge)
    print(f"encode: wrote {len(written)} of shards {shards.start}..{shards.stop - 1} to {args.out}; all shards so "
          f"far: {report['encoded']} encoded, skipped {report['skipped']} -> {args.out / 'encode_stats.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
