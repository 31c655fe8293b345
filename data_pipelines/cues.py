"""Precompute what HiGen's appearance cue needs into shards, so a large run does not encode every clip's frames with
the image encoder at each step (``experiment=higen_stage2``, ``data.cues: true``).

    python data_pipelines/cues.py --input 'shards/clips-{000000..000099}.tar' --out with_cues/
        --image-encoder-weights weights/open_clip_pytorch_model.bin [--image-encoder open_clip_vit_h14]
        [--size 224] [--max-frames 1024] [--batch-size 64] [--device cuda]
        [--shard-range A:B] [--workers N] [--overwrite]

Every sample is copied byte for byte; each video sample gets one more member, ``<key>.cues.safetensors``:
``embeddings`` float16 [N, D], the image encoder's embedding of every source frame (up to ``--max-frames`` from
the start, decoded at ``--size`` pixels on the short side; the encoder takes their centre square, as it does in
training), and ``indices`` int64 [N], the source frame number of each. The encoder is the run's
(``--image-encoder``: a ``conf/model/image_encoder`` option with its ``--image-encoder-weights``; only ``tiny``, the
test encoder, runs without weights). Training (``data.cues: true``) picks the embeddings of its window's frames
by index, so any window (random start, any stride, any fps) gets its appearance cue, the cosine similarity of
every pair of its frames padded to 32 (``vgen.data.conditions.cues.appearance_similarity``), as the stage would
measure it (up to float16 and the frames' size); clips without the member leave it to the stage.

The motion cue is not stored: the loader measures it from each window's decoded frames (exactly what the stage
would), ``round(10000 x mean |grey_t - grey_t-1|)`` per pair of adjacent window frames, i.e. frames ``stride``
apart at the run's ``data.sample_fps``, grey in [0, 1]. So 100 units are 1% of the grey range per frame pair, and
500 (the released model's sampling ``motion_factor``) is "typical" motion: pixels changing by 5% of the full range
between frames on average, moderate camera or object motion at 8 fps; a still clip is 0. Faster sampling (a lower
fps, a larger stride) gives larger values for the same clip.

Images are copied without a member (stills take HiGen's neutral cues). Samples that cannot be decoded are dropped
and counted under the loader's skip reasons in the ``.stats.json`` sidecar; ``cues_stats.json`` merges them.
Missing or empty input shards stop the tool before it writes anything; an input shard that cannot be read whole
gets no output (a rerun retries it) and the tool exits 1 naming it.

Parallel and resumable: {slurm} Here the shards are the input shards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from vgen.config import CONF_DIR
from vgen.data.clips import read_frames
from vgen.data.conditions.cues import CUES_MEMBER, encode_cues
from vgen.data.errors import SampleError
from vgen.data.shardio import (
    SLURM_HELP,
    ToolParser,
    add_members,
    add_work_arguments,
    fail,
    report_failed,
    run_annotation,
)
from vgen.data.video import VIDEO_EXTENSIONS

__doc__ = __doc__.replace("{slurm}", SLURM_HELP)
ENCODERS = CONF_DIR / "model" / "image_encoder"
_ENCODER: dict = {}


def encoder_config(option: str, weights: str | None):
    """The ``conf/model/image_encoder/<option>.yaml`` node with ``weights`` set (when given)."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(ENCODERS / f"{option}.yaml")
    if weights is not None:
        node.weights = weights
    return node


def image_encoder(args) -> torch.nn.Module:
    """The frozen image encoder, built once per process."""
    if not _ENCODER:
        from hydra.utils import instantiate

        _ENCODER["model"] = instantiate(encoder_config(args.image_encoder, args.image_encoder_weights))
        _ENCODER["model"].to(args.device).eval()
    return _ENCODER["model"]


def clip_frames(data: bytes, size: int, max_frames: int) -> np.ndarray:
    """The first ``max_frames`` frames of a video, short side ``size``: uint8 [N, H, W, 3]."""
    if not data:
        raise SampleError("the video member is empty (0 bytes)", reason="empty_member")
    _, frames = read_frames(data, None, size)
    stack = []
    for frame in frames:
        stack.append(frame)
        if len(stack) == max_frames:
            frames.close()
            break
    if not stack:
        raise SampleError("the video has no frame")
    return np.stack(stack)


@torch.no_grad()
def frame_embeddings(frames: np.ndarray, args) -> torch.Tensor:
    """uint8 frames [N, H, W, 3] -> image-encoder embeddings [N, D] (``--batch-size`` frames per call)."""
    encoder, out = image_encoder(args), []
    for start in range(0, len(frames), args.batch_size):
        chunk = torch.from_numpy(frames[start:start + args.batch_size]).to(args.device)
        images = chunk.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # as the loader scales frames
        out.append(encoder(images).reshape(len(chunk), -1).float().cpu())
    return torch.cat(out)


def cue_shard(index: int, urls: list[str], args) -> dict | None:
    def members(sample: dict) -> dict[str, bytes]:
        media = next((k for k in sample if k.rsplit(".", 1)[-1] in VIDEO_EXTENSIONS), None)
        if media is None:  # images keep the neutral cues: no member
            return {}
        frames = clip_frames(sample[media], args.size, args.max_frames)
        return {CUES_MEMBER: encode_cues(frame_embeddings(frames, args), range(len(frames)))}

    return add_members(urls[index], args.out / Path(urls[index]).name, args.overwrite, members)


def check_encoder(args) -> str | None:
    """Why the encoder must not run: a pretrained one without weights (random embeddings are useless) or a
    weights file that is not there. None when it can."""
    if args.image_encoder_weights is not None:
        if not Path(args.image_encoder_weights).is_file():
            return f"--image-encoder-weights {args.image_encoder_weights}: no such file"
        return None
    node = encoder_config(args.image_encoder, None)
    if node.get("weights") is None and node.get("arch") != "tiny":
        return (f"--image-encoder {args.image_encoder} needs --image-encoder-weights FILE (the run's image encoder "
                "weights): embeddings of a randomly initialised encoder are useless")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="shards: brace patterns, files or folders")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--image-encoder", default="open_clip_vit_h14",
                        choices=sorted(p.stem for p in ENCODERS.glob("*.yaml")),
                        help="conf/model/image_encoder option: the run's model.image_encoder")
    parser.add_argument("--image-encoder-weights", help="its weights file (required unless tiny)")
    parser.add_argument("--size", type=int, default=224, help="short side of the frames encoded, pixels")
    parser.add_argument("--max-frames", type=int, default=1024, help="frames per clip at most (from the start)")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per encoder call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add_work_arguments(parser)
    args = parser.parse_args(argv)
    if args.size < 8 or args.max_frames < 1 or args.batch_size < 1:
        fail(parser.prog, f"need --size >= 8, --max-frames >= 1 and --batch-size >= 1, got {args.size}, "
                          f"{args.max_frames} and {args.batch_size}")
    problem = check_encoder(args)
    if problem:
        fail(parser.prog, problem)
    written, shards, report, failed = run_annotation(parser.prog, parser, args, cue_shard, "cues_stats.json")
    print(f"cues: wrote {len(written)} of shards {shards.start}..{shards.stop - 1} to {args.out}; all shards so far: "
          f"{report['written']} samples ({report['annotated']} clips with cues), dropped {report['dropped']} -> "
          f"{args.out / 'cues_stats.json'}")
    report_failed(parser.prog, failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
