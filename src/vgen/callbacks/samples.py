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
    """Every ``every_n_steps`` optimizer steps (and at the end of training) rank 0 samples ``prompts``.

    Image-conditioned models take their first frames from the first training batch seen.
    Files go to ``<output_dir>/samples/step_XXXXXXX_<i>.mp4``; W&B gets them as ``val/videos``.
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
        if self._images is None and pl_module.image_conditioned and batch["video"].shape[0] >= 1:
            first = batch["video"][:, :, 0]
            reps = -(-len(self.prompts) // first.shape[0])
            self._images = first.repeat(reps, 1, 1, 1)[: len(self.prompts)].detach().clone()

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
        if not trainer.is_global_zero or not self.prompts:
            return
        videos = pl_module.generate(self.prompts, images=self._images, **self.kwargs)
        paths = [write_mp4(to_uint8_frames(v), self.output_dir / f"step_{step:07d}_{i}.mp4", fps=self.fps)
                 for i, v in enumerate(videos)]
        log.info("step %d: wrote %d sample videos to %s", step, len(paths), self.output_dir)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"val/videos": [wandb.Video(str(p), caption=c, format="mp4")
                                                      for p, c in zip(paths, self.prompts)],
                                       "trainer/global_step": step})
