"""Evaluation entry point: score a checkpoint's samples, or a folder of mp4 files, over a prompt set.

    python -m vgen.eval checkpoint=<ckpt> prompts=<prompts.txt|.json> metrics=[fvd,clipsim,direction] out=<dir> \
        [reference=<folder of mp4>] [i3d_weights=rgb_imagenet.pt] [clip_weights=open_clip_pytorch_model.bin] \
        [clip_arch=ViT-H-14] [raft_weights=raft_large_C_T_SKHT_V2-ff5fadd5.pth] [seeds=1] [seed=0] [steps=...] \
        [guidance=...] [batch_size=8] [cache_dir=~/.cache/vgen/eval] [wandb=<project>] [overwrite=false]
    python -m vgen.eval videos=<folder of mp4> prompts=<...> metrics=[...] out=<dir>
    torchrun --nproc_per_node 8 -m vgen.eval ...   # units split over ranks, values gathered: same numbers

Writes ``<out>/metrics.json`` (numbers, protocols, settings, every video's scores), ``<out>/metrics.csv`` (one
row: the numbers) and ``<out>/videos.csv`` (a row per video), plus the sampled ``<out>/videos/*.mp4``. An existing
report is never replaced unless ``overwrite=true``. Every bad argument or file ends with one line on stderr naming
it and a non-zero exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from vgen.sample import MAX_FRAMES, MAX_SIZE, UsageError, _bool, _float, _int, key_values

OPTIONS = {
    "checkpoint": "training checkpoint to sample from: a .ckpt file or a sharded directory (or give videos=)",
    "videos": "folder of mp4 files to score instead (a JSON prompt's \"video\" names its file, else the folder's "
              "mp4 files in name order match the prompts)",
    "prompts": "prompt set (required): .txt, one prompt per line, or .json, a list of strings or "
               "{\"prompt\", \"image\": first frame, \"video\": file in videos=}",
    "metrics": "what to report (required), e.g. [fvd,clipsim,consistency,motion,direction,shape_found,color]",
    "out": "output folder (required): metrics.json, metrics.csv, videos.csv, videos/",
    "reference": "folder of reference mp4 files (fvd)",
    "i3d_weights": "I3D Kinetics-400 weights, pytorch-i3d layout (rgb_imagenet.pt) (fvd)",
    "clip_weights": "OpenCLIP weights file (clipsim, consistency)",
    "clip_arch": "OpenCLIP architecture of clip_weights (default ViT-H-14)",
    "raft_weights": "torchvision RAFT weights file, large or small (motion)",
    "flow_size": "short side, in pixels, of the frames optical flow runs on (>= 128, default 256)",
    "cache_dir": "where reference features are cached (default ~/.cache/vgen/eval; none: no cache)",
    "seeds": "videos per prompt (default 1); each batch of prompts is sampled at its own seed: seed, seed+1, ...",
    "seed": "first noise seed (default 0)",
    "batch_size": "videos sampled and scored together (default 8)",
    "steps": "sampler steps (default: the run's)",
    "guidance": "classifier-free guidance scale (default: the run's)",
    "sampler": "ddim | lcm (default: the checkpoint's)",
    "num_frames": "frames to generate (default: the run's)",
    "height": "pixel height (default: the run's)",
    "width": "pixel width (default: the run's)",
    "fps": "fps of the written mp4 files and the fps condition (default: the run's)",
    "ema": "use the EMA weights (true/false; default: EMA when saved)",
    "negative_prompt": "unconditional prompt for CFG (default: the training negative prompt)",
    "device": "cpu | cuda (default: cuda when available; under torchrun each rank uses cuda:LOCAL_RANK)",
    "wandb": "W&B project: also log the numbers and a table of the videos (offline unless VGEN_WANDB_OFFLINE=false)",
    "overwrite": "replace an existing report in out (true/false, default false)",
}
REQUIRED = ("prompts", "metrics", "out")
SAMPLING = ("seeds", "seed", "steps", "guidance", "sampler", "num_frames", "height", "width", "fps", "ema",
            "negative_prompt")
USAGE = "usage: python -m vgen.eval checkpoint=<ckpt> | videos=<dir> prompts=<file> metrics=[...] out=<dir>"


def parse_args(argv: list[str]) -> dict[str, str]:
    args = key_values(argv, OPTIONS)
    missing = [k for k in REQUIRED if k not in args]
    if missing:
        raise UsageError(f"missing required {', '.join(missing)}; {USAGE}")
    if ("checkpoint" in args) == ("videos" in args):
        raise UsageError(f"give exactly one of checkpoint= and videos=; {USAGE}")
    return args


def parse_metrics(text: str) -> list[str]:
    from vgen.eval.metrics import METRICS

    names = [n.strip() for n in text.strip().strip("[]").split(",") if n.strip()]
    if not names:
        raise UsageError(f"metrics={text}: name at least one of {', '.join(METRICS)}")
    for name in names:
        if name not in METRICS:
            raise UsageError(f"metrics={text}: unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"metrics={text}: a metric is named twice")
    return names


def mp4_files(key: str, folder: str) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"{key}={folder}: no such folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".mp4" and p.is_file())
    if not files:
        raise UsageError(f"{key}={folder}: no .mp4 files in the folder")
    return files


def check_inputs(args: dict[str, str], metrics: list[str]) -> None:
    """Every option the chosen metrics need is given and names an existing file; nothing else is needed."""
    from vgen.eval.metrics import METRICS

    for name in metrics:
        for option in METRICS[name].needs:
            if option not in args:
                raise UsageError(f"metric {name} needs {option}=<{'folder' if option == 'reference' else 'file'}> "
                                 f"({OPTIONS[option]})")
            if option.endswith("_weights") and not Path(args[option]).is_file():
                raise UsageError(f"{option}={args[option]}: no such file")
    if "checkpoint" in args and not Path(args["checkpoint"]).exists():
        raise UsageError(f"checkpoint={args['checkpoint']}: no such file or directory")
    if "videos" in args:
        given = [k for k in SAMPLING if k in args]
        if given:
            raise UsageError(f"{given[0]}= applies to sampling a checkpoint, not to videos=")


def check_output(args: dict[str, str]) -> Path:
    from vgen.eval.run import REPORT_FILES

    out = Path(args["out"])
    if out.exists() and not out.is_dir():
        raise UsageError(f"out={out}: is a file, not a folder")
    existing = [name for name in REPORT_FILES if (out / name).exists()]
    if existing and not _bool(args, "overwrite"):
        raise UsageError(f"out={out}: {existing[0]} exists (pass overwrite=true to replace the report)")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"out={out}: {parent} is a file, not a folder")
    return out


def match_videos(prompts, folder: str):
    """Each prompt's video file: named by its JSON entry (in ``folder``), else the folder's mp4 files in order."""
    from dataclasses import replace

    named = [p.video is not None for p in prompts]
    if any(named) and not all(named):
        raise UsageError(f"prompts={prompts[named.index(False)].prompt!r}: either every prompt names its \"video\" "
                         "or none does (then the folder's mp4 files in name order match the prompts)")
    if all(named):
        matched = [replace(p, video=Path(folder) / p.video) for p in prompts]
        for p in matched:
            if not p.video.is_file():
                raise UsageError(f"videos={folder}: {p.video} (the video of {p.prompt!r}) does not exist")
        return matched
    files = mp4_files("videos", folder)
    if len(files) != len(prompts):
        raise UsageError(f"videos={folder}: {len(files)} mp4 files for {len(prompts)} prompts; the counts must match "
                         "(or name each prompt's file in a JSON prompt set)")
    return [replace(p, video=f) for p, f in zip(prompts, files)]


def choose_device(text: str | None) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if text is None:
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text not in ("cpu", "cuda"):
        raise UsageError(f"device={text}: expected cpu or cuda")
    if text == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("device=cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def evaluate(args: dict[str, str]) -> tuple[object, Path]:
    from vgen.eval.metrics import Extractors
    from vgen.eval.run import collective, evaluate_pipeline, evaluate_videos, read_prompts

    metrics = parse_metrics(args["metrics"])
    check_inputs(args, metrics)
    out = check_output(args)
    prompts = read_prompts(args["prompts"])
    batch_size = _int(args, "batch_size", 1, 4096, default=8)
    device = choose_device(args.get("device"))
    extractors = Extractors(device=device, i3d_weights=args.get("i3d_weights"), clip_weights=args.get("clip_weights"),
                            clip_arch=args.get("clip_arch", "ViT-H-14"), raft_weights=args.get("raft_weights"),
                            flow_size=_int(args, "flow_size", 128, MAX_SIZE, default=256))
    reference = mp4_files("reference", args["reference"]) if "fvd" in metrics else []
    cache = args.get("cache_dir", str(Path.home() / ".cache" / "vgen" / "eval"))
    cache_dir = None if cache.lower() == "none" else cache
    settings = {k: v for k, v in args.items() if k not in ("out", "overwrite", "device", "wandb")}
    settings["source"] = args.get("checkpoint", args.get("videos"))
    for p in prompts:
        if p.image is not None and not p.image.is_file():
            raise UsageError(f"prompts={args['prompts']}: image {p.image} of {p.prompt!r} does not exist")
    if "videos" in args:
        prompts = match_videos(prompts, args["videos"])
        sampling, count = None, len(prompts)
    else:
        sampling = sampling_options(args)
        count = len(prompts) * sampling["seeds"]
    if "fvd" in metrics and min(count, len(reference)) < 2:
        raise UsageError(f"fvd needs at least 2 videos in each set; got {count} to score and {len(reference)} in "
                         f"reference={args['reference']}")
    init_distributed()
    built = {"fvd": "i3d", "clipsim": "clip", "consistency": "clip", "motion": "motion"}
    collective(lambda: [getattr(extractors, built[m])() for m in metrics if m in built], gather=False)  # fail early
    common = {"batch_size": batch_size, "reference": reference, "cache_dir": cache_dir, "extractors": extractors,
              "settings": settings}
    if sampling is None:
        report = evaluate_videos(prompts, metrics, **common)
    else:
        pipe = collective(lambda: load_pipeline(args, prompts, device), gather=False)
        report = evaluate_pipeline(pipe, prompts, metrics, video_dir=out / "videos", **sampling, **common)
    return report, out


def sampling_options(args: dict[str, str]) -> dict:
    options = {"seeds": _int(args, "seeds", 1, 100_000, default=1), "seed": _int(args, "seed", 0, 2**62, default=0),
               "steps": _int(args, "steps", 1, 10_000), "guidance": _float(args, "guidance", 0.0, 1e4),
               "num_frames": _int(args, "num_frames", 1, MAX_FRAMES), "height": _int(args, "height", 1, MAX_SIZE),
               "width": _int(args, "width", 1, MAX_SIZE), "fps": _int(args, "fps", 1, 1000),
               "sampler": args.get("sampler"), "negative_prompt": args.get("negative_prompt")}
    return {k: v for k, v in options.items() if v is not None}


def load_pipeline(args: dict[str, str], prompts, device: torch.device):
    """The checkpoint's pipeline on ``device``, refused (one line) where the prompt set does not fit the model."""
    from vgen.sample import load_pipeline as load

    pipe = load(args["checkpoint"], _bool(args, "ema")).to(device)
    sampler = args.get("sampler", pipe.sampler)
    if sampler not in pipe.samplers:
        raise UsageError(f"sampler={sampler}: not available for this checkpoint; valid choices: {', '.join(pipe.samplers)}")
    if sampler == "lcm" and "guidance" in args:
        raise UsageError("guidance does not apply to sampler=lcm (consistency sampling uses no CFG)")
    _int(args, "steps", 1, pipe.lcm.solver_steps if sampler == "lcm" else pipe.diffusion.param.num_timesteps)
    with_image = [p.image is not None for p in prompts]
    if pipe.needs_reference and not all(with_image):
        raise UsageError(f"this checkpoint is an image-to-video model: every prompt of prompts={args['prompts']} needs "
                         "an \"image\" (a JSON prompt set)")
    if any(with_image) and not pipe.uses_reference:
        raise UsageError(f"prompts={args['prompts']} gives first-frame images, but this checkpoint is a text-to-video "
                         "model (no condition reads an image)")
    if any(with_image) and not all(with_image):
        raise UsageError(f"prompts={args['prompts']}: give an \"image\" for every prompt or for none")
    return pipe


def init_distributed() -> None:
    """Join the process group torchrun set up (gloo: CPU tensors; the values gathered are small)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from vgen.checkpoint.safe_load import CheckpointError

    rank = int(os.environ.get("RANK", "0"))
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        report, out = evaluate(args)
        if rank == 0:
            paths = report.write(out)
            if "wandb" in args:
                report.log_wandb(args["wandb"], out, name=out.name)
    except (UsageError, ValueError, KeyError, OSError, CheckpointError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if rank == 0:
            print(f"vgen.eval: error: {(message.strip() or type(err).__name__).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        for name, value in report.metrics.items():
            protocol = report.protocols.get(name)
            print(f"{name} {value:.6g}" + (f"  ({protocol})" if protocol else ""))
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
