"""UNet3D training-step throughput for GPU runs: samples/s, TFLOPS, MFU and peak memory per configuration.

For the full T2V or I2VGen-XL UNet (``conf/model/unet/t2v.yaml`` / ``i2vgen_xl.yaml``) at 448x256 pixels (a
56x32 latent) x 16 frames by default. Every combination of ``--strategies`` (``single``: the bare module; ``ddp``;
``fsdp2``: vgen's block-wise ``fully_shard``), ``--attention`` (``sdpa`` / ``xformers``), ``--precision``
(``bf16-mixed`` / ``32-true``) and ``--compile`` (``off`` / ``on``: ``torch.compile`` per block) is measured in
turn: ``--warmup`` untimed steps (compilation happens there), then ``--steps`` timed ones (fwd + bwd + AdamW,
synchronised). FLOPs are counted once per model shape with ``torch.utils.flop_counter`` (fwd + bwd of the eager
model: matmuls, convolutions, attention); TFLOPS = FLOPs / median step time per device; MFU = TFLOPS / the
device's dense peak for the precision (a table of known GPUs, or ``--peak-tflops``). Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak RSS growth on CPU.

Multi-GPU: ``torchrun --nproc-per-node 8 benchmarks/gpu_step.py ...`` (samples/s then counts every rank).
A configuration that fails (out of memory, xformers missing) is reported as such and the others still run.

    python benchmarks/gpu_step.py                      # full T2V, every combination, on cuda
    python benchmarks/gpu_step.py --model i2vgen_xl --strategies fsdp2 --precision bf16-mixed --compile on
    python benchmarks/gpu_step.py --tiny --device cpu --steps 1 --warmup 1   # the CPU smoke run of the tests
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_cli import parser as one_line_parser

REPO = Path(__file__).resolve().parents[1]
# Dense peak TFLOPS (no sparsity) by device-name substring: (bf16/fp16, fp32 matmuls as TF32).
PEAK_TFLOPS = {"H200": (989.4, 494.7), "H100": (989.4, 494.7), "A100": (312.0, 156.0), "L40S": (362.1, 183.2),
               "A10G": (70.0, 35.0), "RTX 4090": (165.2, 82.6), "V100": (125.0, 15.7)}
TINY = {"t2v": "t2v_tiny", "i2vgen_xl": "i2vgen_xl_tiny"}


def build_unet(model: str, tiny: bool):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model/unet={TINY[model] if tiny else model}"])
    return instantiate(cfg.model.unet)


def example_inputs(unet, batch: int, frames: int, height: int, width: int, device) -> tuple:
    """Noisy latent, timesteps and every condition's example value at latent size ``height`` x ``width``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, unet.config.in_channels, frames, height, width, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    conditions = {}
    for name, cond in unet.conditions.items():
        value = cond.example(batch, frames, height, width)
        if value is not None:
            conditions[name] = value.to(device)
    return x.to(device), t.to(device), conditions


def peak_tflops(device: torch.device, precision: str, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, single) in PEAK_TFLOPS.items():
        if key in name:
            return half if precision == "bf16-mixed" else single
    return None


