"""Sampling entry point: write an H.264 mp4 from a training checkpoint.

    python -m vgen.sample checkpoint=<ckpt> prompt="a red circle moving left" [image=<png/jpg>] \
        [num_frames=8] [height=32] [width=32] [steps=50] [guidance=9.0] [seed=0] [fps=8] [ema=true] \
        [negative_prompt="..."] [upscale=1] [refiner=<ckpt> refine_height=720 refine_width=1280 ...] out=<file.mp4>

Defaults for size, frames, fps, steps and guidance come from the checkpoint's training config (the VGen recipes:
50 DDIM steps, guidance 9). DDIM with classifier-free guidance against the negative prompt (and a zero image
embedding for image-to-video models). ``refiner=`` runs the result through a refinement-model checkpoint
(``experiment=i2vgen_refine``): resized to its resolution, noised to its noise level, denoised with the prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image

from vgen.checkpoint.export import load_unet_weights
from vgen.media import to_uint8_frames, write_mp4

OPTIONS = {
    "checkpoint": "training checkpoint to sample from: a .ckpt file or a sharded (DeepSpeed/FSDP2) directory (required)",
    "prompt": "text prompt (required)",
    "out": "output mp4 path (required)",
    "image": "first-frame image (png/jpg) for image-to-video models",
    "num_frames": "frames to generate",
    "height": "pixel height",
    "width": "pixel width",
    "steps": "sampler steps (DDIM; LCM: 1-8, default 4)",
    "sampler": "ddim (CFG) | lcm (consistency-distilled checkpoints: multistep LCM, no CFG; their default)",
    "guidance": "classifier-free guidance scale",
    "seed": "noise seed",
    "fps": "fps of the mp4 (and the fps condition of fps-conditioned models)",
    "ema": "use the EMA weights (true/false)",
    "negative_prompt": "unconditional prompt for CFG (default: the training negative prompt)",
    "upscale": "integer factor to enlarge the written frames, nearest neighbour (default 1); for viewing tiny demo videos",
    "refiner": "refinement-model checkpoint (experiment=i2vgen_refine) to cascade the video through",
    "refine_height": "refined pixel height (default: the refiner's training height)",
    "refine_width": "refined pixel width (default: the refiner's training width)",
    "refine_steps": "refinement DDIM steps (default: the refiner's diffusion.ddim_steps)",
    "refine_noise_levels": "noise levels of the refinement (default: the refiner's stage.noise_levels, 700)",
    "refine_prompt": "the refiner's text (default: prompt)",
}
REQUIRED = ("checkpoint", "prompt", "out")


class UsageError(ValueError):
    pass


def parse_args(argv: list[str]) -> dict[str, str]:
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"expected key=value, got {item!r}; keys: {', '.join(OPTIONS)}")
        if key not in OPTIONS:
            raise UsageError(f"unknown key {key!r}; valid keys: {', '.join(OPTIONS)}")
        args[key] = value
    missing = [k for k in REQUIRED if k not in args]
    if missing:
        raise UsageError(f"missing required {', '.join(missing)}; usage: python -m vgen.sample "
                         "checkpoint=<ckpt> prompt=\"...\" out=<file.mp4> [key=value ...]")
    return args


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """Image file -> [1, 3, H, W] in [-1, 1]: resize the short side to fit, then centre crop."""
    if not Path(path).is_file():
        raise UsageError(f"image={path}: no such file")
    image = Image.open(path).convert("RGB")
    scale = max(width / image.width, height / image.height)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    array = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise UsageError(f"expected true/false, got {value!r}")


def load_stage(checkpoint: str | Path, ema: bool | None = None):
    """Rebuild the training stage of a vgen checkpoint (UNet weights loaded; EMA weights by default when saved).

    ``checkpoint`` is a ``.ckpt`` file or a sharded DeepSpeed / FSDP2 checkpoint directory, consolidated in this
    process by the loader of ``vgen.checkpoint export``. Returns ``(stage, config)``; the frozen encoders come
    from the config (their own weights files).
    """
    try:
        weights, meta = load_unet_weights(checkpoint, ema=ema is not False)
    except KeyError:  # no EMA weights saved (stage.ema.enabled=false)
        if ema:
            raise
        weights, meta = load_unet_weights(checkpoint, ema=False)
    cfg = meta.get("vgen_config")
    if cfg is None:
        raise UsageError(f"{checkpoint} has no vgen_config (not written by vgen.train)")
    stage = instantiate(cfg["stage"])
    stage.unet.load_state_dict(weights, strict=True)
    return stage.eval(), cfg


def sample(args: dict[str, str]) -> Path:
    upscale = _positive_int(args.get("upscale", "1"), "upscale")
    if upscale > 64:
        raise UsageError(f"upscale={upscale}: at most 64 (nearest-neighbour enlargement for viewing)")
    stage, cfg = load_stage(args["checkpoint"], _bool(args["ema"]) if "ema" in args else None)
    data, shown = cfg.get("data", {}), cfg.get("callbacks", {}).get("sample_videos") or {}
    width, height = (data.get("resolution") or [shown.get("width", 32), shown.get("height", 32)])
    height, width = int(args.get("height", height)), int(args.get("width", width))
    num_frames = int(args.get("num_frames", data.get("num_frames", 8)))
    fps = int(args.get("fps", data.get("sample_fps", 8)))
    images = load_image(args["image"], height, width) if "image" in args else None
    if stage.image_conditioned and images is None:
        raise UsageError("this checkpoint is an image-to-video model: pass image=<png/jpg>")
    samplers = getattr(stage, "SAMPLERS", ("ddim",))
    sampler = args.get("sampler", samplers[0])
    if sampler not in samplers:
        raise UsageError(f"sampler={sampler} is not available for this checkpoint ({type(stage).__name__}); "
                         f"valid choices: {', '.join(samplers)}")
    if sampler == "lcm" and "guidance" in args:
        raise UsageError("guidance does not apply to sampler=lcm (consistency sampling uses no CFG)")
    extra = {"sampler": sampler} if "sampler" in args else {}
    video = stage.generate([args["prompt"]], num_frames=num_frames, height=height, width=width, **extra,
                           steps=int(args["steps"]) if "steps" in args else None,
                           guidance=float(args["guidance"]) if "guidance" in args else None,
                           seed=int(args.get("seed", 0)), negative_prompt=args.get("negative_prompt"),
                           images=images, fps=fps)
    if "refiner" in args:
        video = refine(video, args)
    return write_mp4(upscale_frames(to_uint8_frames(video[0]), upscale), args["out"], fps=fps)


def upscale_frames(frames: np.ndarray, factor: int) -> np.ndarray:
    """[F, H, W, C] -> [F, H * factor, W * factor, C]: each pixel becomes a ``factor`` x ``factor`` block."""
    return frames.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else frames


def _positive_int(value: str, key: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"{key}={value}: expected a positive integer")
    return number


def refine(video: torch.Tensor, args: dict[str, str]) -> torch.Tensor:
    """The cascade's second stage: ``video`` through the refinement model of ``args["refiner"]``."""
    refiner, cfg = load_stage(args["refiner"], _bool(args["ema"]) if "ema" in args else None)
    if not hasattr(refiner, "refine"):
        raise UsageError(f"refiner={args['refiner']} is a {type(refiner).__name__} checkpoint, not a refinement model "
                         "(train one with experiment=i2vgen_refine)")
    width, height = cfg.get("data", {}).get("resolution") or video.shape[-1:-3:-1]
    steps = args.get("refine_steps", cfg.get("diffusion", {}).get("ddim_steps", 30))
    return refiner.refine(video, [args.get("refine_prompt", args["prompt"])],
                          height=int(args.get("refine_height", height)), width=int(args.get("refine_width", width)),
                          steps=int(steps), noise_levels=int(args["refine_noise_levels"])
                          if "refine_noise_levels" in args else None,
                          negative_prompt=args.get("negative_prompt"), seed=int(args.get("seed", 0)))


def main(argv: list[str] | None = None) -> int:
    try:
        path = sample(parse_args(sys.argv[1:] if argv is None else argv))
    except (UsageError, FileNotFoundError, KeyError) as err:
        print(f"vgen.sample: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
