"""Sampling cost at equal model: LCM (4 steps, no CFG) vs DDIM (50 steps, classifier-free guidance).

One UNet3D, one batch of noise, one run of each sampler (after a one-pass warm-up); the ratio is DDIM time / LCM
time of the same run. The UNet calls are counted too: DDIM-50 with CFG makes 100 (cond + uncond per step, or
50 doubled-batch calls with ``--batch-cfg``), LCM-4 makes 4.

    python benchmarks/sampling.py [--width 64] [--frames 8] [--size 32] [--batch 1] [--device cpu]
    python benchmarks/sampling.py --checkpoint <vgen .ckpt>      # that checkpoint's UNet and diffusion config
"""

from __future__ import annotations

import argparse
import time

import torch


def build(args):
    from hydra.utils import instantiate

    from vgen.diffusion import build_diffusion
    from vgen.models import UNet3D

    if args.checkpoint:
        from vgen.checkpoint.export import load_training_checkpoint, unet_weights

        ckpt = load_training_checkpoint(args.checkpoint)
        cfg = ckpt["vgen_config"]
        unet = instantiate(cfg["model"]["unet"])
        unet.load_state_dict(unet_weights(ckpt), strict=True)
        return unet, instantiate(cfg["diffusion"]).param, cfg["model"]["unet"]["context_dim"]
    torch.manual_seed(0)
    unet = UNet3D(model_channels=args.width, channel_mult=(1, 2, 4, 4), num_res_blocks=2, head_dim=args.width,
                  init_temporal_heads=2, dropout=0.0)
    return unet, build_diffusion("linear_sd", zero_terminal_snr=True, prediction="v").param, 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a vgen training checkpoint (default: a random UNet3D of --width)")
    parser.add_argument("--width", type=int, default=64, help="model_channels of the random UNet3D")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--lcm-steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=9.0, help="DDIM CFG scale")
    parser.add_argument("--batch-cfg", action="store_true", help="DDIM: cond + uncond as one doubled batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()

    from vgen.diffusion import ddim_sample, lcm_sample

    torch.set_num_threads(args.threads)
    unet, param, context_dim = build(args)
    unet = unet.to(args.device).eval()
    channels = unet.config.in_channels
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(args.batch, channels, args.frames, args.size, args.size, generator=g).to(args.device)
    cond = {"text": torch.randn(args.batch, 77, context_dim, generator=g).to(args.device)}
    uncond = {"text": torch.randn(args.batch, 77, context_dim, generator=g).to(args.device)}
    calls = [0]

    def model(x, t, **kwargs):
        calls[0] += 1
        return unet(x, t, **kwargs)

    def timed(fn):
        calls[0] = 0
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, calls[0]

    with torch.inference_mode():
        model(x_T, torch.full((args.batch,), 999, device=args.device), **cond)  # warm-up
        lcm = timed(lambda: lcm_sample(model, x_T, param, args.lcm_steps, cond=cond))
        ddim = timed(lambda: ddim_sample(model, x_T, param, args.ddim_steps, cond=cond, uncond=uncond,
                                         guidance_scale=args.guidance, batch_cfg=args.batch_cfg))
    params = sum(p.numel() for p in unet.parameters())
    print(f"device {args.device}; UNet3D {params / 1e6:.1f}M params; batch {args.batch} x {channels} x "
          f"{args.frames} x {args.size} x {args.size}")
    print("| sampler | UNet calls | wall time (s) | vs LCM |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| LCM-{args.lcm_steps}, no CFG | {lcm[1]} | {lcm[0]:.2f} | 1.00x |")
    print(f"| DDIM-{args.ddim_steps}, CFG {args.guidance:g}{' (batched)' if args.batch_cfg else ''} | {ddim[1]} | "
          f"{ddim[0]:.2f} | {ddim[0] / lcm[0]:.1f}x |")


if __name__ == "__main__":
    main()
