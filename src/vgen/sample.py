"""Sampling entry point: write an H.264 mp4 from a training checkpoint of any stage.

    python -m vgen.sample checkpoint=<ckpt> prompt="a red circle moving left" [image=<png/jpg>] \
        [num_frames=8] [height=32] [width=32] [steps=50] [guidance=9.0] [seed=0] [fps=8] [ema=true] \
        [sampler=ddim|lcm] [negative_prompt="..."] [upscale=1] [overwrite=false] [condition.<name>=<value>] \
        [condition_video=<mp4> conditions=[depthmap,motion]] [motion_factor=500 appearance_factor=1.0] \
        [refiner=<ckpt> refine_height=720 refine_width=1280 ...] out=<file.mp4>
    python -m vgen.sample motion=<motion ckpt> subject=<step-2 ckpt> prompt="a * turning" \
        appearance_image=<png> [appearance_strength=1.0 appearance_strength_uncond=1.0] \
        [start_video=<mp4> inversion_strength=0.5] out=<file.mp4>        (DreamVideo)

The checkpoint is read by :class:`vgen.pipeline.VideoPipeline` (no training stage is built): size, frames, fps,
steps and guidance default to the training run's (the VGen recipes: 50 DDIM steps, guidance 9); a reward
fine-tuning checkpoint brings its adapters onto the base weights it names; a distilled one samples with LCM;
DreamVideo composes a motion checkpoint with subject checkpoints (their adapters and the learned word).
``refiner=`` runs the result through a refinement-model checkpoint (``experiment=i2vgen_refine``). Every bad
argument ends with one line on stderr naming it and a non-zero exit; an existing ``out`` file is never replaced
unless ``overwrite=true``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

OPTIONS = {
    "checkpoint": "training checkpoint to sample from: a .ckpt file or a sharded (DeepSpeed/FSDP2) directory (required)",
    "prompt": "text prompt (required)",
    "out": "output mp4 path (required; an existing file is refused unless overwrite=true)",
    "image": "first-frame image (png/jpg) for image-to-video models",
    "num_frames": "frames to generate",
    "height": "pixel height",
    "width": "pixel width",
    "steps": "sampler steps (DDIM; LCM: at most the distillation grid, default 4)",
    "sampler": "ddim (CFG) | lcm (consistency-distilled checkpoints: multistep LCM, no CFG; their default)",
    "guidance": "classifier-free guidance scale",
    "seed": "noise seed",
    "fps": "fps of the mp4 (and the fps condition of fps-conditioned models)",
    "ema": "use the EMA weights (true/false; default: EMA when saved)",
    "negative_prompt": "unconditional prompt for CFG (default: the training negative prompt)",
    "upscale": "integer factor to enlarge the written frames, nearest neighbour (default 1); for viewing tiny demo videos",
    "overwrite": "replace an existing out file (true/false, default false)",
    "refiner": "refinement-model checkpoint (experiment=i2vgen_refine) to cascade the video through",
    "refine_height": "refined pixel height (default: the refiner's training height)",
    "refine_width": "refined pixel width (default: the refiner's training width)",
    "refine_steps": "refinement DDIM steps (default: the refiner's diffusion.ddim_steps)",
    "refine_noise_levels": "noise levels of the refinement (default: the refiner's stage.noise_levels, 700)",
    "refine_prompt": "the refiner's text (default: prompt)",
    "condition.<name>": "a value for the model's condition <name>: a number, or comma-separated numbers (a vector)",
    "condition_video": "reference clip (mp4) whose condition maps (depth, motion, sketch, ...) steer the video",
    "motion_factor": "HiGen: motion intensity of every adjacent-frame pair (default 500, typical motion)",
    "appearance_factor": "HiGen: appearance change over the clip, 0 (none) to 1 (default)",
    "conditions": "which maps of condition_video, by name or kind, e.g. [depthmap,motion] (default: the run's)",
    "subject": "DreamVideo: subject checkpoint(s), comma-separated (step 2; or step 1 for the learned word alone)",
    "motion": "DreamVideo: motion-adapter checkpoint (experiment=dreamvideo_motion); the base the others compose on",
    "appearance_image": "DreamVideo motion: appearance reference image (png/jpg) for the motion adapters' guidance",
    "appearance_strength": "DreamVideo motion: strength of the appearance guidance in the conditional branch (default 1)",
    "appearance_strength_uncond": "DreamVideo motion: its strength in the unconditional branch (default: appearance_strength)",
    "start_video": "clip (mp4) whose DDIM inversion starts sampling, mixed by inversion_strength",
    "inversion_strength": "share of the start noise taken from start_video's DDIM inversion, in (0, 1] (default 0: off)",
}
REQUIRED = ("prompt", "out")  # and checkpoint, unless DreamVideo's subject= / motion= name the checkpoints
MAX_SIZE = 8192  # pixels per side
MAX_FRAMES = 4096


class UsageError(ValueError):
    pass


def key_values(argv: list[str], options, prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """``key=value`` arguments -> dict; a key must be one of ``options`` or start with one of ``prefixes``."""
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"expected key=value, got {item!r}; keys: {', '.join(options)}")
        if key not in options and not any(key.startswith(p) and key != p for p in prefixes):
            raise UsageError(f"unknown key {key!r}; valid keys: {', '.join(options)}")
        args[key] = value
    return args


def parse_args(argv: list[str]) -> dict[str, str]:
    args = key_values(argv, OPTIONS, prefixes=("condition.",))
    missing = [k for k in REQUIRED if k not in args]
    if not any(k in args for k in ("checkpoint", "subject", "motion")):
        missing.insert(0, "checkpoint")
    if missing:
        raise UsageError(f"missing required {', '.join(missing)}; usage: python -m vgen.sample "
                         "checkpoint=<ckpt> prompt=\"...\" out=<file.mp4> [key=value ...]")
    return args


def _number(args: dict[str, str], key: str, low, high, default=None, kind: type = int):
    """``args[key]`` as a ``kind`` (int or float) in [low, high] (``default`` when absent); NaN is refused."""
    if key not in args:
        return default
    value = args[key]
    expected = f"expected {'an integer' if kind is int else 'a number'} in [{low:g}, {high:g}]"
    try:
        number = kind(value)
    except ValueError:
        raise UsageError(f"{key}={value}: {expected}") from None
    if not low <= number <= high:  # also refuses nan
        raise UsageError(f"{key}={value}: {expected}")
    return number


def _int(args: dict[str, str], key: str, low: int, high: int, default: int | None = None) -> int | None:
    return _number(args, key, low, high, default, int)


def _float(args: dict[str, str], key: str, low: float, high: float) -> float | None:
    return _number(args, key, low, high, None, float)


def _bool(args: dict[str, str], key: str) -> bool | None:
    if key not in args:
        return None
    value = args[key].lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise UsageError(f"{key}={args[key]}: expected true or false")


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """Image file -> [1, 3, H, W] in [-1, 1]: resize the short side to fit, then centre crop."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"image={path}: no such file")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UsageError(f"image={path}: not a readable image ({type(err).__name__})") from None
    scale = max(width / image.width, height / image.height)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    array = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1


