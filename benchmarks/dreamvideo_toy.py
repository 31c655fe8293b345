"""Toy proof of DreamVideo's customisation on the CPU demo model: a subject the base never saw (a new shape, from 4
still images) and a motion it never saw (a diagonal, from 4 videos of other shapes), learned separately over the
frozen base and composed at sampling.

1. Base: the demo model (``experiment=demo``: 8x8 pixel-space clips, 4 frames; circles, squares and triangles in 4
   colours moving left / right / up / down), trained as the demo is (skipped when its checkpoint exists).
2. Subject: a **cross** (a plus sign, 5x5 pixels at 8x8; the base's shapes are ~2x2 blobs), 4 still images, one per
   colour at 4 positions, captioned "a <colour> *" (+ masks/: the cross's bounding box, used with
   ``--masked-loss``). Step 1 learns the word "*" (textual inversion, initialised from "square"; the only trainable
   tensor), step 2 the identity adapters with that word frozen.
3. Motion: **down-right** (the diagonal), 4 videos of demo shapes (other shapes than the subject) moving corner to
   corner, captioned "a <colour> <shape> moving" (no direction word); the motion adapters with appearance guidance
   (CLIP embedding of a random frame; tiny random-init CLIP tower) over the base.
4. Evaluation, for held-out prompts "a <colour> * moving" (the subject never moved in training, the motion videos
   never showed it) x seeds: the motion pipeline with the subject's adapters and word added
   (``VideoPipeline.add_adapters``), appearance image = the subject image of that colour; the same prompts from the
   base alone, the subject alone and the motion alone (the last with held-out demo-shape prompts).
   * subject score: the normalised correlation (over the 8x8 frame) of a frame's foreground map with the best-placed
     cross template; "shows the subject" when, in at least half the frames, the cross template correlates better
     than every placement of the base's circle / square / triangle;
   * direction: the centroid track's first-to-last displacement, classified into 8 directions by its angle
     (< 0.5 px: still); accuracy = the share moving down-right;
   * colour: the nearest demo colour of the foreground's mean colour.

    python benchmarks/dreamvideo_toy.py [--seeds 8] [--masked-loss] [--log-dir outputs/dreamvideo_toy]

Training runs ``python -m vgen.train`` (each run resumes with ``resume=auto``) and a run is skipped when its final
checkpoint exists. The DreamVideo recipes (``experiment=dreamvideo_*``) are full-size; here they run with the base's
own networks and diffusion (pixel space, tiny text/image towers, cosine v-prediction with the demo's timestep shift,
the demo's null text), 8x8 frames and larger learning rates. Targets: subject score clearly above the base's;
direction accuracy >= 75% composed, the base not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vgen.data.synthetic import ATTRIBUTES, BACKGROUND, COLORS, EXTENT, centroids, render_frame
from vgen.data.transforms import resize_center_crop
from vgen.media import to_uint8_frames, write_mp4

DATA = Path("data/dreamvideo_toy")
SIZE = 64  # rendered size (as the demo shards); training and sampling at 8x8
BLOCK = SIZE // 8  # one pixel at 8x8
COLOR_NAMES = ATTRIBUTES["color"]
# the subject: one cross per colour, at 4 positions (centres in 8x8 pixels)
SUBJECT_AT = {"red": (2, 3), "green": (5, 2), "blue": (3, 5), "yellow": (4, 4)}
# the motion videos: demo shapes (other than the subject), moving down-right corner to corner
MOTION_CLIPS = (("red", "circle"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle"))
MOTION_HELD_OUT = (("green", "circle"), ("blue", "triangle"), ("red", "square"), ("yellow", "triangle"))
FRAMES, FPS = 16, 8  # motion videos: 16 frames at 8 fps (as the demo shards); training samples 4 at stride 4
TARGET = "down-right"
DIRECTIONS8 = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")  # y points down
MIN_SHIFT = 0.5  # pixels of 8: less is "still"


# ---------------------------------------------------------------------------------------------- data
def render_cross(color: str, center: tuple[float, float], size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: a plus sign, arms 2.5 pixels of 8 from the centre, 1 pixel of 8 thick."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = np.abs(xs - center[0]), np.abs(ys - center[1])
    arm, half = 2.5 * size / 8, 0.5 * size / 8
    mask = ((dx <= half) & (dy <= arm)) | ((dy <= half) & (dx <= arm))
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    image[mask] = COLORS[color]
    return image


def diagonal_clip(color: str, shape: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [FRAMES, SIZE, SIZE, 3]: a demo shape moving down-right from near the top-left corner to near the
    bottom-right one (the demo's radius range, a random start/end jitter)."""
    radius = rng.uniform(0.10, 0.15) * SIZE
    low, high = EXTENT * radius, SIZE - EXTENT * radius
    start = low + rng.uniform(0, 2, size=2)
    end = high - rng.uniform(0, 2, size=2)
    return np.stack([render_frame(color, shape, tuple(start + (end - start) * t / (FRAMES - 1)), radius, SIZE)
                     for t in range(FRAMES)])


