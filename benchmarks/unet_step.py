"""UNet3D training step (fwd + bwd + AdamW) and inference: vgen's fast path against the reference op order.

The "reference" configuration mirrors the original VGen computation: temporal convolutions as ``Conv3d``, the
temporal transformers' projections as 1x1 ``Conv1d``, the caption context repeated for every frame (K/V projected
per frame), SDPA attention with the CUDA batch chunking, AdamW's per-parameter loop, eager mode. "fast" is vgen's
default (every switch of :mod:`vgen.models.fastpath`) plus a fused AdamW and ``torch.compile`` of every block
(``--no-compile`` leaves it out). Both run the *same* UNet object (same weights), one step each per round,
interleaved, in this one process; outputs are compared first (eval mode, max abs difference).

``--ablation`` adds, at the first width, one configuration per idea: the reference plus that idea alone, and
the fast path without compilation. ``--profile`` prints the top operators of one reference and one fast step.

    python benchmarks/unet_step.py [--widths 32 64] [--rounds 5] [--ablation] [--profile]
    python benchmarks/unet_step.py --widths 32 --batch 1 --frames 2 --size 8 --rounds 1 --no-compile  # smoke
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from bench_cli import parser as one_line_parser

from vgen.models import UNet3D
from vgen.models.fastpath import NAMES, fast_paths, reference_order


@dataclass
class Config:
    name: str
    flags: dict = field(default_factory=dict)  # fast paths on (the others off)
    optimizer: str = "loop"  # AdamW implementation: loop | foreach | fused
    compiled: bool = False
    step_s: list = field(default_factory=list)
    infer_s: list = field(default_factory=list)


def build(width: int, args) -> tuple[UNet3D, tuple]:
    """The T2V layout at ``width``: mult [1, 2, 2], 2 ResBlocks a level, attention at 1/2 and 1/4, 8 initial
    temporal heads (8 x 32 wide), head_dim 32, 1024-wide text context (encoder and decoder)."""
    torch.manual_seed(0)
    model = UNet3D(model_channels=width, channel_mult=(1, 2, 2), num_res_blocks=2, attention_scales=(0.5, 0.25),
                   head_dim=32, init_temporal_heads=8, context_dim=1024, decoder_context_dim=1024)
    for p in model.parameters():  # non-zero everywhere (zero-initialised output layers would hide differences)
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.frames, args.size, args.size, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    text = torch.randn(args.batch, 77, 1024, generator=g)
    target = torch.randn(x.shape, generator=g)
    return model, (x, t, text, target)


def optimizer(model: UNet3D, kind: str) -> torch.optim.Optimizer:
    options = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-6, **options)


class Compiled:
    """``torch.compile`` of every block (static shapes), switchable on and off on the same modules."""

    def __init__(self, model: UNet3D):
        from vgen.training.parallelize import compile_blocks, unet_blocks

        self.blocks = unet_blocks(model)
        compile_blocks(model)
        self.impls = [b._compiled_call_impl for b in self.blocks]
        self.set(False)

    def set(self, on: bool) -> None:
        for block, impl in zip(self.blocks, self.impls):
            block._compiled_call_impl = impl if on else None


def run_step(model, batch, opt) -> None:
    x, t, text, target = batch
    opt.zero_grad(set_to_none=True)
    loss = (model(x, t, text=text) - target).square().mean()
    loss.backward()
    opt.step()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def configure(cfg: Config, compiled: Compiled | None):
    if compiled is not None:
        compiled.set(cfg.compiled)
    return fast_paths(**{name: cfg.flags.get(name, False) for name in NAMES})


def profile_table(model, batch, opt, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(model, batch, opt)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def measure(width: int, args, ablation: bool) -> None:
    model, batch = build(width, args)
    params = sum(p.numel() for p in model.parameters())
    everything = dict.fromkeys(NAMES, True)
    fast_opt = args.fast_optimizer
    configs = [Config("reference op order (original)"),
               Config("fast" + ("" if args.no_compile else " + compile"), everything, fast_opt, not args.no_compile)]
    if ablation:
        configs += [Config(f"reference + {name}", {name: True}) for name in NAMES]
        configs.append(Config(f"reference + {fast_opt} AdamW", {}, fast_opt))
        if not args.no_compile:
            configs.append(Config("fast, eager (no compile)", everything, fast_opt))
    # outputs agree (eval mode: no dropout)
    model.eval()
    with torch.no_grad(), reference_order():
        reference = model(*batch[:2], text=batch[2])
    with torch.no_grad():
        fast = model(*batch[:2], text=batch[2])
    diff = (fast - reference).abs().max().item()
    scale = reference.abs().max().item()
    compiled = Compiled(model) if any(c.compiled for c in configs) else None
    optimizers = {c.optimizer: optimizer(model, c.optimizer) for c in configs}
    model.train()
    compile_s = None
    for cfg in configs:  # warm-up: first-touch allocations; compilation for the compiled configuration
        with configure(cfg, compiled):
            seconds = timed(lambda opt=optimizers[cfg.optimizer]: run_step(model, batch, opt))
            if cfg.compiled:
                model.eval()
                with torch.no_grad():
                    seconds += timed(lambda: model(*batch[:2], text=batch[2]))
                model.train()
                compile_s = seconds
    for _ in range(args.rounds):
        for cfg in configs:
            with configure(cfg, compiled):
                model.train()
                cfg.step_s.append(timed(lambda opt=optimizers[cfg.optimizer]: run_step(model, batch, opt)))
                model.eval()
                with torch.no_grad():
                    cfg.infer_s.append(timed(lambda: model(*batch[:2], text=batch[2])))
    model.train()
    ref_step, ref_infer = statistics.median(configs[0].step_s), statistics.median(configs[0].infer_s)
    print(f"\n### width {width}: {params / 1e6:.2f}M parameters; batch {args.batch} x {args.frames} frames x "
          f"{args.size}x{args.size} latent, 77x1024 text, fp32, {torch.get_num_threads()} threads; median of "
          f"{args.rounds} interleaved rounds\n")
    print(f"outputs, fast vs reference (eval mode): max |difference| {diff:.2e} (max |output| {scale:.2e})")
    if compile_s is not None:
        print(f"one-time torch.compile cost (first fast step + first inference): {compile_s:.1f} s")
    print("\n| configuration | AdamW | train step (s) | vs reference | inference (s) | vs reference |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for cfg in configs:
        step, infer = statistics.median(cfg.step_s), statistics.median(cfg.infer_s)
        print(f"| {cfg.name} | {cfg.optimizer} | {step:.2f} | {step / ref_step:.2f}x | {infer:.2f} | "
              f"{infer / ref_infer:.2f}x |")
    if args.profile:
        for cfg in configs[:2]:
            with configure(cfg, compiled):
                print(f"\nprofile of one {cfg.name} step (top operators by self CPU time):\n```")
                print(profile_table(model, batch, optimizers[cfg.optimizer], args.profile_rows))
                print("```")


def main() -> None:
    parser = one_line_parser(__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64], help="model_channels to measure")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast-optimizer", default="fused", choices=("loop", "foreach", "fused"))
    parser.add_argument("--no-compile", action="store_true", help="the fast path without torch.compile")
    parser.add_argument("--ablation", action="store_true", help="one configuration per idea (first width only)")
    parser.add_argument("--profile", action="store_true", help="operator profiles of a reference and a fast step")
    parser.add_argument("--profile-rows", type=int, default=12)
    args = parser.parse_args()
    if args.rounds < 1 or args.batch < 1 or args.frames < 1 or args.size < 4 or args.threads < 1:
        parser.error("--rounds, --batch, --frames, --threads must be >= 1 and --size >= 4")
    torch.set_num_threads(args.threads)
    for i, width in enumerate(args.widths):
        measure(width, args, args.ablation and i == 0)


if __name__ == "__main__":
    main()