def check_output(path: str, overwrite: bool) -> Path:
    """The ``out`` path, refused before any work if it exists (unless ``overwrite``) or cannot be created."""
    out = Path(path)
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"out={path}: the output must be an .mp4 file")
    if out.is_dir():
        raise UsageError(f"out={path}: is a directory")
    if out.exists() and not overwrite:
        raise UsageError(f"out={path}: file exists (pass overwrite=true to replace it)")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"out={path}: {parent} is a file, not a directory")
    return out


def load_pipeline(checkpoint: str, ema: bool | None, key: str = "checkpoint"):
    from vgen.pipeline import PipelineError, VideoPipeline

    if not Path(checkpoint).exists():
        raise UsageError(f"{key}={checkpoint}: no such file or directory")
    try:
        return VideoPipeline.from_checkpoint(checkpoint, ema=ema)
    except PipelineError as err:
        raise UsageError(f"{key}={checkpoint}: {err}") from None


def sample(args: dict[str, str]) -> Path:
    from vgen.pipeline import PipelineError

    upscale = _int(args, "upscale", 1, 64, default=1)  # nearest-neighbour enlargement for viewing
    out = check_output(args["out"], bool(_bool(args, "overwrite")))
    num_frames = _int(args, "num_frames", 1, MAX_FRAMES)
    height, width = _int(args, "height", 1, MAX_SIZE), _int(args, "width", 1, MAX_SIZE)
    fps = _int(args, "fps", 1, 1000)
    seed = _int(args, "seed", 0, 2**63 - 1, default=0)
    guidance = _float(args, "guidance", 0.0, 1e4)
    ema = _bool(args, "ema")
    pipe = load_dreamvideo(args, ema) if ("subject" in args or "motion" in args) else load_pipeline(
        args["checkpoint"], ema)
    sampler = args.get("sampler", pipe.sampler)
    if sampler not in pipe.samplers:
        raise UsageError(f"sampler={sampler}: not available for this checkpoint; valid choices: "
                         f"{', '.join(pipe.samplers)}")
    if sampler == "lcm" and guidance is not None:
        raise UsageError("guidance does not apply to sampler=lcm (consistency sampling uses no CFG)")
    max_steps = (pipe.lcm.solver_steps if sampler == "lcm" else pipe.diffusion.param.num_timesteps)
    steps = _int(args, "steps", 1, max_steps)
    height, width = height or pipe.defaults["height"], width or pipe.defaults["width"]
    fps = fps or pipe.defaults["fps"]
    images = None
    if "image" in args:
        if not pipe.uses_reference:
            raise UsageError(f"image={args['image']}: this checkpoint is a text-to-video model (no condition reads "
                             "an image); drop image=")
        images = load_image(args["image"], height, width)
    elif pipe.needs_reference:
        raise UsageError("this checkpoint is an image-to-video model: pass image=<png/jpg>")
    higen = {}
    for key, high in (("motion_factor", 100_000.0), ("appearance_factor", 1.0)):
        value = _float(args, key, 0.0, high)
        if value is not None:
            if not pipe.hierarchical:
                raise UsageError(f"{key}={args[key]}: only HiGen checkpoints (model/unet=higen) take it")
            higen[key] = value
    conditions = condition_values(args, pipe)
    uncond, dreamvideo = appearance_values(args, pipe, height, width, conditions), {}
    if uncond:
        dreamvideo["uncond_conditions"] = uncond
    strength = _float(args, "inversion_strength", 0.0, 1.0)
    if strength:
        if "start_video" not in args:
            raise UsageError(f"inversion_strength={args['inversion_strength']}: give start_video=<mp4> to invert")
        dreamvideo.update(start_video=read_video(args["start_video"], num_frames or pipe.defaults["num_frames"],
                                                 height, width, fps), inversion_strength=strength)
    elif "start_video" in args:
        raise UsageError("start_video= needs inversion_strength= in (0, 1]")
    if "condition_video" in args:
        conditions.update(reference_maps(args, pipe, height, width, seed))
    elif "conditions" in args:
        raise UsageError("conditions= names maps of a reference clip: give condition_video=<mp4>")
    try:
        video = pipe([args["prompt"]], num_frames=num_frames, height=height, width=width, steps=steps,
                     guidance=guidance, seed=seed, negative_prompt=args.get("negative_prompt"), images=images,
                     fps=fps, sampler=sampler, conditions=conditions, **higen, **dreamvideo)
        if "refiner" in args:
            video = refine(video, args, ema)
    except PipelineError as err:
        raise UsageError(str(err)) from None
    return pipe.save(video, out, fps=fps, upscale=upscale)