def make_data() -> tuple[Path, Path]:
    subject, motion = DATA / "subject", DATA / "motion"
    if (subject / "masks").is_dir() and len(list(motion.glob("*.mp4"))) == len(MOTION_CLIPS):
        return subject, motion
    (subject / "masks").mkdir(parents=True, exist_ok=True)
    motion.mkdir(parents=True, exist_ok=True)
    for color, (cx, cy) in SUBJECT_AT.items():
        centre = ((cx + 0.5) * BLOCK, (cy + 0.5) * BLOCK)
        Image.fromarray(render_cross(color, centre)).save(subject / f"{color}.png")
        (subject / f"{color}.txt").write_text(f"a {color} *\n")
        mask = np.zeros((SIZE, SIZE), np.uint8)  # the cross's bounding box (5x5 pixels of 8)
        mask[(cy - 2) * BLOCK:(cy + 3) * BLOCK, (cx - 2) * BLOCK:(cx + 3) * BLOCK] = 255
        Image.fromarray(mask).save(subject / "masks" / f"{color}.png")
    rng = np.random.default_rng(0)
    for i, (color, shape) in enumerate(MOTION_CLIPS):
        write_mp4(diagonal_clip(color, shape, rng), motion / f"clip{i}.mp4", fps=FPS)
        (motion / f"clip{i}.txt").write_text(f"a {color} {shape} moving\n")
    return subject, motion


# ---------------------------------------------------------------------------------------------- training
def run(args, name: str, steps: int, overrides: list[str]) -> Path:
    checkpoint = Path(args.log_dir) / name / "checkpoints" / f"step{steps:07d}.ckpt"
    if checkpoint.exists():
        return checkpoint
    overrides = [*overrides, f"name={name}", f"paths.log_dir={args.log_dir}", f"trainer.max_steps={steps}",
                 "callbacks.sample_videos.every_n_steps=100000", "logger=csv", "resume=auto"]
    print("python -m vgen.train " + " ".join(overrides), flush=True)
    subprocess.run([sys.executable, "-m", "vgen.train", *overrides], check=True,
                   env={**os.environ, "WANDB_MODE": "offline"})
    return checkpoint


def customisation_overrides(args, base: Path, root: Path, steps: int) -> list[str]:
    """A DreamVideo recipe on the demo base: its networks, diffusion and null text; 8x8 frames; CPU."""
    return ["model/unet=demo", "model/vae=identity", "model.vae.weights=null", "model/text_encoder=tiny",
            "model.text_encoder.weights=null", "model.text_encoder.max_length=8", "diffusion=cosine_v_ztsnr",
            "diffusion.timestep_shift=2.0", "diffusion.guidance_scale=3.0", "diffusion.ddim_steps=25",
            "stage.conditioning.negative_prompt=null", f"stage.init.path={base}", "strategy=auto",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
            f"callbacks.checkpoint.every_n_train_steps={steps}", "callbacks.sample_videos.height=8",
            "callbacks.sample_videos.width=8", "callbacks.sample_videos.num_frames=4", f"data.root={root}",
            "data.resolution=[8,8]", "data.batch_size=4", "data.num_workers=0"]