def count_flops(unet, inputs, precision: str, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x, t, conditions = inputs
    with FlopCounterMode(display=False) as counter, autocast(device, precision):
        unet(x, t, conditions).float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def autocast(device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wrap(unet, strategy: str, precision: str, device):
    import torch.distributed as dist

    if strategy == "single":
        return unet
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        from vgen.training.parallelize import shard_unet

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        return shard_unet(unet, mesh, precision=precision)
    raise ValueError(f"unknown strategy {strategy!r}")


def measure(args, strategy: str, attention: str, precision: str, compiled: bool, device, flops_cache: dict) -> dict:
    import torch.distributed as dist

    from vgen.models import set_attention_backend
    from vgen.training.parallelize import compile_blocks

    row = {"model": args.model + (" (tiny)" if args.tiny else ""), "strategy": strategy, "attention": attention,
           "precision": precision, "compile": compiled, "world": dist.get_world_size()}
    if attention == "xformers":
        from vgen.models.attention import _xformers_ops

        if device.type != "cuda" or _xformers_ops() is None:
            return {**row, "error": "xformers unavailable (needs CUDA and the xformers extra)"}
    set_attention_backend(attention)
    torch.manual_seed(0)
    unet = build_unet(args.model, args.tiny).to(device)
    unet.set_gradient_checkpointing(args.checkpointing)
    inputs = example_inputs(unet, args.batch, args.frames, args.latent_height, args.latent_width, device)
    key = (precision,)
    if key not in flops_cache:
        flops_cache[key] = count_flops(unet, inputs, precision, device)
    if compiled:
        compile_blocks(unet)
    model = wrap(unet, strategy, precision if strategy == "fsdp2" else "32-true", device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6, fused=device.type == "cuda" or None)
    x, t, conditions = inputs
    cast = precision if strategy != "fsdp2" else "32-true"  # FSDP2 computes in bf16 through its own policy

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, cast):
            loss = model(x, t, conditions).float().square().mean()
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    row["warmup_s"] = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_memory_gib"] = peak_gib
        row["model_state_gib"] = base / 2**30
    else:
        row["peak_memory_gib"] = (rss_kib("VmHWM") - base) / 2**20
    tflops = flops_cache[key] / step_s / 1e12
    peak = peak_tflops(device, precision, args.peak_tflops)
    row.update(step_s=step_s, samples_per_s=args.batch * dist.get_world_size() / step_s, tflops_per_device=tflops,
               mfu=tflops / peak if peak else None, params=sum(p.numel() for p in unet.parameters()))
    return row


def main() -> int:
    parser = one_line_parser(__doc__)
    parser.add_argument("--model", default="t2v", choices=sorted(TINY))
    parser.add_argument("--tiny", action="store_true", help="the *_tiny UNet of the same layout (CPU smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--batch", type=int, default=2, help="clips per device")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=256, help="pixel height (latent = /8)")
    parser.add_argument("--width", type=int, default=448, help="pixel width (latent = /8)")
    parser.add_argument("--strategies", nargs="+", default=["single", "ddp", "fsdp2"],
                        choices=("single", "ddp", "fsdp2"))
    parser.add_argument("--attention", nargs="+", default=["sdpa", "xformers"], choices=("sdpa", "xformers"))
    parser.add_argument("--precision", nargs="+", default=["bf16-mixed", "32-true"], choices=("bf16-mixed", "32-true"))
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOPS for MFU (default: known GPUs)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON lines here (must not exist)")
    args = parser.parse_args()
    problems = [f"--{k} must be >= 1" for k in ("batch", "frames", "steps", "warmup") if getattr(args, k) < 1]
    if args.height % 8 or args.width % 8 or args.height < 8 or args.width < 8:
        problems.append("--height and --width must be positive multiples of 8 (the VAE's factor)")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device here (use --device cpu)")
    if args.out is not None and args.out.exists():
        problems.append(f"--out {args.out} exists: not overwritten")
    if problems:
        print(f"gpu_step: {problems[0]}", file=sys.stderr)
        return 2
    args.latent_height, args.latent_width = args.height // 8, args.width // 8

    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # one process: a world of 1 (DDP and FSDP2 still need a process group)
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"),
                              RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rows, flops = [], {}
    for strategy, attention, precision, compiled in itertools.product(args.strategies, args.attention,
                                                                      args.precision, args.compile):
        try:
            row = measure(args, strategy, attention, precision, compiled == "on", device, flops)
        except torch.OutOfMemoryError:
            row = {"strategy": strategy, "attention": attention, "precision": precision, "compile": compiled == "on",
                   "error": "out of memory"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    if dist.get_rank() == 0:
        report(args, rows, device)
        if args.out is not None:
            args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dist.destroy_process_group()
    return 0


def report(args, rows: list[dict], device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model}{' (tiny)' if args.tiny else ''} UNet3D, {args.batch} clips/device x {args.frames} frames x "
          f"{args.width}x{args.height} px (latent {args.latent_width}x{args.latent_height}), {name}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print("| strategy | attention | precision | compile | step (s) | samples/s | TFLOPS/device | MFU | peak memory (GiB) |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        head = f"| {r['strategy']} | {r['attention']} | {r['precision']} | {'on' if r['compile'] else 'off'} |"
        if "error" in r:
            print(f"{head} {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{head} {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {r['tflops_per_device']:.3f} | {mfu} | "
              f"{r['peak_memory_gib']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
