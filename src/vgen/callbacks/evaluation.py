"""In-training evaluation: every N steps, the validation loss on held-out shards at fixed timesteps and noise, and
metrics of the eval registry (:data:`vgen.eval.METRICS`) on a fixed prompt set; logged as ``eval/*`` scalars (all
loggers), a table and the videos (W&B); the best checkpoint by a chosen number is kept as ``best.ckpt``.

**Loss.** The first ``samples_per_source`` usable samples of each held-out source, read in shard order (centre
windows, no shuffling), are numbered ``j = 0, 1, ...`` over the sources; sample ``j`` is scored at every timestep
``t_k`` of ``timesteps`` with noise drawn from the seed ``(seed, j, k)`` (and, for a VAE that samples its
posterior, that posterior noise from ``(seed, j)``). ``eval/loss`` is the mean of the per-sample diffusion loss
over samples and timesteps (``eval/loss_t<t>`` per timestep): the same number for the same weights whatever the
world size, between evaluations and between runs. Rank ``r`` of ``W`` takes samples ``j = r, r + W, ...``; the
sums are all-reduced. Every rank runs the same number of equally sized batches (padding with zero-weight
copies), so sharded models (FSDP2, ZeRO-3), whose forwards are collective, evaluate too. The loss uses the
conditions the batch gives (no classifier-free dropout), the UNet in eval mode and the training precision.

**Metrics.** The prompts are sampled through :meth:`vgen.pipeline.VideoPipeline.from_stage` in the units of
:func:`vgen.eval.run.pipeline_units` (each batch of prompts at its own seed) and scored by
:func:`vgen.eval.run.evaluate`: under DDP every rank samples and scores its share of the units and the values are
gathered; a sharded model is sampled by every rank for every unit (its forwards are collective), each rank then
scoring its share. Videos are written to ``<output_dir>/step_XXXXXXX/`` (by the rank that scored them: a run
directory shared by the nodes, as checkpoints need, lets rank 0 log them all).

Both use the training weights (not the EMA), as the validation videos do; the global random state is saved
before and restored after, so turning evaluation on does not change the training trajectory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import WandbLogger

from vgen.callbacks.preemption import preempted
from vgen.training import rng

log = logging.getLogger(__name__)
KEY = "callbacks.evaluation"


def _int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{KEY}.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def eval_timesteps(timesteps: int | Sequence[int], num_timesteps: int) -> list[int]:
    """``timesteps``: a count K (the centres of K equal bins of [0, T): 100, 300, ..., 900 for K = 5 of 1000) or a
    list of integer timesteps in [0, T)."""
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        if not 1 <= timesteps <= num_timesteps:
            raise ValueError(f"{KEY}.timesteps={timesteps}: a count must be in [1, {num_timesteps}]")
        return [int((2 * k + 1) * num_timesteps // (2 * timesteps)) for k in range(timesteps)]
    values = list(timesteps)
    if not values or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_timesteps for t in values):
        raise ValueError(f"{KEY}.timesteps must be a count or a list of integers in [0, {num_timesteps}), "
                         f"got {timesteps!r}")
    return values


def held_out_samples(sources, decoder_options: dict, frames: int, width: int, height: int, per_source: int,
                     seed: int) -> list[tuple[str, list[dict]]]:
    """``[(kind, decoded samples)]`` per source: the first ``per_source`` usable samples in shard order (centre
    windows); unusable ones are skipped with a warning. A source without any usable sample is an error."""
    from vgen.data.buckets import Bucket
    from vgen.data.datamodule import resolve_shards
    from vgen.data.errors import SampleError
    from vgen.data.shards import read_shard, seeded
    from vgen.data.stream import SampleDecoder

    out = []
    for index, source in enumerate(sources):
        key = f"{KEY}.shards[{index}]"
        decoder = SampleDecoder(kind=source.type, start="center", caption_required=source.caption_required,
                                **decoder_options)
        bucket = Bucket(1 if source.type == "image" else frames, width, height, 1)
        samples: list[dict] = []
        for url in resolve_shards(source.urls, f"{key}.urls"):
            raws = read_shard(url, lambda u, err, key=key: log.warning("%s: shard %s unreadable: %s", key, u, err))
            try:
                for raw in raws:
                    try:
                        samples.append(decoder(raw, seeded(seed, key, raw["__key__"]), bucket))
                    except SampleError as err:
                        log.warning("%s: sample %s of %s skipped: %s", key, raw.get("__key__"), url, err)
                    if len(samples) == per_source:
                        break
            finally:
                raws.close()
            if len(samples) == per_source:
                break
        if not samples:
            raise ValueError(f"{key}: no usable sample in {source.urls!r}")
        out.append((source.type, samples))
    return out


def rank_batches(sources: list[tuple[str, list[dict]]], rank: int, world: int, batch_size: int
                 ) -> list[tuple[str, list[dict], list[int], list[float]]]:
    """This rank's ``(kind, samples, global indices, weights)`` batches: samples ``j = rank, rank + world, ...`` of
    each source, in batches of ``batch_size``; every rank gets the same number of full batches (padded with
    zero-weight copies of the source's first sample)."""
    batches, offset = [], 0
    for kind, samples in sources:
        count = math.ceil(math.ceil(len(samples) / world) / batch_size)  # the same on every rank
        mine = list(range(offset + rank, offset + len(samples), world))
        mine += [None] * (count * batch_size - len(mine))
        for b in range(count):
            chunk = mine[b * batch_size:(b + 1) * batch_size]
            indices = [offset if j is None else j for j in chunk]
            batches.append((kind, [samples[j - offset] for j in indices], indices,
                            [float(j is not None) for j in chunk]))
        offset += len(samples)
    return batches


def _sample_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


@torch.no_grad()
def held_out_loss(stage, batches, timesteps: list[int], seed: int, forward_context=None) -> torch.Tensor:
    """``[sum over samples of the loss at t_k for each k..., sum of weights]`` of this rank's ``batches`` (see the
    module docstring): float64 on the stage's device, ready to be all-reduced."""
    import contextlib

    from vgen.data.stream import collate
    from vgen.diffusion.loss import training_noise

    device, diffusion = stage.device, stage.diffusion
    sums = torch.zeros(len(timesteps) + 1, dtype=torch.float64, device=device)
    for kind, samples, indices, weights in batches:
        batch = move_data_to_device(collate(samples, kind), device)
        latents = []
        for sample, j in zip(samples, indices, strict=True):  # one at a time: a VAE posterior's noise is seeded
            torch.manual_seed(_sample_seed(seed, j))
            latents.append(stage.batch_latents(move_data_to_device(collate([sample], kind), device)))
        latents = torch.cat(latents)
        weight = torch.tensor(weights, dtype=torch.float64, device=device)
        with forward_context or contextlib.nullcontext():
            conditions = stage.condition_values(stage.condition_inputs(batch, latents, latents.shape[2]))
            for k, t in enumerate(timesteps):
                noise = torch.cat([training_noise(latents[i:i + 1].detach().cpu().float(),
                                                  diffusion.offset_noise_strength,
                                                  generator=torch.Generator().manual_seed(
                                                      _sample_seed(seed, j) * 1009 + k),
                                                  frame_correlation=diffusion.frame_noise_correlation)
                                   for i, j in enumerate(indices)]).to(device=device, dtype=latents.dtype)
                steps = torch.full((len(indices),), t, dtype=torch.long, device=device)
                loss = diffusion.loss(stage.unet, latents, conditions, t=steps, noise=noise)
                sums[k] += (loss.double() * weight).sum()
        sums[-1] += weight.sum()
    return sums


class Evaluation(L.Callback):
    """See the module docstring; every argument is a key of ``callbacks.evaluation`` (conf/callbacks/default.yaml).

    ``enabled: false`` (the default) makes it do nothing at all.
    """

    def __init__(self, enabled: bool = False, every_n_steps: int = 1000, shards: Sequence = (),
                 samples_per_source: int = 16, batch_size: int = 4, timesteps: int | Sequence[int] = 5,
                 num_frames: int | None = None, resolution: Sequence[int] | None = None,
                 sample_fps: float | None = None, seed: int = 0, prompts: Sequence[str] | str = (),
                 metrics: Sequence[str] = (), seeds: int = 1, steps: int | None = None, guidance: float | None = None,
                 sampler: str | None = None, fps: int = 8, reference: str | None = None,
                 i3d_weights: str | None = None, clip_weights: str | None = None, clip_arch: str = "ViT-H-14",
                 raft_weights: str | None = None, cache_dir: str | None = "~/.cache/vgen/eval",
                 monitor: str = "eval/loss", mode: str = "min", best_checkpoint: str | None = None,
                 output_dir: str = "eval"):
        if not isinstance(enabled, bool):
            raise TypeError(f"{KEY}.enabled must be true or false, got {enabled!r}")
        self.enabled = enabled
        self.best: float | None = None
        self.best_step: int | None = None
        self._last_step = -1
        if not enabled:
            return
        from vgen.data.datamodule import SourceConfig, resolve_shards
        from vgen.eval.metrics import METRICS
        from vgen.eval.run import read_prompts

        self.every_n_steps = _int(every_n_steps, "every_n_steps")
        self.shards = [SourceConfig.parse(entry, f"{KEY}.shards[{i}]") for i, entry in enumerate(shards or ())]
        for i, source in enumerate(self.shards):
            resolve_shards(source.urls, f"{KEY}.shards[{i}].urls")
        self.samples_per_source = _int(samples_per_source, "samples_per_source")
        self.batch_size = _int(batch_size, "batch_size")
        self.timesteps = timesteps
        self.num_frames = None if num_frames is None else _int(num_frames, "num_frames")
        if resolution is not None and (isinstance(resolution, str) or len(resolution) != 2):
            raise ValueError(f"{KEY}.resolution must be [width, height] or null, got {resolution!r}")
        self.resolution = None if resolution is None else [_int(v, "resolution") for v in resolution]
        self.sample_fps = sample_fps
        self.seed = _int(seed, "seed", minimum=0)
        self.prompts = read_prompts(prompts) if isinstance(prompts, str) else [str(p) for p in prompts or ()]
        self.metric_names = list(metrics or ())
        unknown = [m for m in self.metric_names if m not in METRICS]
        if unknown:
            raise ValueError(f"{KEY}.metrics: unknown metric {unknown[0]!r}; valid metrics: {', '.join(METRICS)}")
        options = {name: None if value in (None, "") else str(Path(value).expanduser()) for name, value in (
            ("reference", reference), ("i3d_weights", i3d_weights), ("clip_weights", clip_weights),
            ("raft_weights", raft_weights))}
        for name in self.metric_names:
            for need in METRICS[name].needs:
                if not options[need] or not Path(options[need]).exists():
                    raise FileNotFoundError(f"{KEY}.metrics: {name} needs {KEY}.{need} (an existing "
                                            f"{'folder of mp4 files' if need == 'reference' else 'file'}), got "
                                            f"{options[need]!r}")
        if self.metric_names and not self.prompts:
            raise ValueError(f"{KEY}.metrics needs {KEY}.prompts (a list, or a .txt/.json prompt file)")
        if not self.shards and not self.prompts:
            raise ValueError(f"{KEY}.enabled is true but there is nothing to evaluate: give {KEY}.shards (held-out "
                             f"loss) and/or {KEY}.prompts (videos, {KEY}.metrics)")
        self.seeds = _int(seeds, "seeds")
        self.sampling = {"steps": steps, "guidance": guidance, "sampler": sampler}
        self.fps = _int(fps, "fps")
        self.options = options
        self.clip_arch = clip_arch
        self.cache_dir = None if cache_dir in (None, "none") else str(Path(cache_dir).expanduser())
        numbers = (["eval/loss"] if self.shards else []) + [f"eval/{m}" for m in self.metric_names]
        if monitor not in numbers:
            raise ValueError(f"{KEY}.monitor={monitor!r} is not a number this evaluation reports; choose one of "
                             f"{numbers}")
        if mode not in ("min", "max"):
            raise ValueError(f"{KEY}.mode must be min or max, got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best_checkpoint = None if best_checkpoint in (None, "", "none") else Path(best_checkpoint)
        self.output_dir = Path(output_dir)
        self._held_out: list | None = None
        self._metrics = None

    # ------------------------------------------------------------------ Lightning hooks
    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step} if self.enabled else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_step = state_dict.get("best"), state_dict.get("best_step")

    def setup(self, trainer, pl_module, stage: str) -> None:
        """What needs the model and the data module is checked before the first step (one line, as config errors)."""
        if not self.enabled or stage != "fit":
            return
        from vgen.config import ConfigError

        try:
            eval_timesteps(self.timesteps, pl_module.diffusion.param.num_timesteps)
            self._shape(trainer)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.enabled and step and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and not preempted(trainer) and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ evaluation
    def _shape(self, trainer) -> tuple[int, int, int, float]:
        """(frames, width, height, sample fps): this callback's, else the training data's."""
        data = trainer.datamodule
        frames = self.num_frames or getattr(data, "num_frames", None)
        width, height = self.resolution or (getattr(data, "width", None), getattr(data, "height", None))
        fps = self.sample_fps or getattr(data, "sample_fps", None) or getattr(data, "fps", None) or self.fps
        if frames is None or width is None or height is None:
            raise ValueError(f"{KEY}: set num_frames and resolution (the training data module has none to follow)")
        return frames, width, height, fps

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        """Evaluate now (every rank), log, and keep the best checkpoint; returns the scalars."""
        step = self._last_step = trainer.global_step
        unet = pl_module.unet
        was_training, saved_rng = unet.training, rng.capture()
        unet.eval()
        try:
            scalars = self._loss(trainer, pl_module) if self.shards else {}
            rows = []
            if self.prompts:
                numbers, rows = self._sample_and_score(trainer, pl_module, step)
                scalars.update(numbers)
        finally:
            unet.train(was_training)
            rng.restore(saved_rng)
        self._log(trainer, step, scalars, rows)
        self._keep_best(trainer, step, scalars)
        return scalars

    def _loss(self, trainer, pl_module) -> dict[str, float]:
        frames, width, height, fps = self._shape(trainer)
        timesteps = eval_timesteps(self.timesteps, pl_module.diffusion.param.num_timesteps)
        if self._held_out is None:
            data = trainer.datamodule
            options = {"sample_fps": fps, "video_backend": getattr(data, "video_backend", "pyav"),
                       "conditions": tuple(getattr(data, "conditions", ()) or ()),
                       "cues": bool(getattr(data, "cues", False))}
            sources = held_out_samples(self.shards, options, frames, width, height, self.samples_per_source,
                                       self.seed)
            self._held_out = rank_batches(sources, trainer.global_rank, trainer.world_size, self.batch_size)
        sums = held_out_loss(pl_module, self._held_out, timesteps, self.seed,
                             trainer.precision_plugin.forward_context())
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        per_t = (sums[:-1] / sums[-1]).tolist()
        return {"eval/loss": float(sum(per_t) / len(per_t)),
                **{f"eval/loss_t{t:04d}": v for t, v in zip(timesteps, per_t, strict=True)}}

    def _sample_and_score(self, trainer, pl_module, step: int) -> tuple[dict[str, float], list[dict]]:
        from torch.distributed.tensor import DTensor

        from vgen.eval.metrics import Extractors, build_metrics
        from vgen.eval.run import Prompt, evaluate, pipeline_units
        from vgen.media import to_uint8_frames, write_mp4
        from vgen.pipeline import VideoPipeline

        frames, width, height, _ = self._shape(trainer)
        if self._metrics is None:
            extractors = Extractors(device=pl_module.device, clip_arch=self.clip_arch, **{
                k: v for k, v in self.options.items() if k != "reference"})
            self._metrics = build_metrics(self.metric_names, extractors)
        pipe = VideoPipeline.from_stage(pl_module)
        prompts = [p if isinstance(p, Prompt) else Prompt(p) for p in self.prompts]
        if pipe.needs_reference and any(p.image is None for p in prompts):
            raise ValueError(f"{KEY}.prompts: the model is image-to-video: give a .json prompt file with a first "
                             "frame (\"image\") for every prompt")
        units = pipeline_units(prompts, self.seeds, self.seed, self.batch_size, self.output_dir / f"step_{step:07d}")

        def sample(unit) -> list:
            images = None
            if any(item.image is not None for item in unit):
                from vgen.sample import load_image

                images = torch.cat([load_image(str(item.image), height, width) for item in unit])
            videos = pipe([item.prompt for item in unit], seed=unit[0].seed, images=images, fps=self.fps,
                          num_frames=frames, height=height, width=width, **self.sampling)
            return [to_uint8_frames(v) for v in videos]

        def write(unit, videos: list) -> list:
            for item, video in zip(unit, videos, strict=True):
                write_mp4(video, item.video, fps=self.fps)
            return videos

        sharded = any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in pl_module.unet.parameters())
        made = {id(unit): sample(unit) for unit in units} if sharded else {}  # every rank: collective forwards

        def produce(unit) -> list:
            return write(unit, made[id(unit)] if sharded else sample(unit))

        reference = sorted(Path(self.options["reference"]).glob("*.mp4")) if self.options["reference"] else []
        report = evaluate(self._metrics, units, produce, reference=reference, cache_dir=self.cache_dir,
                          batch_size=self.batch_size)
        return {f"eval/{k}": float(v) for k, v in report.metrics.items()}, report.rows

    # ------------------------------------------------------------------ logging and the best checkpoint
    def _log(self, trainer, step: int, scalars: dict[str, float], rows: list[dict]) -> None:
        if not trainer.is_global_zero:
            return
        shown = ", ".join(f"{k} {v:.6g}" for k, v in scalars.items() if not k.startswith("eval/loss_t"))
        log.info("step %d: evaluation: %s", step, shown or f"{len(rows)} videos")
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=step)
            if isinstance(logger, WandbLogger) and rows:
                import wandb

                scores = [k for k in rows[0] if k not in ("index", "prompt", "seed", "video")]
                table = wandb.Table(columns=["prompt", "seed", "video", *scores])
                for row in rows:
                    table.add_data(row["prompt"], row["seed"], wandb.Video(row["video"], format="mp4"),
                                   *(row[k] for k in scores))
                logger.experiment.log({"eval/table": table, "eval/videos": [
                    wandb.Video(row["video"], caption=row["prompt"], format="mp4") for row in rows],
                    "trainer/global_step": step})
            logger.save()

    def _keep_best(self, trainer, step: int, scalars: dict[str, float]) -> None:
        if self.best_checkpoint is None:
            return
        value = scalars.get(self.monitor, float("nan"))
        better = math.isfinite(value) and (self.best is None or (value < self.best if self.mode == "min"
                                                                  else value > self.best))
        if not trainer.strategy.broadcast(better, src=0):  # one decision: the save is collective
            return
        self.best, self.best_step = value, step
        trainer.save_checkpoint(self.best_checkpoint)  # every rank; written under a temporary name, then renamed
        if trainer.is_global_zero:
            log.info("step %d: %s %.6g is the best so far: wrote %s", step, self.monitor, value, self.best_checkpoint)