def train_all(args) -> dict[str, Path]:
    subject, motion = make_data()
    base = run(args, "base", args.base_steps, ["experiment=demo"])
    masked = [f"stage.masked_loss={str(args.masked_loss).lower()}"]
    step1 = run(args, "subject_step1", args.word_steps, [
        "experiment=dreamvideo_subject_step1", *customisation_overrides(args, base, subject, args.word_steps),
        "data.num_frames=1", "stage.placeholder.init_word=square", f"optim.lr={args.word_lr}", *masked])
    step2 = run(args, "subject_step2", args.subject_steps, [
        "experiment=dreamvideo_subject_step2", *customisation_overrides(args, base, subject, args.subject_steps),
        "data.num_frames=1", "stage.placeholder.init_word=square", f"stage.placeholder.path={step1}",
        f"optim.lr={args.adapter_lr}", *masked])
    motion_run = run(args, "motion", args.motion_steps, [
        "experiment=dreamvideo_motion", *customisation_overrides(args, base, motion, args.motion_steps),
        "+model/condition@model.unet.conditions.appearance=appearance_image",
        "+model/condition@model.unet.conditions.appearance_strength=appearance_strength",
        "model.unet.conditions.appearance.dropout=0.5", "model/image_encoder=tiny", "model.image_encoder.weights=null",
        "model.unet.image_dim=32", "data.num_frames=4", "data.sample_fps=2", f"optim.lr={args.adapter_lr}"])
    return {"base": base, "step1": step1, "step2": step2, "motion": motion_run}


# ---------------------------------------------------------------------------------------------- measures
def foreground_map(frames: np.ndarray) -> np.ndarray:
    """[F, H, W] in [0, 1]: each pixel's largest channel difference from the frame's median colour."""
    frames = np.asarray(frames, dtype=np.float32)
    background = np.median(frames.reshape(len(frames), -1, 3), axis=1)
    return np.abs(frames - background[:, None, None, :]).max(axis=-1) / 255.0


def _at_8x8(image: np.ndarray) -> np.ndarray:
    return to_uint8_frames(resize_center_crop(np.array(image[None]), 8, 8))  # as the loader sees a 64x64 frame


def _normalised(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 1e-8)


def templates() -> dict[str, np.ndarray]:
    """Normalised 8x8 foreground maps [N, 64] of every placement (half-pixel grid) of the cross and of the base's
    shapes (circle / square / triangle at the demo's mid radius), rendered and downsampled as the training data."""
    out = {}
    grid = np.arange(2.5, 5.51, 0.5) * BLOCK  # the cross whole in the frame
    out["cross"] = _normalised(np.stack([foreground_map(_at_8x8(render_cross("red", (x, y))))[0]
                                         for x in grid for y in grid]))
    radius = 0.125 * SIZE
    grid = np.arange(1.0, 7.01, 0.5) * BLOCK
    for shape in ATTRIBUTES["shape"]:
        out[shape] = _normalised(np.stack([foreground_map(_at_8x8(render_frame("red", shape, (x, y), radius,
                                                                                SIZE)))[0]
                                           for x in grid for y in grid]))
    return out


def subject_scores(frames: np.ndarray, bank: dict[str, np.ndarray]) -> tuple[float, bool]:
    """(mean over frames of the best cross correlation, whether the cross beats every other shape in >= half the
    frames)."""
    maps = _normalised(foreground_map(frames))
    best = {name: (maps @ t.T).max(axis=1) for name, t in bank.items()}
    others = np.max([v for k, v in best.items() if k != "cross"], axis=0)
    wins = (best["cross"] > others) & (np.linalg.norm(maps, axis=1) > 0)
    return float(best["cross"].mean()), bool(wins.mean() >= 0.5)


def direction8(frames: np.ndarray) -> str:
    """The first-to-last displacement of the foreground centroid as one of 8 directions (or "still" / "none")."""
    track = centroids(frames)
    track = track[~np.isnan(track).any(axis=1)]
    if len(track) < 2:
        return "none"
    dx, dy = track[-1] - track[0]
    if np.hypot(dx, dy) < MIN_SHIFT:
        return "still"
    return DIRECTIONS8[int(np.round(np.arctan2(dy, dx) / (np.pi / 4))) % 8]


def colour_of(frames: np.ndarray) -> str:
    """The demo colour whose direction from the background is nearest (cosine) to the foreground's mean colour's."""
    frames = np.asarray(frames, dtype=np.float32)
    background = np.median(frames.reshape(len(frames), -1, 3), axis=1)
    foreground = np.abs(frames - background[:, None, None, :]).max(axis=-1) > 48
    if not foreground.any():
        return "none"
    shift = frames[foreground].mean(axis=0) - np.asarray(BACKGROUND, np.float32)
    cosine = {}
    for name, value in COLORS.items():
        direction = np.subtract(value, BACKGROUND)
        cosine[name] = shift @ direction / np.linalg.norm(direction)
    return max(cosine, key=cosine.get)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def appearance(pipe, images: list[np.ndarray]) -> torch.Tensor:
    """The image encoder's embeddings [B, 1, D] of 64x64 uint8 reference images, seen at 8x8 (as in training)."""
    video = torch.stack([resize_center_crop(np.array(image[None]), 8, 8)[:, 0] for image in images]).to(pipe.device)
    return pipe.image_encoder(video).reshape(len(images), 1, -1)


