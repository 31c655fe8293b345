"""Does the demo model follow the prompt's motion? Sample held-out prompt combinations (never in the training
shards) and check with a centroid tracker whether the shape moves in the prompted direction.

    python benchmarks/demo_quality.py [--checkpoint outputs/demo/checkpoints/<newest>] [--seeds 4]

Prints the direction accuracy on the held-out prompts (target >= 75%; chance 25%) and, for reference, on as
many training prompts.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from vgen.data.synthetic import HELD_OUT, TRAINING_COMBOS, caption, centroid_track
from vgen.media import to_uint8_frames
from vgen.pipeline import VideoPipeline
from vgen.training.checkpointing import find_resume_checkpoint


def accuracy(pipe, combos, seeds: int, size: int, frames: int, steps: int, guidance: float, batch: int = 8):
    prompts = [(caption(*c), c[2], seed) for c in combos for seed in range(seeds)]
    hits, results = 0, []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        videos = []
        for seed in sorted({s for _, _, s in chunk}):
            items = [p for p in chunk if p[2] == seed]
            out = pipe([p for p, _, _ in items], num_frames=frames, height=size, width=size, steps=steps,
                       guidance=guidance, seed=1000 + seed)
            videos += list(zip(items, out))
        for (prompt, want, seed), video in videos:
            got = centroid_track(to_uint8_frames(video))
            hits += got == want
            results.append((prompt, seed, want, got))
    return hits / len(prompts), results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="training checkpoint (default: newest in outputs/demo/checkpoints)")
    parser.add_argument("--seeds", type=int, default=4, help="noise seeds per prompt (>= 4 gives >= 16 videos)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the run's)")
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every video's result")
    args = parser.parse_args()
    checkpoint = args.checkpoint or find_resume_checkpoint(Path("outputs/demo/checkpoints"))
    if checkpoint is None:
        print("no checkpoint: run `make demo` (or python -m vgen.train experiment=demo) first", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    pipe = VideoPipeline.from_checkpoint(checkpoint, ema=False if args.raw else None)
    size, frames = pipe.defaults["height"], pipe.defaults["num_frames"]
    guidance = args.guidance if args.guidance is not None else pipe.diffusion.guidance_scale
    train_combos = random.Random(0).sample(TRAINING_COMBOS, len(HELD_OUT))
    print(f"checkpoint {checkpoint}: {frames} frames {size}x{size}, DDIM {args.steps} steps, CFG {guidance}, "
          f"{'raw' if args.raw else 'EMA'} weights")
    for name, combos in (("held-out prompts", HELD_OUT), ("training prompts", train_combos)):
        acc, results = accuracy(pipe, combos, args.seeds, size, frames, args.steps, guidance)
        print(f"{name}: direction accuracy {acc:.1%} over {len(results)} videos (chance 25%)")
        if args.verbose:
            for prompt, seed, want, got in results:
                print(f"  {prompt!r} seed {seed}: tracked {got}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
