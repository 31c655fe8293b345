"""One object per configured diffusion process, built from the ``conf/diffusion/*.yaml`` files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vgen.diffusion.loss import Denoiser, diffusion_loss
from vgen.diffusion.parameterization import Parameterization
from vgen.diffusion.samplers import ddim_sample
from vgen.diffusion.schedules import NoiseSchedule, beta_schedule


@dataclass(frozen=True)
class Diffusion:
    """A parameterised schedule plus the training and sampling settings of one recipe."""

    param: Parameterization
    offset_noise_strength: float = 0.1
    ddim_steps: int = 50
    ddim_eta: float = 0.0
    guidance_scale: float = 9.0

    @property
    def schedule(self) -> NoiseSchedule:
        return self.param.schedule

    def loss(self, model: Denoiser, x0: torch.Tensor, model_kwargs: dict[str, Any] | None = None, **kwargs):
        """Per-sample training loss [B]; see :func:`vgen.diffusion.loss.diffusion_loss` for ``kwargs``."""
        kwargs.setdefault("offset_noise_strength", self.offset_noise_strength)
        return diffusion_loss(model, self.param, x0, model_kwargs, **kwargs)

    def sample(self, model: Denoiser, x_T: torch.Tensor, **kwargs) -> torch.Tensor:
        """DDIM with this recipe's defaults; ``kwargs`` as in :func:`vgen.diffusion.samplers.ddim_sample`."""
        kwargs.setdefault("steps", self.ddim_steps)
        kwargs.setdefault("eta", self.ddim_eta)
        kwargs.setdefault("guidance_scale", self.guidance_scale)
        return ddim_sample(model, x_T, self.param, **kwargs)


def build_diffusion(
    schedule: str = "cosine",
    num_timesteps: int = 1000,
    zero_terminal_snr: bool = False,
    prediction: str = "v",
    offset_noise_strength: float = 0.1,
    ddim_steps: int = 50,
    ddim_eta: float = 0.0,
    guidance_scale: float = 9.0,
    **schedule_kwargs: Any,
) -> Diffusion:
    """Hydra entry point; ``schedule_kwargs`` go to :func:`beta_schedule` (cosine_s, init_beta, last_beta)."""
    betas = beta_schedule(schedule, num_timesteps, zero_terminal_snr=zero_terminal_snr, **schedule_kwargs)
    return Diffusion(
        param=Parameterization(NoiseSchedule(betas), prediction),
        offset_noise_strength=offset_noise_strength,
        ddim_steps=ddim_steps,
        ddim_eta=ddim_eta,
        guidance_scale=guidance_scale,
    )
