"""UNet3D training-step cost on CPU: fwd+bwd wall time and peak activation memory, with and without activation
checkpointing, and SDPA vs naive attention.

Each configuration runs in its own fresh subprocess, so peak memory is that process's peak RSS (VmHWM, reset
just before the measured steps) minus its RSS after the model, optimizer-free inputs and one warm-up step.
Ratios are printed relative to the SDPA / no-checkpointing baseline of the same run.

    python benchmarks/activation_memory.py [--width 64] [--frames 8] [--size 32] [--batch 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = [  # (attention backend, gradient checkpointing)
    ("sdpa", False),
    ("sdpa", True),
    ("naive", False),
    ("naive", True),
]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args) -> dict:
    import torch

    from vgen.models import UNet3D, set_attention_backend

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    set_attention_backend(args.attention)
    model = UNet3D(model_channels=args.width, channel_mult=(1, 2, 4, 4), num_res_blocks=2, head_dim=args.width,
                   init_temporal_heads=2, gradient_checkpointing=args.checkpointing)
    x = torch.randn(args.batch, 4, args.frames, args.size, args.size)
    t = torch.randint(0, 1000, (args.batch,))
    text = torch.randn(args.batch, 77, 1024)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x, t, text=text).square().mean()
        loss.backward()

    step()  # warm-up: allocates gradients, primes kernels
    model.zero_grad(set_to_none=False)  # keep grad buffers allocated so only activations differ
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"attention": args.attention, "checkpointing": args.checkpointing, "params": params,
            "step_s": statistics.median(times), "peak_activation_mib": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="measured fwd+bwd steps (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attention", default="sdpa", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    common = [f"--width={args.width}", f"--frames={args.frames}", f"--size={args.size}", f"--batch={args.batch}",
              f"--steps={args.steps}", f"--threads={args.threads}"]
    rows = []
    for attention, ckpt in CONFIGS:
        cmd = [sys.executable, __file__, "--worker", f"--attention={attention}", *common]
        if ckpt:
            cmd.append("--checkpointing")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"UNet3D width {args.width}, mult (1,2,4,4), 2 res blocks, {rows[0]['params'] / 1e6:.1f}M params; "
          f"batch {args.batch} x {args.frames} frames x {args.size}x{args.size} latent, 77 text tokens; "
          f"{args.threads} threads, median of {args.steps} steps")
    print("| attention | activation checkpointing | fwd+bwd (s) | vs baseline | peak activation memory (MiB) | vs baseline |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['attention']} | {'on' if r['checkpointing'] else 'off'} | {r['step_s']:.2f} | "
              f"{r['step_s'] / base['step_s']:.2f}x | {r['peak_activation_mib']:.0f} | "
              f"{r['peak_activation_mib'] / base['peak_activation_mib']:.2f}x |")


if __name__ == "__main__":
    main()
