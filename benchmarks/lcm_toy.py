"""Toy proof of consistency distillation on the CPU demo data (the earlier, per-seed MSE version; superseded by
``benchmarks/lcm_demo.py``: the direction-following demo teacher, a distribution distance and direction accuracy,
DDIM on the trailing grid; see RESULTS.md).

1. Train a tiny pixel-space teacher on the synthetic moving-shape shards (``experiment=demo``, smaller UNet).
2. Distil it with ``experiment=videolcm_distill`` (teacher guidance w = 2, i.e. the demo's CFG scale 3).
3. From the same noise x_T, compare against the teacher's 50-step DDIM samples (CFG 3, the reference):
   the student's LCM samples (no CFG), the teacher's own few-step DDIM samples (CFG 3), and -- as the
   "no distillation" control -- the LCM sampler run with the teacher's weights. MSE in pixel space ([-1, 1]).
   LCM re-noises between steps: with trajectory noise (eta=0, deterministic in x_T) by default here, since a
   per-sample distance to the teacher's trajectory is measured; fresh noise (eta=1, diffusers' LCMScheduler)
   decorrelates the sample from x_T after the first step and is shown for reference.

Steps 1-2 run ``python -m vgen.train`` (each resumes with ``resume=auto`` if interrupted) and are skipped when
their final checkpoint exists; step 3 prints a markdown table.

    python benchmarks/lcm_toy.py [--teacher-steps 300] [--distill-steps 600] [--solver-steps 50] [--seeds 32] [--exact]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

import torch

PROMPTS = ["a red circle moving left", "a green square moving right", "a blue triangle moving down",
           "a yellow circle moving up"]
# The demo as it was when RESULTS.md's figures were measured (experiment=demo has since moved to 8x8 frames, short
# captions, FiLM/caption/frame embeddings, shifted timesteps and fixed-path shards; see its RESULTS section).
DEMO_V1 = ["data.resolution=[16,16]", "model.text_encoder.max_length=77", "model.unet.scale_shift_norm=false",
           "model.unet.text_embedding=false", "model.unet.frame_embedding=false", "trainer.gradient_clip_val=null",
           "callbacks.sample_videos.height=16", "callbacks.sample_videos.width=16"]
SMALL = [*DEMO_V1, "model.unet.channel_mult=[1,2]", "model.unet.attention_scales=[0.5]", "data.num_frames=4",
         "data.sample_fps=2", "data.sources.1.weight=0", "data.batch_size=4", "data.num_workers=0", "logger=csv",
         "callbacks.sample_videos.every_n_steps=100000", "callbacks.sample_videos.num_frames=4"]
GUIDANCE_W = 2.0  # teacher CFG scale 1 + w = 3, as the demo's validation samples


def teacher_command(args) -> list[str]:
    return ["experiment=demo", "name=lcm_teacher", f"paths.log_dir={args.log_dir}", *SMALL,
            "diffusion.timestep_shift=1.0",
            f"trainer.max_steps={args.teacher_steps}", "callbacks.checkpoint.every_n_train_steps=100", "resume=auto"]


def student_name(args) -> str:
    return args.name or f"lcm_student_n{args.solver_steps}"


def distill_command(args, teacher: Path) -> list[str]:
    return ["experiment=videolcm_distill", f"name={student_name(args)}", f"paths.log_dir={args.log_dir}",
            "model/unet=demo", "model/vae=identity", "model/text_encoder=tiny", "diffusion=cosine_v_ztsnr",
            "~model.vae.weights", "model.text_encoder.weights=null", "data=demo", "data.resolution=[16,16]", *SMALL, "strategy=auto", "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.precision=32-true", f"trainer.max_steps={args.distill_steps}", "trainer.log_every_n_steps=10",
            f"optim.lr={args.distill_lr}", "optim.warmup_steps=10", "stage.conditioning.spatial_grad_scale=1.0",
            f"stage.distill.guidance={GUIDANCE_W}", f"stage.distill.solver_steps={args.solver_steps}",
            f"stage.teacher.checkpoint={teacher}",
            "callbacks.checkpoint.every_n_train_steps=100", "callbacks.sample_videos.height=16",
            "callbacks.sample_videos.width=16", "resume=auto"]


def train(overrides: list[str], checkpoint: Path) -> Path:
    if not checkpoint.exists():  # a file, or a directory under a sharded strategy (the experiment's ZeRO-2)
        print("python -m vgen.train " + " ".join(overrides), flush=True)
        env = {**os.environ, "WANDB_MODE": "offline"}
        subprocess.run([sys.executable, "-m", "vgen.train", *overrides], check=True, env=env)
    return checkpoint


def _noise_and_conditions(stage, prompts: list[str], seed: int, shape: dict):
    """x_T as the pipeline (``stage``) draws it for ``seed``, and the (cond, uncond) UNet inputs."""
    b = len(prompts)
    generator = torch.Generator(device=stage.device).manual_seed(seed)
    x = stage.diffusion.noise((b, stage.vae.latent_channels, shape["num_frames"], shape["height"], shape["width"]),
                              generator=generator, device=stage.device)
    return x, {"text": stage.encode_text(prompts)}, {"text": stage.negative_embedding(b)}


def _solve(stage, x: torch.Tensor, grid: list[int], cond: dict, uncond: dict) -> torch.Tensor:
    """The teacher's deterministic DDIM with CFG (w = GUIDANCE_W) along ``grid`` (descending, ending at 0)."""
    from vgen.diffusion.lcm import ddim_solver_step

    b, param = x.shape[0], stage.diffusion.param
    for t, t_next in itertools.pairwise(grid):
        x = ddim_solver_step(stage.unet, param, x, torch.full((b,), t), torch.full((b,), t_next), cond, uncond,
                             guidance=GUIDANCE_W, batch_cfg=True)
    return x


