"""Does the demo model follow the prompt's motion? Sample held-out prompt combinations (never in the training
shards) and check with a centroid tracker whether the shape moves in the prompted direction.

    python benchmarks/demo_quality.py [--checkpoint outputs/demo/checkpoints/<newest>] [--seeds 4]

Prints the direction accuracy on the held-out prompts (target >= 75%; chance 25%) and, for reference, on as
many training prompts. Sampling and scoring are ``vgen.eval``'s (the ``direction`` metric), so
``python -m vgen.eval checkpoint=<same> prompts=<these prompts, one a line> metrics=[direction] seeds=4 seed=1000
steps=25 out=<dir>`` reports the same number.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from vgen.data.synthetic import HELD_OUT, TRAINING_COMBOS, caption
from vgen.eval import evaluate_pipeline
from vgen.pipeline import VideoPipeline
from vgen.training.checkpointing import find_resume_checkpoint

FIRST_SEED = 1000


def accuracy(pipe, combos, seeds: int, steps: int, guidance: float) -> tuple[float, list[dict]]:
    """Direction accuracy over ``combos`` x ``seeds`` videos (seeds 1000, 1001, ...) and each video's row."""
    report = evaluate_pipeline(pipe, [caption(*c) for c in combos], ["direction"], seeds=seeds, seed=FIRST_SEED,
                               steps=steps, guidance=guidance)
    return report.metrics["direction"], report.rows


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
        acc, rows = accuracy(pipe, combos, args.seeds, args.steps, guidance)
        print(f"{name}: direction accuracy {acc:.1%} over {len(rows)} videos (chance 25%)")
        if args.verbose:
            for row in rows:
                print(f"  {row['prompt']!r} seed {row['seed']}: {'moves' if row['direction'] else 'does not move'} "
                      "the prompted way")
    return 0


if __name__ == "__main__":
    sys.exit(main())
