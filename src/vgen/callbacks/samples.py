"""Validation videos: sample fixed prompts every N steps, save mp4 files and log them to W&B."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from vgen.callbacks.preemption import preempted
from vgen.media import to_uint8_frames, write_mp4

log = logging.getLogger(__name__)


class SampleVideos(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training) samples ``prompts``.

    Every rank runs the sampler with the same prompts, seed and first frames (under ZeRO-3 and FSDP2 each
    forward gathers the sharded weights collectively, so a rank-0-only forward would hang); rank 0 alone writes
    the files and logs them. Image-conditioned models take their first frames from rank 0's first training batch
    (decoded from its latents for latent-cache batches). Files go to ``<output_dir>/step_XXXXXXX_<i>.mp4``;
    W&B gets them as ``val/videos``.
    """

    def __init__(self, prompts: list[str], every_n_steps: int = 500, num_frames: int = 8, height: int = 32,
                 width: int = 32, steps: int = 25, guidance: float | None = None, seed: int = 0, fps: int = 8,
                 output_dir: str = "samples"):
        if every_n_steps <= 0:
            raise ValueError(f"callbacks.sample_videos.every_n_steps must be > 0, got {every_n_steps}")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.kwargs = {"num_frames": num_frames, "height": height, "width": width, "steps": steps, "guidance": guidance,
                           "seed": seed, "fps": fps}
        self.fps = fps
        self.output_dir = Path(output_dir)
        self._images: torch.Tensor | None = None
        self._last_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._images is None and pl_module.image_conditioned and self.prompts:
            if "video" in batch:
                first = batch["video"][:, :, 0]
            else:  # latent-cache batch: decode the first frames (every rank: the VAE may be sharded)
                with torch.no_grad():
                    first = pl_module.vae.decode(batch["latent"][:, :, :1])[:, :, 0].clamp(-1, 1)
            reps = -(-len(self.prompts) // first.shape[0])
            images = first.repeat(reps, 1, 1, 1)[: len(self.prompts)].detach().clone()
            # rank 0's frames on every rank: all ranks sample the same videos
            self._images = trainer.strategy.broadcast(images, src=0) if trainer.world_size > 1 else images

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step and step % self.every_n_steps == 0 and step != self._last_step:
            self._sample(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        if preempted(trainer):  # SLURM is stopping the job: no sampling after the preemption checkpoint
            return
        if trainer.global_step != self._last_step:
            self._sample(trainer, pl_module, trainer.global_step)

    def _sample(self, trainer, pl_module, step: int) -> None:
        self._last_step = step
        if not self.prompts:
            return
        from vgen.pipeline import VideoPipeline

        videos = VideoPipeline.from_stage(pl_module)(self.prompts, images=self._images, **self.kwargs)  # every rank
        if not trainer.is_global_zero:
            return
        paths = [write_mp4(to_uint8_frames(v), self.output_dir / f"step_{step:07d}_{i}.mp4", fps=self.fps)
                 for i, v in enumerate(videos)]
        log.info("step %d: wrote %d sample videos to %s", step, len(paths), self.output_dir)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"val/videos": [wandb.Video(str(p), caption=c, format="mp4")
                                                      for p, c in zip(paths, self.prompts)],
                                       "trainer/global_step": step})
