"""Toy proof of HiGen's decoupling on the CPU demo data: the motion cue steers how far the shape moves, and the
video pass starts from the key frame (the spatial prior).

1. Shards of demo shapes moving at many speeds (``data_pipelines/synthetic.py --travel 0.05:0.75``: a clip covers
   5-75% of the frame; the demo's own shards all cover ~55-65%), written under ``data/higen_toy`` if absent.
2. Train the demo model (``experiment=demo``: 8x8 pixel-space clips, 4 frames) with HiGen's three conditions --
   motion cue, appearance cue (tiny random-init CLIP image tower), spatial prior (the clip's clean first frame) --
   and temporal layers the identity on single frames, on 75% clip batches (cues measured from the clip) and 25%
   still batches (the spatial pass: neutral cues, zero prior).
3. Calibrate the factors on the training clips: ``motion_factor`` values are quantiles (5-95%) of the clips' mean
   motion intensity; ``appearance_factor`` is 1 - the clips' mean first-to-last-frame appearance similarity (the
   inference schedule then matches the training cue at its ends).
4. For every held-out prompt (a colour/shape/direction combination no training clip has) and seed: sample one key
   frame, then one video per motion factor on that key frame with the same noise. Measure the shape's
   displacement (first to last frame, centroid tracker, pixels) and the centroid distance between the key frame
   and the video's frame 0.

    python benchmarks/higen_toy.py [--steps 1500] [--seeds 8] [--log-dir outputs]

Training runs ``python -m vgen.train`` (resumes with ``resume=auto``) and is skipped when its final checkpoint
exists. Prints per-factor displacement, three Spearman correlations between factor and displacement (pooled over
all videos; of the per-factor medians; the mean over videos of the per-video correlation across factors), the
direction accuracy and the key-frame centroid error (targets: Spearman >= 0.8; centroid error <= 1 pixel).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from vgen.data.conditions.cues import appearance_similarity, motion_intensity
from vgen.data.synthetic import HELD_OUT, caption, centroid_track, centroids
from vgen.data.transforms import resize_center_crop
from vgen.data.video import decode_video
from vgen.media import to_uint8_frames

DATA = "data/higen_toy"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _ranks(values) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); NaN when either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def make_data(videos: int) -> None:
    if (Path(DATA) / "manifest.json").exists():
        return
    subprocess.run([sys.executable, "data_pipelines/synthetic.py", "--out", DATA, "--videos", str(videos),
                    "--images", "256", "--paths", "random", "--travel", "0.05:0.75"], check=True)


def train(args) -> Path:
    checkpoint = Path(args.log_dir) / args.name / "checkpoints" / f"step{args.steps:07d}.ckpt"
    if checkpoint.exists():
        return checkpoint
    shards = args.videos // 64
    overrides = ["experiment=demo", f"name={args.name}", f"paths.log_dir={args.log_dir}",
                 f"trainer.max_steps={args.steps}",
                 f"data.sources.0.urls='${{paths.data_dir}}/higen_toy/videos-{{000000..{shards - 1:06d}}}.tar'",
                 "data.sources.1.urls='${paths.data_dir}/higen_toy/images-{000000..000003}.tar'",
                 "data.sources.1.weight=0.25",
                 "+model/condition@model.unet.conditions.motion=motion_cue",
                 "+model/condition@model.unet.conditions.appearance=appearance_cue",
                 "+model/condition@model.unet.conditions.prior=spatial_prior",
                 "model.unet.temporal_identity_for_stills=true", "model/image_encoder=tiny", "model.unet.image_dim=32",
                 "callbacks.sample_videos.every_n_steps=100000", "logger=csv", "resume=auto", *args.set]
    print("python -m vgen.train " + " ".join(overrides), flush=True)
    subprocess.run([sys.executable, "-m", "vgen.train", *overrides], check=True,
                   env={**os.environ, "WANDB_MODE": "offline"})
    return checkpoint


@torch.no_grad()
def calibrate(pipe, clips: int) -> tuple[list[int], float]:
    """Motion factors (quantiles of the training clips' mean motion intensity) and the appearance factor."""
    size, frames = pipe.defaults["height"], pipe.defaults["num_frames"]
    fps = pipe.defaults.get("fps") or 2
    motions, last_similarity = [], []
    for shard in sorted(Path(DATA).glob("videos-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".mp4"):
                    continue
                clip = decode_video(tar.extractfile(member).read(), frames, fps, start="first")
                video = resize_center_crop(clip.frames, size, size)  # [3, F, H, W] in [-1, 1], as training
                pixels = to_uint8_frames(video)
                motions.append(motion_intensity(torch.from_numpy(pixels)).float().mean().item())
                embeddings = pipe.image_encoder(video.transpose(0, 1).to(pipe.device)).reshape(frames, -1)
                last_similarity.append(appearance_similarity(embeddings.cpu())[0, frames - 1].item())
                if len(motions) >= clips:
                    break
        if len(motions) >= clips:
            break
    factors = sorted({round(float(np.quantile(motions, q))) for q in QUANTILES})
    return factors, 1.0 - float(np.mean(last_similarity))


@torch.no_grad()
def evaluate(pipe, factors: list[int], appearance_factor: float, seeds: int, steps: int) -> dict:
    displacement = {f: [] for f in factors}
    direction_hits = {f: 0 for f in factors}
    key_errors, per_video = [], []
    for seed in range(seeds):
        prompts = [caption(*combo) for combo in HELD_OUT]
        key = pipe.key_frame(prompts, seed=2000 + seed, steps=steps)
        key_frames = [to_uint8_frames(v) for v in pipe.vae.decode(key).clamp(-1, 1)]
        videos = {f: pipe.higen(prompts, motion_factor=f, appearance_factor=appearance_factor, key=key,
                                seed=2000 + seed, steps=steps) for f in factors}
        for i, combo in enumerate(HELD_OUT):
            key_centre = centroids(key_frames[i])[0]
            row = []
            for f in factors:
                frames = to_uint8_frames(videos[f][i])
                track = centroids(frames)
                moved = float(np.linalg.norm(track[-1] - track[0]))
                moved = 0.0 if np.isnan(moved) else moved
                displacement[f].append(moved)
                row.append(moved)
                direction_hits[f] += centroid_track(frames) == combo[2]
                error = float(np.linalg.norm(track[0] - key_centre))
                key_errors.append(error if not np.isnan(error) else float("inf"))
            per_video.append(row)
    pooled_x = [f for f in factors for _ in displacement[f]]
    pooled_y = [d for f in factors for d in displacement[f]]
    medians = [float(np.median(displacement[f])) for f in factors]
    within = [spearman(factors, row) for row in per_video if len(set(row)) > 1]
    return {
        "displacement": displacement, "medians": medians,
        "direction": {f: direction_hits[f] / len(displacement[f]) for f in factors},
        "spearman_pooled": spearman(pooled_x, pooled_y),
        "spearman_medians": spearman(factors, medians),
        "spearman_within_mean": float(np.mean(within)) if within else float("nan"),
        "key_errors": np.array(key_errors), "videos": len(per_video),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--videos", type=int, default=1024, help="training clips to write (multiple of 64)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per held-out prompt (4 prompts each)")
    parser.add_argument("--ddim-steps", type=int, default=25, help="DDIM steps per pass")
    parser.add_argument("--calibration-clips", type=int, default=256, help="training clips measured for the factors")
    parser.add_argument("--log-dir", default="outputs", help="where the run lives")
    parser.add_argument("--name", default="higen_toy", help="run name")
    parser.add_argument("--set", nargs="*", default=[], help="extra vgen.train overrides")
    args = parser.parse_args()
    if args.videos < 64 or args.videos % 64:
        parser.error(f"--videos must be a positive multiple of 64, got {args.videos}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    make_data(args.videos)
    checkpoint = train(args)
    from vgen.pipeline import VideoPipeline

    pipe = VideoPipeline.from_checkpoint(checkpoint)
    factors, appearance_factor = calibrate(pipe, args.calibration_clips)
    print(f"motion factors (training-clip quantiles {QUANTILES}): {factors}; appearance factor "
          f"{appearance_factor:.4f}", flush=True)
    result = evaluate(pipe, factors, appearance_factor, args.seeds, args.ddim_steps)
    print(f"{result['videos']} held-out prompt/seed pairs x {len(factors)} motion factors, checkpoint {checkpoint}")
    print("motion_factor  median displacement (px of 8)  mean  direction accuracy")
    for f, median in zip(factors, result["medians"]):
        values = result["displacement"][f]
        print(f"{f:>13}  {median:>28.2f}  {np.mean(values):.2f}  {result['direction'][f]:.1%}")
    print(f"Spearman(factor, displacement): pooled over {sum(map(len, result['displacement'].values()))} videos "
          f"{result['spearman_pooled']:.3f}; of the per-factor medians {result['spearman_medians']:.3f}; "
          f"per key frame across factors, mean {result['spearman_within_mean']:.3f}")
    errors = result["key_errors"]
    print(f"key frame vs the video's frame 0, centroid distance (px): median {np.median(errors):.3f}, mean "
          f"{np.mean(errors[np.isfinite(errors)]):.3f}, <= 1 px: {np.mean(errors <= 1.0):.1%}, no shape found: "
          f"{np.mean(~np.isfinite(errors)):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
