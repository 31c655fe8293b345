"""The refinement model of the I2VGen-XL cascade (SR600-style): a text-conditioned video UNet for high resolution.

Inference (SDEdit, :meth:`vgen.pipeline.VideoPipeline.refine`): the base model's low-resolution video is resized
to the target size, VAE-encoded, noised to level ``noise_levels - 1`` (700 levels in VGen's SR600 inference: t=699)
and denoised from there with the brief text. Training therefore covers exactly that range: the stage-3 objective
on high-quality high-resolution clips with ``t ~ U{0, ..., noise_levels - 1}``.
"""

from __future__ import annotations

import torch
from torch import nn

from vgen.stages.hq import HQFinetuneStage


class RefinementStage(HQFinetuneStage):
    def __init__(self, unet: nn.Module, *args, noise_levels: int = 700, **kwargs):
        super().__init__(unet, *args, **kwargs)
        total = self.diffusion.param.num_timesteps
        if isinstance(noise_levels, bool) or not isinstance(noise_levels, int) or not 1 <= noise_levels <= total:
            raise ValueError(f"stage.noise_levels must be an integer in [1, {total}], got {noise_levels!r}")
        self.noise_levels = noise_levels

    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        return torch.randint(0, self.noise_levels, (batch_size,), device=self.device)
