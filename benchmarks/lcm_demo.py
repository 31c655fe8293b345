"""VideoLCM quality proof on the direction-following demo teacher, by distribution distance and direction accuracy.

1. Distil the demo teacher (``experiment=demo``, 8x8 pixels, 4 frames, 800 steps, EMA weights) with
   ``experiment=videolcm_distill`` at the demo's size: the student starts from the teacher's weights, N=50 DDIM
   solver, teacher guidance w = 2 (CFG 3, the demo's scale). Skipped when the final checkpoint exists; resumes.
2. Sample every sampler over the same prompt set -- the demo's 4 held-out combinations plus 12 training ones
   (``vgen.data.synthetic.HELD_OUT`` / ``TRAINING_COMBOS``) -- with ``--seeds`` seeds each (one x_T per video).
   The reference is the teacher's DDIM-50 (CFG 3) on seeds 1000, 1001, ...; every compared set, including a
   second teacher DDIM-50 set (the metric's noise floor), uses other seeds (2000, 2001, ...), so no set shares
   noise with the reference and only the distributions are compared.
3. Distances to the reference set:
   * ``FD-rp32``: Fréchet distance (``vgen.eval.frechet_distance_of_features``) on a fixed feature map -- each video
     [3, 4, 8, 8] in [-1, 1] flattened (768 values) and projected by a fixed Gaussian random matrix (torch seed 0,
     entries N(0, 1/768)) to 32 dimensions;
   * ``SW``: sliced Wasserstein-2 (squared) on the flattened pixels, 512 fixed random directions (seed 1), equal
     set sizes (sorted projections matched).
   and direction accuracy by ``vgen.eval``'s ``direction`` metric (centroid tracker), all videos and held-out only.

DDIM grids: ``--ddim-spacing trailing`` (default) runs the teacher's DDIM on 999, 979, ..., 19 for 50 steps -- the
exact solver grid the student is distilled on -- and 999, 749, 499, 249 for 4 steps, starting where LCM-4 (999, 759,
499, 259) starts; ``leading`` is VGen's grid (981, ..., 1; 751, 501, 251, 1). Both DDIM-4 grids are always shown.

    python benchmarks/lcm_demo.py [--teacher outputs/dreamvideo_toy/base/checkpoints/step0000800.ckpt]
        [--distill-steps 800] [--seeds 8] [--student-step N] [--student-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from vgen.data.synthetic import HELD_OUT, TRAINING_COMBOS, caption
from vgen.eval import Extractors, build_metrics, frechet_distance_of_features
from vgen.media import to_uint8_frames

TEACHER = "outputs/dreamvideo_toy/base/checkpoints/step0000800.ckpt"
GUIDANCE_W = 2.0  # teacher CFG scale 1 + w = 3, the demo's
REFERENCE_SEED, SAMPLE_SEED = 1000, 2000
SHAPE = {"num_frames": 4, "height": 8, "width": 8}


def distill_command(args) -> list[str]:
    """``experiment=videolcm_distill`` at the demo teacher's size (its UNet, encoders, schedule and data)."""
    return ["experiment=videolcm_distill", f"name={args.name}", f"paths.log_dir={args.log_dir}",
            "model/unet=demo", "model/vae=identity", "model/text_encoder=tiny", "diffusion=cosine_v_ztsnr",
            "~model.vae.weights", "model.text_encoder.weights=null", "model.text_encoder.max_length=8",
            "data=demo", "data.resolution=[8,8]", "data.num_frames=4", "data.sample_fps=2",
            "data.sources.0.weight=1.0", "data.sources.1.weight=0", "data.batch_size=16", "data.num_workers=0",
            "logger=csv", "strategy=auto", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
            f"trainer.max_steps={args.distill_steps}", "trainer.log_every_n_steps=10", f"optim.lr={args.distill_lr}",
            "optim.warmup_steps=10", "stage.gradient_checkpointing=false", "stage.conditioning.spatial_grad_scale=1.0",
            f"stage.distill.guidance={GUIDANCE_W}", "stage.distill.solver_steps=50",
            f"stage.teacher.checkpoint={args.teacher}", f"diffusion.guidance_scale={1 + GUIDANCE_W:g}",
            "callbacks.checkpoint.every_n_train_steps=100", "callbacks.checkpoint.save_top_k=20",
            "callbacks.sample_videos.every_n_steps=100000",
            "callbacks.sample_videos.height=8", "callbacks.sample_videos.width=8",
            "callbacks.sample_videos.num_frames=4", "resume=auto"]


def prompts() -> tuple[list[str], list[bool]]:
    """The demo's 4 held-out combinations and 12 training ones (fixed draw); a held-out flag per prompt."""
    training = random.Random(0).sample(TRAINING_COMBOS, 12)
    return [caption(*c) for c in (*HELD_OUT, *training)], [True] * len(HELD_OUT) + [False] * len(training)


def sample_set(pipe, texts: list[str], seeds: int, first_seed: int, **kwargs) -> torch.Tensor:
    """[len(texts) * seeds, 3, F, H, W] in [-1, 1]: one pipeline call per seed over all prompts."""
    return torch.cat([pipe(texts, seed=first_seed + s, **SHAPE, **kwargs).clamp(-1, 1) for s in range(seeds)])