@torch.no_grad()
def evaluate(pipe, prompts: list[str], colours: list[str], seeds: int, steps: int, bank, conditions=None) -> dict:
    rows = []
    for seed in range(seeds):
        videos = pipe(prompts, num_frames=4, steps=steps, seed=3000 + seed, conditions=conditions)
        for video, colour in zip(videos, colours):
            frames = to_uint8_frames(video)
            score, shown = subject_scores(frames, bank)
            rows.append({"score": score, "shown": shown, "direction": direction8(frames),
                         "colour": colour_of(frames) == colour})
    directions = [r["direction"] for r in rows]
    return {"videos": len(rows), "score": float(np.mean([r["score"] for r in rows])),
            "shown": float(np.mean([r["shown"] for r in rows])),
            "diagonal": float(np.mean([d == TARGET for d in directions])),
            "colour": float(np.mean([r["colour"] for r in rows])),
            "directions": {d: directions.count(d) for d in sorted(set(directions))}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=800, help="base (demo) training steps")
    parser.add_argument("--word-steps", type=int, default=400, help="subject step 1 (textual inversion) steps")
    parser.add_argument("--subject-steps", type=int, default=1000, help="subject step 2 (identity adapter) steps")
    parser.add_argument("--motion-steps", type=int, default=1000, help="motion adapter steps")
    parser.add_argument("--word-lr", type=float, default=2e-3, help="textual inversion LR (step 1)")
    parser.add_argument("--adapter-lr", type=float, default=1e-3, help="identity and motion adapter LR")
    parser.add_argument("--masked-loss", action=argparse.BooleanOptionalAction, default=False,
                        help="subject-masked loss in steps 1 and 2 (masks: the cross's bounding box; off: the "
                             "adapter then leaves the background outside the box unconstrained, noisier samples)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (4 prompts each)")
    parser.add_argument("--ddim-steps", type=int, default=25, help="DDIM steps (CFG 3, as the demo)")
    parser.add_argument("--log-dir", default="outputs/dreamvideo_toy", help="where the runs live")
    args = parser.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    runs = train_all(args)
    from vgen.pipeline import VideoPipeline

    bank = templates()
    subject_images = {c: np.asarray(Image.open(DATA / "subject" / f"{c}.png").convert("RGB")) for c in COLOR_NAMES}
    prompts = [f"a {c} * moving" for c in COLOR_NAMES]
    colours = list(COLOR_NAMES)
    results = {}
    base = VideoPipeline.from_checkpoint(runs["base"])
    results["base"] = evaluate(base, prompts, colours, args.seeds, args.ddim_steps, bank)
    subject_only = VideoPipeline.from_checkpoint(runs["step2"])
    results["subject only (step 1 + 2)"] = evaluate(subject_only, prompts, colours, args.seeds, args.ddim_steps, bank)
    motion_only = VideoPipeline.from_checkpoint(runs["motion"])
    held_out = [f"a {c} {s} moving" for c, s in MOTION_HELD_OUT]
    stills = [render_frame(c, s, (SIZE / 2, SIZE / 2), 0.125 * SIZE, SIZE) for c, s in MOTION_HELD_OUT]
    results["motion only (demo shapes)"] = evaluate(motion_only, held_out, [c for c, _ in MOTION_HELD_OUT],
                                                    args.seeds, args.ddim_steps, bank,
                                                    {"appearance": appearance(motion_only, stills)})
    composed = VideoPipeline.from_checkpoint(runs["motion"])
    composed.add_adapters(runs["step2"])
    results["composed (motion + subject)"] = evaluate(
        composed, prompts, colours, args.seeds, args.ddim_steps, bank,
        {"appearance": appearance(composed, [subject_images[c] for c in COLOR_NAMES])})
    print(f"checkpoints: {', '.join(str(p) for p in runs.values())}")
    print(f"prompts: {prompts} (motion only: {held_out}) x {args.seeds} seeds, {args.ddim_steps} DDIM steps, the "
          "runs' CFG (3)")
    print("model | videos | subject score (cross NCC) | shows the subject | down-right | colour | directions")
    for name, r in results.items():
        print(f"{name} | {r['videos']} | {r['score']:.3f} | {r['shown']:.1%} | {r['diagonal']:.1%} | "
              f"{r['colour']:.1%} | {r['directions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
