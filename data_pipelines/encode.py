"""Precompute VAE latents and text (and image) embeddings into shards that training reads as ``type: latent``.

    python data_pipelines/encode.py --input 'shards/clips-{000000..000099}.tar' --out latents/
        --vae-weights weights/v2-1_512-ema-pruned.ckpt --text-encoder-weights weights/open_clip_pytorch_model.bin
        [--vae sd21] [--text-encoder open_clip_vit_h14] [--image-encoder none] [--image-encoder-weights FILE]
        [--frames 16] [--fps 8] [--width 448] [--height 256] [--batch-size 8] [--device cuda]
        [--override KEY=VALUE ...] [--shard-range A:B] [--workers N] [--overwrite]

Encoders are the ``conf/model/{vae,text_encoder,image_encoder}`` options (``--override`` takes any other Hydra
override of ``conf/train.yaml``). A pretrained encoder needs its weights file (``--vae-weights``, ...; or the
option's ``weights`` set with ``--override``): without one the tool refuses to start, since latents of a random
network are useless (only the ``tiny`` test encoders run from their fixed random init). It prints a line per
shard and, within a long shard, every 30 s. Each video sample is decoded like the loader does (``--frames`` at ``--fps``,
the centre window, resized to cover ``--width`` x ``--height`` and centre-cropped; images as 1 frame) and stored
as ``<key>.latents.safetensors`` with ``latent`` [C, F, h, w] (the VAE posterior mean, scaled), ``text``
[L, D] (when the sample has a caption), ``image`` [D] (with ``--image-encoder``) and ``fps``, next to its
``.txt`` and ``.json``. Samples the loader would skip are skipped and counted (under the loader's reasons,
``vgen.data.errors.SKIP_REASONS``) in the ``.stats.json`` sidecar; ``encode_stats.json`` merges them. Missing
or empty input shards stop the tool before it writes anything; an input shard that cannot be read whole gets no
output (a rerun retries it) and the tool exits 1 naming it. Point a source at the output with ``type: latent``.

Parallel and resumable: {slurm} Here the shards are the input shards.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from vgen.data.buckets import Bucket
from vgen.data.errors import SampleError
from vgen.data.image import IMAGE_EXTENSIONS
from vgen.data.shardio import (
    SLURM_HELP,
    ToolParser,
    add_work_arguments,
    atomic_write,
    expand_inputs,
    fail,
    report_failed,
    run_shards,
    shard_samples,
    split_failed,
    tar_bytes,
    task_shards,
    write_report,
)
from vgen.data.stream import SampleDecoder

__doc__ = __doc__.replace("{slurm}", SLURM_HELP)
_ENCODERS: dict = {}
ENCODER_FLAGS = {"vae": "--vae", "text_encoder": "--text-encoder", "image_encoder": "--image-encoder"}
PROGRESS_EVERY_S = 30.0  # within a shard, a progress line at most this often


def encoder_config(args):
    """``conf/train.yaml`` composed with the chosen encoders, their weight files and ``--override``s."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vgen.config import CONF_DIR

    overrides = [f"model/vae={args.vae}", f"model/text_encoder={args.text_encoder}"]
    if args.image_encoder:
        overrides.append(f"model/image_encoder={args.image_encoder}")
    for name in ENCODER_FLAGS:
        weights = getattr(args, f"{name}_weights")
        if weights is not None:
            overrides.append(f"model.{name}.weights={weights}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, *args.override])


def check_encoders(cfg, args) -> str | None:
    """Why the encoders of ``cfg`` must not run: a pretrained encoder without a weights file (a random network's
    latents and embeddings are useless), or a weights file that is not there. None when they can."""
    problems, unweighted = [], False
    for name, flag in ENCODER_FLAGS.items():
        node = cfg.model.get(name)
        if node is None or "weights" not in node:
            continue  # no encoder, or one without weights (identity)
        weights = node.get("weights")
        if weights is None and "tiny" not in (node.get("config"), node.get("arch")):
            unweighted = True
            problems.append(f"{flag} {getattr(args, name)} has no weights file: give {flag}-weights FILE (or "
                            f"--override model.{name}.weights=FILE)")
        elif weights is not None and not os.path.isfile(str(weights)):
            problems.append(f"{flag}-weights: no such file {weights}")
    if unweighted:
        problems.append("encoding with randomly initialised encoders is refused (only the tiny test encoders, "
                        "--vae tiny --text-encoder tiny, run without weights)")
    return "; ".join(problems) or None


def encoders(args) -> dict:
    """The frozen encoders, built once per process from the Hydra configs."""
    if not _ENCODERS:
        from hydra.utils import instantiate

        cfg = encoder_config(args)
        for name in ENCODER_FLAGS:
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
    started = last_report = time.monotonic()
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
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                progress(f"{Path(urls[index]).name}: {len(written)} samples encoded so far "
                         f"({len(written) / (last_report - started):.2f}/s)")
    for kind, rest in pending.items():
        if rest:
            written += encode_samples(rest, args)
    if errors:  # not read whole: no output, so the shard is not complete and a rerun retries it
        progress(f"{Path(urls[index]).name}: could not be read whole ({errors[0]}); no output written")
        return {"input": urls[index], "failed": errors}
    atomic_write(out, tar_bytes(written))
    progress(f"shard {index} {Path(urls[index]).name} done: {len(written)} samples encoded, skipped "
             f"{dict(skipped)} in {time.monotonic() - started:.1f} s")
    stats = {"input": urls[index], "encoded": len(written), "skipped": dict(skipped), "read_errors": errors}
    atomic_write(out.with_name(out.name + ".stats.json"), json.dumps(stats, sort_keys=True).encode())
    return stats


def progress(message: str) -> None:
    print(f"encode: {message}", flush=True)


def merge(sidecars: list[dict]) -> dict:
    return {"encoded": sum(s["encoded"] for s in sidecars),
            "skipped": dict(sum((Counter(s["skipped"]) for s in sidecars), Counter())),
            "read_errors": {s["input"]: s["read_errors"] for s in sidecars if s["read_errors"]}}


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="shards: brace patterns, files or folders")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--vae", default="sd21", help="conf/model/vae option")
    parser.add_argument("--vae-weights", help="the VAE's weights file (required unless --vae is tiny or identity)")
    parser.add_argument("--text-encoder", default="open_clip_vit_h14", help="conf/model/text_encoder option")
    parser.add_argument("--text-encoder-weights", help="the text encoder's weights file (required unless tiny)")
    parser.add_argument("--image-encoder", default=None, help="conf/model/image_encoder option (default: none)")
    parser.add_argument("--image-encoder-weights", help="the image encoder's weights file (required unless tiny)")
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
        fail(parser.prog, str(error))
    try:
        problem = check_encoders(encoder_config(args), args)
    except Exception as error:  # noqa: BLE001 - Hydra composition errors: a bad option or override
        from vgen.config import one_line

        problem = one_line(str(error))
    if problem:
        fail(parser.prog, problem)
    args.out.mkdir(parents=True, exist_ok=True)
    shards = task_shards(len(urls), args.shard_range)
    progress(f"{len(shards)} shard(s) ({shards.start}..{shards.stop - 1} of {len(urls)}) with --vae {args.vae} "
             f"--text-encoder {args.text_encoder}{f' --image-encoder {args.image_encoder}' if args.image_encoder else ''}"
             f" on {args.device}, {args.workers} at a time; complete shards in {args.out} are skipped")
    results = run_shards(functools.partial(encode_shard, urls=urls, args=args), shards, args.workers)
    written, failed = split_failed(results)
    report = write_report(args.out, "encode_stats.json", merge)
    print(f"encode: wrote {len(written)} of shards {shards.start}..{shards.stop - 1} to {args.out}; all shards so "
          f"far: {report['encoded']} encoded, skipped {report['skipped']} -> {args.out / 'encode_stats.json'}")
    report_failed(parser.prog, failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
