"""One evaluation: videos (sampled from a pipeline, or read from mp4 files) -> per-video values -> a report.

Work is split into fixed *units* (a batch of prompts at one seed, or a batch of files) that never depend on the
number of processes: under ``torch.distributed`` each rank takes every world-size-th unit, computes its videos'
values, and all values are gathered in order, so 2 ranks report exactly what 1 does. An error on one rank stops
every rank with that rank's message (no rank waits forever on a collective).

Reference features (FVD) are cached per reference set in ``cache_dir``: the file name is a hash of the reference
files' bytes, the extractor's weights and the protocol, so a changed video, weight file or protocol recomputes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vgen.eval.metrics import Extractors, Metric, build_metrics, file_sha256

REPORT_FILES = ("metrics.json", "metrics.csv", "videos.csv")


class EvalError(ValueError):
    """An evaluation that cannot run as asked: the one-line message names the file or option."""


@dataclass
class Prompt:
    """One entry of a prompt set: the text, and optionally a first-frame image and the video file to score."""

    prompt: str
    image: Path | None = None
    video: Path | None = None


@dataclass
class Item:
    """One video of the evaluation: its row in the report, prompt, seed (sampled videos) and file."""

    index: int
    prompt: str
    seed: int | None = None
    image: Path | None = None
    video: Path | None = None


@dataclass
class Report:
    """The reported numbers (``metrics``), how each was measured (``protocols``), one row per video and the
    settings of the run."""

    metrics: dict[str, float]
    protocols: dict[str, str]
    rows: list[dict]
    settings: dict = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> list[Path]:
        """``metrics.json`` (everything), ``metrics.csv`` (one row: the numbers) and ``videos.csv`` (a row per
        video) in ``out_dir``; each written to a temporary name and renamed."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"source": self.settings.get("source", ""), "videos": len(self.rows), **self.metrics}
        document = {"settings": self.settings, "metrics": self.metrics, "protocols": self.protocols,
                    "videos": self.rows}
        paths = [out / name for name in REPORT_FILES]
        _write_atomic(paths[0], json.dumps(_finite(document), indent=2) + "\n")
        _write_atomic(paths[1], _csv([summary]))
        _write_atomic(paths[2], _csv(self.rows))
        return paths

    def log_wandb(self, project: str, run_dir: str | Path, name: str | None = None) -> None:
        """A W&B run with the numbers as its summary and a table of the videos with their scores (offline unless
        ``VGEN_WANDB_OFFLINE=false``, as training's logger)."""
        import os

        import wandb

        offline = os.environ.get("VGEN_WANDB_OFFLINE", "true").lower() not in ("0", "false", "no")
        run = wandb.init(project=project, name=name, dir=str(run_dir), job_type="eval", config=self.settings,
                         mode="offline" if offline else "online")
        scores = [k for k in (self.rows[0] if self.rows else {}) if k not in ("index", "prompt", "seed", "video")]
        table = wandb.Table(columns=["prompt", "seed", "video", *scores])
        for row in self.rows:
            video = wandb.Video(row["video"], format="mp4") if row["video"] else None
            table.add_data(row["prompt"], row["seed"], video, *(row[k] for k in scores))
        run.log({"eval/videos": table, **{f"eval/{k}": v for k, v in self.metrics.items()}})
        run.summary.update({f"eval/{k}": v for k, v in self.metrics.items()})
        run.finish()