def load_dreamvideo(args: dict[str, str], ema: bool | None):
    """DreamVideo composition: the motion checkpoint (else ``checkpoint``, else the first subject checkpoint) is
    the pipeline; the subject checkpoints' adapters and learned word are added onto it."""
    from vgen.checkpoint.safe_load import CheckpointError
    from vgen.pipeline import PipelineError

    subjects = [p.strip() for p in args.get("subject", "").split(",") if p.strip()]
    if "subject" in args and not subjects:
        raise UsageError("subject=: expected one or more checkpoints, comma-separated")
    main_key = "motion" if "motion" in args else "checkpoint" if "checkpoint" in args else "subject"
    main = args[main_key] if main_key != "subject" else subjects.pop(0)
    pipe = load_pipeline(main, ema, key=main_key)
    for path in subjects:
        if not Path(path).exists():
            raise UsageError(f"subject={path}: no such file or directory")
        try:
            pipe.add_adapters(path)
        except (PipelineError, CheckpointError, KeyError, ValueError) as err:
            message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            raise UsageError(f"subject={path}: {message}") from None
    return pipe


def appearance_values(args: dict[str, str], pipe, height: int, width: int,
                      conditions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DreamVideo's appearance guidance: the reference image's embedding and the strengths into ``conditions``;
    returns the unconditional branch's own values (its strength)."""
    keys = [k for k in ("appearance_image", "appearance_strength", "appearance_strength_uncond") if k in args]
    if not keys:
        return {}
    kinds = {type(c).__name__: n for n, c in pipe.unet.conditions.items()}
    if "AppearanceImage" not in kinds:
        raise UsageError(f"{keys[0]}={args[keys[0]]}: this checkpoint has no appearance guidance (a DreamVideo motion "
                         "checkpoint has)")
    strength = _float(args, "appearance_strength", 0.0, 100.0)
    uncond_strength = _float(args, "appearance_strength_uncond", 0.0, 100.0)
    if "appearance_image" in args:
        image = load_image(args["appearance_image"], height, width).to(pipe.device)
        with torch.no_grad():
            conditions[kinds["AppearanceImage"]] = pipe.image_encoder(image).reshape(1, 1, -1)
    uncond = {}
    if "AdapterStrength" in kinds:
        name = kinds["AdapterStrength"]
        if strength is not None:
            conditions[name] = torch.tensor([strength])
        if uncond_strength is not None:
            uncond[name] = torch.tensor([uncond_strength])
        elif strength is not None:
            uncond[name] = torch.tensor([strength])
    elif strength is not None or uncond_strength is not None:
        raise UsageError("appearance_strength: this checkpoint's appearance guidance has no strength input")
    return uncond


def read_video(path: str, num_frames: int, height: int, width: int, fps: int) -> torch.Tensor:
    """The first ``num_frames`` frames of an mp4 at ``fps`` -> [1, 3, F, height, width] in [-1, 1]."""
    from vgen.data.errors import SampleError
    from vgen.data.transforms import resize_center_crop
    from vgen.data.video import decode_video

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"start_video={path}: no such file")
    try:
        clip = decode_video(file.read_bytes(), num_frames, fps, start="first")
    except (SampleError, ValueError, OSError) as err:
        raise UsageError(f"start_video={path}: {' '.join(str(err).split())}") from None
    return resize_center_crop(clip.frames, width, height)[None]


