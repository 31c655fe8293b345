"""Toy proof of reward fine-tuning (InstructVideo procedure) on the CPU demo model.

A trained demo checkpoint is the base; rank-4 LoRA adapters on every attention are tuned with the partial guided
DDIM chain (tau 0.6 of a 20-step grid; gradients through the last ``--grad-steps`` K steps, InstructVideo: 1) on
the demo training clips, towards a toy differentiable reward: the redness of the frames
(``vgen.rewards.ColorReward([1, 0, 0])``), scored on 4 segments with TAR weights. At step 0 and every
``--eval-every`` steps, videos are generated from pure noise (DDIM, CFG) for the held-out prompt combinations and
as many training prompts, and measured:

* mean redness of all frames (the reward: it should rise),
* motion-direction accuracy of the centroid tracker (``benchmarks/demo_quality.py``) and the share of videos in
  which it still finds a shape (they should not collapse),
* the diffusion loss at fixed timesteps and noise on 16 demo clips set aside before fine-tuning (is the model
  still a denoiser of the data? Over-optimisation shows here first).

    python benchmarks/reward_toy.py --checkpoint outputs/demo/checkpoints/step0000500.ckpt \
        [--steps 20 --eval-every 5 --lr 1e-2 --grad-steps 4]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from vgen.checkpoint.export import load_training_checkpoint
from vgen.data.synthetic import HELD_OUT, TRAINING_COMBOS, caption
from vgen.eval.toy import direction, shape_found
from vgen.media import to_uint8_frames
from vgen.models.lora import LoRA, save_lora
from vgen.pipeline import VideoPipeline
from vgen.rewards import ColorReward
from vgen.stages.reward import RewardFinetuneStage


def evaluate(stage, combos, seeds: int, size: int, frames: int, steps: int, guidance: float):
    """Over ``combos`` x ``seeds`` generated videos: (mean redness of all frames, direction accuracy, share of
    videos in which the tracker still finds a shape in at least two frames)."""
    redness, hits, found, count = [], 0, 0, 0
    reward = ColorReward([1.0, 0.0, 0.0])
    for seed in range(seeds):
        prompts = [caption(*c) for c in combos]
        videos = VideoPipeline.from_stage(stage)(prompts, num_frames=frames, height=size, width=size, steps=steps,
                                                 guidance=guidance, seed=1000 + seed)  # [B, 3, F, H, W] in [-1, 1]
        pixels = ((videos + 1) / 2).clamp(0, 1)
        redness.append(reward(pixels.transpose(1, 2).flatten(0, 1), [""] * pixels.shape[0] * frames).mean())
        for combo, video in zip(combos, videos):
            uint8 = to_uint8_frames(video)
            hits += direction(uint8, caption(*combo))
            found += shape_found(uint8)
            count += 1
    return torch.stack(redness).mean().item(), hits / count, found / count


@torch.no_grad()
def denoising_loss(stage, batches) -> float:
    """Mean diffusion loss of ``stage.unet`` on ``batches`` at fixed timesteps and noise (no CFG dropout)."""
    losses = []
    for i, batch in enumerate(batches):
        latents = stage.encode_video(batch["video"])
        g = torch.Generator().manual_seed(i)
        t = torch.linspace(50, 950, latents.shape[0]).long()
        noise = torch.randn(latents.shape, generator=g)
        losses.append(stage.diffusion.loss(stage.unet, latents, {"text": stage.encode_text(batch["caption"])},
                                           t=t, noise=noise).mean())
    return torch.stack(losses).mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="trained demo checkpoint (vgen .ckpt): the base model")
    parser.add_argument("--steps", type=int, default=60, help="reward fine-tuning steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW LR of the adapters")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per step")
    parser.add_argument("--grad-steps", type=int, default=1, help="K: backpropagate through the last K DDIM steps")
    parser.add_argument("--kl-weight", type=float, default=0.0, help="regulariser towards the base prediction")
    parser.add_argument("--eval-every", type=int, default=10, help="evaluate every N fine-tuning steps")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per evaluation prompt")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the evaluation videos")
    parser.add_argument("--out", default="outputs/reward_toy", help="where the LoRA file goes")
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        print(f"no such checkpoint: {args.checkpoint} (train the demo first: make demo)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cfg = load_training_checkpoint(args.checkpoint)["vgen_config"]
    data_cfg = dict(cfg["data"], batch_size=args.batch_size, num_workers=0)
    data_cfg["sources"] = [dict(s, weight=1.0 if s["type"] == "video" else 0.0) for s in cfg["data"]["sources"]]
    stage = RewardFinetuneStage(
        instantiate(cfg["model"]["unet"]), instantiate(cfg["diffusion"]), instantiate(cfg["model"]["vae"]),
        instantiate(cfg["model"]["text_encoder"]), ColorReward([1.0, 0.0, 0.0]),
        init={"path": args.checkpoint, "format": "vgen_ckpt"},  # the base: the demo's EMA weights
        adapters={"lora": LoRA(rank=4)},  # what trains
        tuning={"tau": 0.6, "ddim_steps": 20, "guidance": cfg["diffusion"]["guidance_scale"], "grad_steps": args.grad_steps,
                "segments": 4, "lambda_tar": 1.0, "kl_weight": args.kl_weight},
        optim={"lr": args.lr, "warmup_steps": 0, "weight_decay": 0.0},
        conditioning={"negative_prompt": cfg["stage"]["conditioning"]["negative_prompt"]},  # the base's uncond
    )
    size, frames = cfg["data"]["resolution"][1], cfg["data"]["num_frames"]
    guidance = cfg["diffusion"]["guidance_scale"]
    train_combos = random.Random(0).sample(TRAINING_COMBOS, len(HELD_OUT))
    trainable = sum(p.numel() for p in stage.unet.parameters() if p.requires_grad)
    print(f"base {args.checkpoint}: {frames} frames {size}x{size}; LoRA rank 4, {trainable} trainable parameters; "
          f"{args.steps} steps, lr {args.lr}, batch {args.batch_size}, K {args.grad_steps}, kl_weight {args.kl_weight}")

    datamodule = instantiate(data_cfg)
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    held_clips = [next(batches) for _ in range(-(-16 // args.batch_size))]  # never trained on

    rows = []

    def measure(step: int) -> None:
        stage.eval()
        tic = time.time()
        held = evaluate(stage, HELD_OUT, args.seeds, size, frames, args.sample_steps, guidance)
        seen = evaluate(stage, train_combos, args.seeds, size, frames, args.sample_steps, guidance)
        rows.append((step, held, seen, denoising_loss(stage, held_clips)))
        print(f"  evaluated step {step} in {time.time() - tic:.0f}s: {rows[-1]}", flush=True)
        stage.train()

    measure(0)
    optimizer = stage.configure_optimizers()["optimizer"]
    logged: dict[str, float] = {}
    stage.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    tuning_time, curve = 0.0, []
    for step in range(1, args.steps + 1):
        tic = time.time()
        loss = stage.compute_loss(next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tuning_time += time.time() - tic
        curve.append(logged["train/reward"])
        if step % args.eval_every == 0 or step == args.steps:
            recent = sum(curve[-10:]) / len(curve[-10:])
            print(f"  step {step}: training reward (SegVR, mean of last 10) {recent:.4f}, {tuning_time:.0f}s of tuning",
                  flush=True)
            measure(step)
    path = save_lora(stage.unet, Path(args.out) / "redness_lora.safetensors")

    n = len(HELD_OUT) * args.seeds
    print(f"\n{n} held-out and {n} training-prompt videos per row ({args.seeds} seeds), DDIM {args.sample_steps}, "
          f"CFG {guidance}; denoising loss on 16 held-back demo clips at fixed t and noise")
    print("| step | redness held-out | redness training | direction acc. held-out | direction acc. training "
          "| shape found | denoising loss |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for step, held, seen, loss in rows:
        print(f"| {step} | {held[0]:.4f} | {seen[0]:.4f} | {held[1]:.1%} | {seen[1]:.1%} | "
              f"{(held[2] + seen[2]) / 2:.1%} | {loss:.4f} |")
    print(f"\nLoRA written to {path}; fine-tuning took {tuning_time:.0f}s ({tuning_time / args.steps:.1f}s/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