def ddim_on_lcm_grid(stage, prompts: list[str], steps: int, seed: int, shape: dict) -> torch.Tensor:
    """The teacher's deterministic DDIM with CFG over the LCM grid (999, 759, 499, 259 -> 0 for 4 steps): the same
    x_T as the pipeline's for ``seed``, so a few-step baseline without the VGen grid's late start (t=751)."""
    from vgen.diffusion.lcm import lcm_timesteps

    x, cond, uncond = _noise_and_conditions(stage, prompts, seed, shape)
    grid = [*lcm_timesteps(stage.diffusion.param.num_timesteps, steps).tolist(), 0]
    return stage.vae.decode(_solve(stage, x, grid, cond, uncond)).clamp(-1, 1)


def exact_consistency_lcm(stage, prompts: list[str], steps_list: tuple[int, ...], seed: int, shape: dict,
                          solver_steps: int) -> dict[int, torch.Tensor]:
    """The deterministic (eta=0) LCM sampler driven by the *exact* consistency function of the distillation target:
    f(x, t) = the teacher's N-step solver (CFG) run from (x, t) down to 0 -- what a perfectly distilled student
    returns. Shows how far the multistep re-noising alone moves a sample off the x_T trajectory."""
    from vgen.diffusion import ddim_step
    from vgen.diffusion.lcm import lcm_timesteps, solver_timesteps

    param = stage.diffusion.param
    x_T, cond, uncond = _noise_and_conditions(stage, prompts, seed, shape)
    full = [*solver_timesteps(param.num_timesteps, solver_steps).flip(0).tolist(), 0]
    out = {}
    for steps in steps_list:
        timesteps, x = lcm_timesteps(param.num_timesteps, steps, solver_steps).tolist(), x_T
        for i, t in enumerate(timesteps):
            denoised = _solve(stage, x, full[full.index(t):], cond, uncond)
            if i + 1 < len(timesteps):  # eta = 0: re-noise with the trajectory's own noise, as lcm_sample
                alpha, sigma = param.schedule.scalings(torch.full((x.shape[0],), t), x)
                x = ddim_step(param, denoised, (x - alpha * denoised) / sigma, torch.full((x.shape[0],),
                                                                                          timesteps[i + 1]))
        out[steps] = stage.vae.decode(denoised).clamp(-1, 1)
    return out


