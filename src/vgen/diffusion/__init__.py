"""Gaussian diffusion for VGen: schedules, eps/v/x0 parameterisation, training loss, DDIM (no Lightning)."""

from vgen.diffusion.build import Diffusion, build_diffusion
from vgen.diffusion.embedding import sinusoidal_embedding
from vgen.diffusion.lcm import boundary_scalings, consistency_distillation_loss, lcm_sample, lcm_timesteps
from vgen.diffusion.loss import diffusion_loss, frame_noise, latent_mask, sample_timesteps, training_noise
from vgen.diffusion.parameterization import PREDICTIONS, Parameterization
from vgen.diffusion.samplers import (
    ddim_invert,
    ddim_sample,
    ddim_step,
    denoise_from,
    guided_output,
    sdedit_timesteps,
)
from vgen.diffusion.schedules import (
    BETA_SCHEDULES,
    NoiseSchedule,
    beta_schedule,
    cosine_sigmas,
    ddim_timesteps,
    logsnr_cosine_interp_sigmas,
    rescale_zero_terminal_snr,
)

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTIONS",
    "Diffusion",
    "NoiseSchedule",
    "Parameterization",
    "beta_schedule",
    "boundary_scalings",
    "build_diffusion",
    "consistency_distillation_loss",
    "cosine_sigmas",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "denoise_from",
    "diffusion_loss",
    "frame_noise",
    "guided_output",
    "latent_mask",
    "lcm_sample",
    "lcm_timesteps",
    "logsnr_cosine_interp_sigmas",
    "rescale_zero_terminal_snr",
    "sample_timesteps",
    "sdedit_timesteps",
    "sinusoidal_embedding",
    "training_noise",
]