def condition_values(args: dict[str, str], pipe) -> dict[str, torch.Tensor]:
    """``condition.<name>=<numbers>`` arguments -> {name: [1] or [1, D] tensor} for the pipeline."""
    values = {}
    for key, text in args.items():
        if not key.startswith("condition."):
            continue
        name = key[len("condition."):]
        if name not in pipe.unet.conditions:
            raise UsageError(f"{key}: this checkpoint has no condition {name!r}; its conditions: "
                             f"{', '.join(pipe.unet.conditions)}")
        try:
            numbers = [float(v) for v in text.split(",")]
        except ValueError:
            raise UsageError(f"{key}={text}: expected a number or comma-separated numbers") from None
        if not all(np.isfinite(numbers)):
            raise UsageError(f"{key}={text}: expected finite numbers")
        values[name] = torch.tensor([numbers[0]] if len(numbers) == 1 else [numbers])
    return values


def reference_maps(args: dict[str, str], pipe, height: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    """The condition maps of ``condition_video`` named by ``conditions`` (``[a,b]`` or ``a,b``)."""
    from vgen.data.errors import SampleError
    from vgen.pipeline import PipelineError

    path = Path(args["condition_video"])
    if not path.is_file():
        raise UsageError(f"condition_video={path}: no such file")
    names = [n.strip() for n in args.get("conditions", "").strip("[]").split(",") if n.strip()]
    try:
        return pipe.reference_conditions(path, names or None, height=height, width=width, seed=seed)
    except SampleError as err:
        raise UsageError(f"condition_video={path}: {err}") from None
    except PipelineError as err:
        raise UsageError(f"conditions={args.get('conditions', '')}: {err}") from None


def refine(video: torch.Tensor, args: dict[str, str], ema: bool | None) -> torch.Tensor:
    """The cascade's second stage: ``video`` through the refinement model of ``args["refiner"]``."""
    refiner = load_pipeline(args["refiner"], ema, key="refiner")
    if refiner.noise_levels is None:
        raise UsageError(f"refiner={args['refiner']} is not a refinement-model checkpoint (train one with "
                         "experiment=i2vgen_refine)")
    total = refiner.diffusion.param.num_timesteps
    levels = _int(args, "refine_noise_levels", 1, total)
    steps = _int(args, "refine_steps", 1, levels or refiner.noise_levels)
    return refiner.refine(video, [args.get("refine_prompt", args["prompt"])],
                          height=_int(args, "refine_height", 1, MAX_SIZE), width=_int(args, "refine_width", 1, MAX_SIZE),
                          steps=steps, noise_levels=levels, negative_prompt=args.get("negative_prompt"),
                          seed=_int(args, "seed", 0, 2**63 - 1, default=0))


def main(argv: list[str] | None = None) -> int:
    from vgen.checkpoint.safe_load import CheckpointError

    try:
        path = sample(parse_args(sys.argv[1:] if argv is None else argv))
    except (UsageError, FileNotFoundError, KeyError, CheckpointError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"vgen.sample: error: {message.strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