def _finite(value):
    """JSON has no NaN: non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _csv(rows: list[dict]) -> str:
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
                     for row in rows)
    return text.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- prompt sets
def read_prompts(path: str | Path) -> list[Prompt]:
    """A prompt set: a ``.txt`` file (one prompt per non-empty line) or a ``.json`` list of prompts, each a string
    or ``{"prompt": ..., "image": <first frame>, "video": <mp4 to score>}`` (``image`` relative to the file,
    ``video`` as given: the command line resolves it in its ``videos=`` folder)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"prompts={path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"prompts={path}: not a readable text file ({type(err).__name__})") from None
    if path.suffix.lower() != ".json":
        entries = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalError(f"prompts={path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, list):
            raise EvalError(f"prompts={path}: expected a JSON list of prompts, got {type(data).__name__}")
        entries = [_prompt_entry(item, i, path) for i, item in enumerate(data)]
    if not entries:
        raise EvalError(f"prompts={path}: no prompts in the file")
    return entries


def _prompt_entry(item, index: int, path: Path) -> Prompt:
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise EvalError(f"prompts={path}: entry {index} must be a string or an object with a \"prompt\" string")
    unknown = sorted(set(item) - {"prompt", "image", "video"})
    if unknown:
        raise EvalError(f"prompts={path}: entry {index} has unknown key {unknown[0]!r} (keys: prompt, image, video)")
    files = {}
    for key in ("image", "video"):
        if item.get(key) is not None:
            if not isinstance(item[key], str):
                raise EvalError(f"prompts={path}: entry {index}: {key} must be a file path")
            files[key] = path.parent / item[key] if key == "image" else Path(item[key])
    return Prompt(item["prompt"], **files)


def read_video(path: Path) -> np.ndarray:
    """uint8 [F, H, W, 3] of an mp4 file, or an :class:`EvalError` naming it."""
    from vgen.media import read_mp4

    try:
        frames, _ = read_mp4(path)
    except Exception as err:  # noqa: BLE001 - PyAV raises many kinds for a damaged or non-video file
        raise EvalError(f"{path}: not a readable video ({type(err).__name__})") from None
    return frames


# ---------------------------------------------------------------------------------------------- distributed
def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective(fn: Callable[[], object], gather: bool = True):
    """``fn()`` on every rank -> every rank's result in rank order (``gather=False``: this rank's result, nothing
    sent). If ``fn`` raised anywhere, every rank raises: the failing rank its own exception, the others an
    :class:`EvalError` with its message."""
    rank, size = world()
    try:
        value, error = fn(), None
    except Exception as err:  # noqa: BLE001 - passed on to the other ranks, then re-raised here
        value, error = None, err
    if size == 1:
        if error is not None:
            raise error
        return [value] if gather else value
    message = None if error is None else f"rank {rank}: {_message(error)}"
    gathered: list = [None] * size
    dist.all_gather_object(gathered, (value if gather else None, message))
    if error is not None:
        raise error
    failed = [m for _, m in gathered if m is not None]
    if failed:
        raise EvalError(failed[0])
    return [v for v, _ in gathered] if gather else value


def _message(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first if isinstance(error, (ValueError, KeyError, OSError)) else f"{type(error).__name__}: {first}"


def _run_units(units: list[list], work: Callable[[list], list]) -> list:
    """``work(unit)`` for this rank's share of ``units`` -> the results of all units, in unit order (every rank)."""
    rank, size = world()
    mine = collective(lambda: [(i, work(units[i])) for i in range(rank, len(units), size)])
    ordered = dict(pair for share in mine for pair in share)
    return [ordered[i] for i in range(len(units))]


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(metrics: Sequence[Metric], units: list[list[Item]], produce: Callable[[list[Item]], list[np.ndarray]],
             *, reference: Sequence[Path] = (), cache_dir: str | Path | None = None, batch_size: int = 8,
             settings: dict | None = None) -> Report:
    """Score the videos of ``units`` (``produce(unit)`` -> uint8 [F, H, W, 3] per item) with ``metrics``;
    features metrics (FVD) get the reference set's features first (cached)."""
    for metric in metrics:
        if metric.features:
            metric.reference = reference_features(metric, list(reference), cache_dir, batch_size)

    def work(unit: list[Item]) -> list[dict]:
        videos = produce(unit)
        prompts = [item.prompt for item in unit]
        values = {m.name: m(videos, prompts) for m in metrics}
        return [{name: v[j] for name, v in values.items()} for j in range(len(unit))]

    per_video = [row for unit_rows in _run_units(units, work) for row in unit_rows]
    items = [item for unit in units for item in unit]
    order = sorted(range(len(items)), key=lambda j: items[j].index)
    results = {}
    for m in metrics:
        values = np.stack([per_video[j][m.name] for j in order])
        try:
            results[m.name] = m.summarise(values)
        except ValueError as err:
            raise EvalError(str(err)) from None
    rows = []
    for j in order:
        item = items[j]
        row = {"index": item.index, "prompt": item.prompt, "seed": item.seed,
               "video": None if item.video is None else str(item.video)}
        row.update({m.name: float(per_video[j][m.name]) for m in metrics if not m.features})
        rows.append(row)
    protocols = {m.name: m.protocol for m in metrics if m.protocol}
    return Report(results, protocols, rows, dict(settings or {}))


def reference_features(metric: Metric, paths: list[Path], cache_dir: str | Path | None, batch_size: int
                       ) -> np.ndarray:
    """Features of the reference videos under ``metric`` (every rank gets them), read from or written to the
    cache file of this reference set."""
    import safetensors.numpy

    if not paths:
        raise EvalError(f"{metric.name} needs reference videos: reference=<folder of mp4 files>")
    rank, _ = world()

    def cache_file() -> Path | None:
        if cache_dir is None:
            return None
        digest = hashlib.sha256(metric.fingerprint().encode())
        for path in paths:
            digest.update(f"|{path.name}|{file_sha256(path)}".encode())
        return Path(cache_dir) / f"{metric.name}-reference-{digest.hexdigest()[:32]}.safetensors"

    cache = collective(lambda: cache_file() if rank == 0 else None)[0]
    if cache is not None and cache.is_file():
        return collective(lambda: safetensors.numpy.load_file(cache)["features"] if rank == 0 else None)[0]
    units = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    features = np.concatenate(_run_units(units, lambda unit: metric([read_video(p) for p in unit], [""] * len(unit))))
    if cache is not None and rank == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        safetensors.numpy.save_file({"features": features}, tmp, metadata={
            "protocol": metric.protocol or "", "videos": str(len(paths)), "first": str(paths[0])})
        tmp.replace(cache)
    return features


def pipeline_units(prompts: Sequence[Prompt | str], seeds: int, seed: int, batch_size: int,
                   video_dir: Path | None = None) -> list[list[Item]]:
    """Sampling units: ``seeds`` rounds over the prompts in batches of ``batch_size``, each batch at its own seed
    (``seed``, ``seed + 1``, ... in order; one batch's noise is drawn from its seed, so no two batches share it).
    Rows are ordered prompt by prompt, then by round; sampled videos are named ``<prompt index>_seed<seed>.mp4``
    (with ``batch_size=1`` that is the ``vgen.sample`` call that reproduces the video)."""
    entries = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
    starts = range(0, len(entries), batch_size)
    units = []
    for k in range(seeds):
        for c, start in enumerate(starts):
            unit_seed = seed + k * len(starts) + c
            unit = []
            for i in range(start, min(start + batch_size, len(entries))):
                video = None if video_dir is None else Path(video_dir) / f"{i:04d}_seed{unit_seed}.mp4"
                unit.append(Item(i * seeds + k, entries[i].prompt, unit_seed, entries[i].image, video))
            units.append(unit)
    return units


def evaluate_pipeline(pipe, prompts: Sequence[Prompt | str], metrics: Sequence[str | Metric], *, seeds: int = 1,
                      seed: int = 0, batch_size: int = 8, video_dir: str | Path | None = None,
                      reference: Sequence[Path] = (), cache_dir: str | Path | None = None,
                      extractors: Extractors | None = None, settings: dict | None = None, fps: int | None = None,
                      **sampling) -> Report:
    """Sample ``seeds`` videos per prompt from ``pipe`` (a :class:`vgen.pipeline.VideoPipeline`; ``sampling``:
    its ``steps``, ``guidance``, ``num_frames``, ``height``, ``width``, ``sampler``, ... ) and score them.

    The benchmarks and ``python -m vgen.eval checkpoint=...`` both go through here, so they report the same
    numbers for the same checkpoint and settings. ``video_dir``: where to write the sampled mp4 files."""
    from vgen.media import to_uint8_frames, write_mp4

    metrics = _metrics(metrics, extractors)
    height = sampling.get("height") or pipe.defaults["height"]
    width = sampling.get("width") or pipe.defaults["width"]
    fps = fps or pipe.defaults["fps"]

    def produce(unit: list[Item]) -> list[np.ndarray]:
        images = None
        if any(item.image is not None for item in unit):
            from vgen.sample import UsageError, load_image

            try:
                images = torch.cat([load_image(str(item.image), height, width) for item in unit])
            except UsageError as err:
                raise EvalError(str(err)) from None
        videos = pipe([item.prompt for item in unit], seed=unit[0].seed, images=images, fps=fps, **sampling)
        frames = [to_uint8_frames(v) for v in videos]
        for item, video in zip(unit, frames):
            if item.video is not None:
                write_mp4(video, item.video, fps=fps)
        return frames

    units = pipeline_units(prompts, seeds, seed, batch_size, None if video_dir is None else Path(video_dir))
    return evaluate(metrics, units, produce, reference=reference, cache_dir=cache_dir, batch_size=batch_size,
                    settings=settings)


def evaluate_videos(prompts: Sequence[Prompt], metrics: Sequence[str | Metric], *, batch_size: int = 8,
                    reference: Sequence[Path] = (), cache_dir: str | Path | None = None,
                    extractors: Extractors | None = None, settings: dict | None = None) -> Report:
    """Score existing mp4 files: each prompt's ``video``."""
    metrics = _metrics(metrics, extractors)
    items = [Item(i, p.prompt, None, p.image, p.video) for i, p in enumerate(prompts)]
    units = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return evaluate(metrics, units, lambda unit: [read_video(item.video) for item in unit], reference=reference,
                    cache_dir=cache_dir, batch_size=batch_size, settings=settings)


def _metrics(metrics: Sequence[str | Metric], extractors: Extractors | None) -> list[Metric]:
    names = [m for m in metrics if isinstance(m, str)]
    built = iter(build_metrics(names, extractors or Extractors()))
    return [next(built) if isinstance(m, str) else m for m in metrics]
