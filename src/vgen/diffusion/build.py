"""One object per configured diffusion process, built from the ``conf/diffusion/*.yaml`` files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vgen.diffusion.loss import Denoiser, diffusion_loss, frame_noise
from vgen.diffusion.parameterization import Parameterization
from vgen.diffusion.samplers import ddim_sample
from vgen.diffusion.schedules import DDIM_SPACINGS, NoiseSchedule, beta_schedule


@dataclass(frozen=True)
class Diffusion:
    """A parameterised schedule plus the training and sampling settings of one recipe."""

    param: Parameterization
    offset_noise_strength: float = 0.1
    frame_noise_correlation: float = 0.0
    timestep_shift: float = 1.0
    ddim_steps: int = 50
    ddim_eta: float = 0.0
    guidance_scale: float = 9.0
    ddim_spacing: str = "leading"

    @property
    def schedule(self) -> NoiseSchedule:
        return self.param.schedule

    def loss(self, model: Denoiser, x0: torch.Tensor, model_kwargs: dict[str, Any] | None = None, **kwargs):
        """Per-sample training loss [B]; see :func:`vgen.diffusion.loss.diffusion_loss` for ``kwargs``."""
        kwargs.setdefault("offset_noise_strength", self.offset_noise_strength)
        kwargs.setdefault("frame_correlation", self.frame_noise_correlation)
        kwargs.setdefault("timestep_shift", self.timestep_shift)
        return diffusion_loss(model, self.param, x0, model_kwargs, **kwargs)

    def noise(self, shape, generator: torch.Generator | None = None, dtype=None, device=None) -> torch.Tensor:
        """Sampling noise x_T (and any fresh noise): N(0, I) with this recipe's frame correlation, no offset."""
        return frame_noise(shape, self.frame_noise_correlation, generator, dtype, device)

    def sample(self, model: Denoiser, x_T: torch.Tensor, **kwargs) -> torch.Tensor:
        """DDIM with this recipe's defaults; ``kwargs`` as in :func:`vgen.diffusion.samplers.ddim_sample`."""
        kwargs.setdefault("steps", self.ddim_steps)
        kwargs.setdefault("eta", self.ddim_eta)
        kwargs.setdefault("guidance_scale", self.guidance_scale)
        kwargs.setdefault("frame_correlation", self.frame_noise_correlation)
        kwargs.setdefault("spacing", self.ddim_spacing)
        return ddim_sample(model, x_T, self.param, **kwargs)


def build_diffusion(
    schedule: str = "cosine",
    num_timesteps: int = 1000,
    zero_terminal_snr: bool = False,
    prediction: str = "v",
    offset_noise_strength: float = 0.1,
    frame_noise_correlation: float = 0.0,
    timestep_shift: float = 1.0,
    ddim_steps: int = 50,
    ddim_eta: float = 0.0,
    guidance_scale: float = 9.0,
    ddim_spacing: str = "leading",
    **schedule_kwargs: Any,
) -> Diffusion:
    """Hydra entry point; ``schedule_kwargs`` go to :func:`beta_schedule` (cosine_s, init_beta, last_beta)."""
    if not 0.0 <= frame_noise_correlation < 1.0:
        raise ValueError(f"diffusion.frame_noise_correlation must be in [0, 1), got {frame_noise_correlation}")
    if not isinstance(timestep_shift, (int, float)) or timestep_shift <= 0:
        raise ValueError(f"diffusion.timestep_shift must be a number > 0 (1 = uniform training timesteps), "
                         f"got {timestep_shift!r}")
    if ddim_spacing not in DDIM_SPACINGS:
        raise ValueError(f"diffusion.ddim_spacing must be one of {', '.join(DDIM_SPACINGS)}, got {ddim_spacing!r}")
    betas = beta_schedule(schedule, num_timesteps, zero_terminal_snr=zero_terminal_snr, **schedule_kwargs)
    return Diffusion(
        param=Parameterization(NoiseSchedule(betas), prediction),
        offset_noise_strength=offset_noise_strength,
        frame_noise_correlation=frame_noise_correlation,
        timestep_shift=float(timestep_shift),
        ddim_steps=ddim_steps,
        ddim_eta=ddim_eta,
        guidance_scale=guidance_scale,
        ddim_spacing=ddim_spacing,
    )