@torch.no_grad()
def evaluate(teacher_ckpt: Path, student_ckpt: Path, seeds: int, batch: int,
             exact: bool = False) -> list[tuple[str, int, float, float]]:
    from vgen.pipeline import VideoPipeline

    def load(path: Path, ema: bool):  # a .ckpt file or a sharded checkpoint directory
        pipe = VideoPipeline.from_checkpoint(path, ema=ema)
        return pipe, {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    teacher, teacher_weights = load(teacher_ckpt, ema=True)  # the EMA weights the student was distilled from
    student, distilled = load(student_ckpt, ema=False)
    shape = {"num_frames": 4, "height": 16, "width": 16}
    rows: dict[str, list[torch.Tensor]] = {}
    for first in range(0, seeds, batch):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(first, first + batch)]
        seed = first // batch  # one noise draw per batch; every sample in it has its own x_T
        reference = teacher(prompts, steps=50, guidance=1 + GUIDANCE_W, seed=seed, **shape)
        runs = {(f"teacher DDIM-{n}, CFG {1 + GUIDANCE_W:g}", 2 * n): teacher(
            prompts, steps=n, guidance=1 + GUIDANCE_W, seed=seed, **shape) for n in (4, 8)}
        runs[(f"teacher DDIM-4 on the LCM grid, CFG {1 + GUIDANCE_W:g}", 8)] = ddim_on_lcm_grid(teacher, prompts, 4,
                                                                                               seed, shape)
        for label, weights in (("student", distilled), ("teacher weights (no distillation)", teacher_weights)):
            student.unet.load_state_dict(weights, strict=True)
            for n, eta in ((1, 0.0), (2, 0.0), (4, 0.0), (4, 1.0)):
                if n > 1 or label == "student":
                    name = f"{label}, LCM-{n}" + (", fresh noise (eta=1)" if eta else "")
                    runs[(name, n)] = student(prompts, sampler="lcm", steps=n, eta=eta, seed=seed, **shape)
        student.unet.load_state_dict(distilled, strict=True)
        if exact:
            solver_steps = student.lcm.solver_steps
            for n, video in exact_consistency_lcm(teacher, prompts, (2, 4), seed, shape, solver_steps).items():
                runs[(f"exact consistency function (teacher's N={solver_steps} solver from each point), LCM-{n}",
                      "-")] = video
        for key, video in runs.items():
            rows.setdefault(key, []).append((video - reference).square().flatten(1).mean(1))
    table = []
    for (name, calls), errors in rows.items():
        per_sample = torch.cat(errors)
        table.append((name, calls, per_sample.mean().item(), per_sample.std().item() / per_sample.numel() ** 0.5))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=600)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--solver-steps", type=int, default=50, help="N of the teacher's DDIM solver")
    parser.add_argument("--seeds", type=int, default=32, help="samples (independent x_T) in the comparison")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--log-dir", default="outputs")
    parser.add_argument("--name", help="student run name (default lcm_student_n<solver steps>)")
    parser.add_argument("--student-step", type=int, help="evaluate this checkpoint step (default: the last)")
    parser.add_argument("--exact", action="store_true",
                        help="also run the eta=0 LCM sampler on the exact consistency function (the teacher's solver "
                             "from every point; a perfectly distilled student), 2 and 4 steps")
    args = parser.parse_args()

    log_dir = Path(args.log_dir)
    teacher = train(teacher_command(args), log_dir / "lcm_teacher" / "checkpoints" /
                    f"step{args.teacher_steps:07d}.ckpt")
    student = train(distill_command(args, teacher), log_dir / student_name(args) / "checkpoints" /
                    f"step{args.distill_steps:07d}.ckpt")
    if args.student_step is not None:
        student = student.with_name(f"step{args.student_step:07d}.ckpt")
    print(f"teacher {teacher}\nstudent {student}\nMSE to the teacher's DDIM-50 (CFG {1 + GUIDANCE_W:g}) samples "
          f"from the same x_T, {args.seeds} samples (mean +- standard error):\n")
    print("| sampler | UNet calls | MSE vs teacher DDIM-50 |")
    print("| --- | ---: | ---: |")
    for name, calls, mse, err in evaluate(teacher, student, args.seeds, args.batch, args.exact):
        print(f"| {name} | {calls} | {mse:.4f} +- {err:.4f} |")


if __name__ == "__main__":
    main()
