"""Seeded random video batches for strategy checks, resume checks, memory benchmarks and ``vgen.plan``.

Sample ``j`` of the run (counting over all ranks) is a pure function of ``(seed, j)``: its pixels, its caption
and its ``noise_seed``, from which the stage draws the sample's diffusion timestep and noise. Rank ``r`` of
``W`` takes samples ``[(i * W + r) * b, (i * W + r + 1) * b)`` at micro-batch ``i``. So

* the global batch of a step is the same for any world size with the same ``batch_size * world_size``
  (one process with batch 4 sees exactly what two ranks with batch 2 see together), and
* the stream restarts at the right place after a resume: the position is the restored global step times
  ``accumulate_grad_batches``, so no loader state has to be saved.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from vgen.data.condition_maps import parse_conditions

CAPTIONS = ("a red circle moving left", "a green square moving right", "a blue triangle moving down",
            "a yellow circle moving up")


class _Batches(IterableDataset):
    def __init__(self, start: int, rank: int, world_size: int, batch_size: int, shape: tuple[int, ...], seed: int,
                 fps: int, seeded_noise: bool, conditions: tuple = ()):
        super().__init__()
        self.start, self.rank, self.world_size = start, rank, world_size
        self.batch_size, self.shape, self.seed, self.fps = batch_size, shape, seed, fps
        self.seeded_noise, self.conditions = seeded_noise, conditions

    def __iter__(self):
        micro = self.start
        while True:
            first = (micro * self.world_size + self.rank) * self.batch_size
            yield make_batch(range(first, first + self.batch_size), self.shape, self.seed, self.fps,
                             self.seeded_noise, self.conditions)
            micro += 1


def make_batch(indices: Sequence[int], shape: tuple[int, ...], seed: int, fps: int = 8,
               seeded_noise: bool = True, conditions: tuple = ()) -> dict:
    """The batch of the given global sample indices: ``video`` [B, 3, F, H, W] in [-1, 1] and its metadata.

    With ``seeded_noise`` the batch carries each sample's ``noise_seed``; without it the stage draws noise and
    timesteps from the global generator (as with real data). ``conditions`` (:class:`vgen.data.condition_maps.
    ConditionMap`) are extracted from each clip, as the data stream does.
    """
    videos = []
    for j in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + j)
        videos.append(torch.rand(shape, generator=g) * 2 - 1)
    batch = {
        "video": torch.stack(videos),
        "caption": [CAPTIONS[j % len(CAPTIONS)] for j in indices],
        "key": [f"synthetic-{j:09d}" for j in indices],
        "fps": torch.full((len(indices),), fps, dtype=torch.long),
        "kind": "video" if shape[1] > 1 else "image",
    }
    if seeded_noise:
        batch["noise_seed"] = torch.tensor([seed * 1_000_003 + j + 7919 for j in indices], dtype=torch.long)
    for condition in conditions:
        maps = []
        for j, video in zip(indices, batch["video"]):
            pixels = ((video + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
            maps.append(condition({}, pixels, None, random.Random(seed * 1_000_003 + j)))
        batch[condition.name] = torch.stack(maps)
    return batch


class SyntheticVideoData(L.LightningDataModule):
    """Endless random clips (``batch_size`` per rank, ``num_frames`` x ``resolution`` = [width, height]).

    ``seeded_noise``: give every sample its own diffusion-noise seed (world-size independent trajectories);
    ``False`` leaves noise, timesteps and CFG dropout to the global generators, as with real data.
    """

    def __init__(self, batch_size: int = 2, num_frames: int = 4, resolution: Sequence[int] = (32, 32), seed: int = 0,
                 fps: int = 8, seeded_noise: bool = True, conditions: Mapping | None = None):
        super().__init__()
        for key, value in (("batch_size", batch_size), ("num_frames", num_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key} must be an integer >= 1, got {value!r}")
        if len(resolution) != 2 or min(resolution) < 1:
            raise ValueError(f"data.resolution must be [width, height] of positive integers, got {resolution!r}")
        self.batch_size, self.num_frames, self.seed, self.fps = batch_size, num_frames, seed, fps
        self.width, self.height = int(resolution[0]), int(resolution[1])
        self.seeded_noise = seeded_noise
        self.conditions = parse_conditions(conditions)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shape = (3, self.num_frames, self.height, self.width)
        dataset = _Batches(start, rank, world, self.batch_size, shape, self.seed, self.fps, self.seeded_noise,
                           self.conditions)
        return DataLoader(dataset, batch_size=None, num_workers=0)