def projection(dim: int, out: int, seed: int) -> torch.Tensor:
    return torch.randn(dim, out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / dim**0.5


def frechet_rp(a: torch.Tensor, b: torch.Tensor, dims: int = 32) -> float:
    p = projection(a[0].numel(), dims, 0)
    return frechet_distance_of_features((a.flatten(1).double() @ p).numpy(), (b.flatten(1).double() @ p).numpy())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 512) -> float:
    p = torch.randn(a[0].numel(), directions, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = p / p.norm(dim=0, keepdim=True)
    pa, pb = (a.flatten(1).double() @ p).sort(0).values, (b.flatten(1).double() @ p).sort(0).values
    return (pa - pb).square().mean().item()


def direction(videos: torch.Tensor, texts: list[str], held_out: list[bool]) -> tuple[float, float]:
    """vgen.eval's ``direction`` metric: accuracy over all videos and over the held-out prompts' videos."""
    metric = build_metrics(["direction"], Extractors())[0]
    reps = len(videos) // len(texts)
    scores = np.asarray(metric([to_uint8_frames(v) for v in videos], texts * reps), dtype=np.float64)
    mask = np.asarray(held_out * reps)
    return scores.mean().item(), scores[mask].mean().item()


@torch.no_grad()
def evaluate(teacher_ckpt: str, student_ckpt: Path, seeds: int, spacing: str, student_only: bool = False
             ) -> list[dict]:
    from vgen.pipeline import VideoPipeline

    torch.manual_seed(0)
    teacher = VideoPipeline.from_checkpoint(teacher_ckpt, ema=True)  # the EMA weights the student starts from
    student = VideoPipeline.from_checkpoint(student_ckpt, ema=False)
    distilled = {k: v.clone() for k, v in student.unet.state_dict().items()}
    teacher_weights = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    base = teacher.diffusion
    texts, held_out = prompts()
    cfg = 1 + GUIDANCE_W

    def ddim(steps: int, grid: str, first_seed: int = SAMPLE_SEED) -> torch.Tensor:
        teacher.diffusion = dataclasses.replace(base, ddim_spacing=grid)
        return sample_set(teacher, texts, seeds, first_seed, steps=steps, guidance=cfg)

    def lcm(weights: dict, steps: int, eta: float) -> torch.Tensor:
        student.unet.load_state_dict(weights, strict=True)
        return sample_set(student, texts, seeds, SAMPLE_SEED, sampler="lcm", steps=steps, eta=eta)

    reference = ddim(50, spacing, REFERENCE_SEED)
    runs = {} if student_only else {
        (f"teacher DDIM-50 ({spacing}), other seeds: the metric's noise floor", 100): ddim(50, spacing),
        ("teacher DDIM-4, trailing grid 999, 749, 499, 249", 8): ddim(4, "trailing"),
        ("teacher DDIM-4, leading (VGen) grid 751, 501, 251, 1", 8): ddim(4, "leading"),
        ("teacher DDIM-8, trailing grid", 16): ddim(8, "trailing"),
    }
    runs.update({
        ("**student LCM-4** (eta=1, LCM's sampler)", 4): lcm(distilled, 4, 1.0),
        ("student LCM-4, eta=0", 4): lcm(distilled, 4, 0.0),
        ("student LCM-2 (eta=1)", 2): lcm(distilled, 2, 1.0),
        ("student LCM-1", 1): lcm(distilled, 1, 1.0),
    })
    if not student_only:
        runs[("teacher weights (no distillation), LCM-4 (eta=1)", 4)] = lcm(teacher_weights, 4, 1.0)
        runs[("teacher weights (no distillation), LCM-4, eta=0", 4)] = lcm(teacher_weights, 4, 0.0)
    table = [{"name": f"teacher DDIM-50 ({spacing}), CFG {cfg:g}: the reference", "calls": 100,
              "fd": 0.0, "sw": 0.0, "acc": direction(reference, texts, held_out)}]
    for (name, calls), videos in runs.items():
        table.append({"name": name, "calls": calls, "fd": frechet_rp(videos, reference),
                      "sw": sliced_wasserstein(videos, reference), "acc": direction(videos, texts, held_out)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=TEACHER, help="the demo teacher's checkpoint (read only)")
    parser.add_argument("--distill-steps", type=int, default=800)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (16 prompts: 8 give 128 videos a set)")
    parser.add_argument("--ddim-spacing", default="trailing", choices=("trailing", "leading"),
                        help="grid of the DDIM-50 reference (trailing = the distillation's solver grid)")
    parser.add_argument("--log-dir", default="outputs/lcm_demo")
    parser.add_argument("--name", default="student")
    parser.add_argument("--student-step", type=int, help="evaluate this checkpoint step (default: the last)")
    parser.add_argument("--student-only", action="store_true",
                        help="only the reference and the student's rows (the teacher rows do not change with the step)")
    args = parser.parse_args()

    student = Path(args.log_dir) / args.name / "checkpoints" / f"step{args.distill_steps:07d}.ckpt"
    if not student.exists():
        overrides = distill_command(args)
        print("python -m vgen.train " + " ".join(overrides), flush=True)
        subprocess.run([sys.executable, "-m", "vgen.train", *overrides], check=True,
                       env={**os.environ, "WANDB_MODE": "offline"})
    if args.student_step is not None:
        student = student.with_name(f"step{args.student_step:07d}.ckpt")
    texts, _ = prompts()
    print(f"teacher {args.teacher}\nstudent {student}\n{len(texts)} prompts x {args.seeds} seeds = "
          f"{len(texts) * args.seeds} videos per set\n")
    print("| sampler | UNet calls | FD-rp32 to DDIM-50 | SW (pixels) | direction, all | direction, held-out |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in evaluate(args.teacher, student, args.seeds, args.ddim_spacing, args.student_only):
        acc, held = row["acc"]
        print(f"| {row['name']} | {row['calls']} | {row['fd']:.4f} | {row['sw']:.5f} | {acc:.1%} | {held:.1%} |",
              flush=True)


if __name__ == "__main__":
    main()
