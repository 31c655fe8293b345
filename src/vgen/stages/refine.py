"""The refinement model of the I2VGen-XL cascade (SR600-style): a text-conditioned video UNet for high resolution.

Inference (SDEdit): the base model's low-resolution video is resized to the target size, VAE-encoded, noised
to level ``noise_levels - 1`` (700 levels in VGen's SR600 inference: t=699) and denoised from there with the
brief text. Training therefore covers exactly that range: the stage-3 objective on high-quality high-resolution
clips with ``t ~ U{0, ..., noise_levels - 1}``.

VGen inverts with 30 DDIM steps and re-samples with DPM++(2M) SDE; here the noising is either the forward
process (``invert=False``, SDEdit) or deterministic DDIM inversion (``invert=True``), and the re-sampling is DDIM
with classifier-free guidance against the negative prompt.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vgen.diffusion import Parameterization, ddim_invert, guided_output
from vgen.stages.hq import HQFinetuneStage


def sdedit_timesteps(noise_levels: int, steps: int) -> list[int]:
    """``steps`` decreasing timesteps from ``noise_levels - 1`` (evenly spaced, distinct), then -1 (= clean)."""
    if not 1 <= steps <= noise_levels:
        raise ValueError(f"refine steps must be in [1, {noise_levels}], got {steps}")
    start = noise_levels - 1
    times = [round(start - i * start / steps) for i in range(steps)]
    return times + [-1]


def denoise_from(model, x: torch.Tensor, param: Parameterization, timesteps: Sequence[int], *, cond: dict,
                 uncond: dict | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM from ``x`` at ``timesteps[0]`` through the rest; a last timestep of -1 returns the x0
    prediction of the step before it (no leftover noise)."""
    for t_now, t_next in itertools.pairwise(timesteps):
        t = torch.full((x.shape[0],), t_now, dtype=torch.long, device=x.device)
        x0 = param.predict_x0(guided_output(model, x, t, cond, uncond, guidance_scale), x, t)
        if t_next < 0:
            return x0
        eps = param.eps_from_x0(x0, x, t)
        ab_next = param.schedule.alpha_bar(torch.full_like(t, t_next), x)
        x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
    return x


class RefinementStage(HQFinetuneStage):
    def __init__(self, unet: nn.Module, *args, noise_levels: int = 700, **kwargs):
        super().__init__(unet, *args, **kwargs)
        total = self.diffusion.param.num_timesteps
        if isinstance(noise_levels, bool) or not isinstance(noise_levels, int) or not 1 <= noise_levels <= total:
            raise ValueError(f"stage.noise_levels must be an integer in [1, {total}], got {noise_levels!r}")
        self.noise_levels = noise_levels

    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        return torch.randint(0, self.noise_levels, (batch_size,), device=self.device)

    @torch.no_grad()
    def refine(
        self,
        videos: torch.Tensor,
        prompts: list[str],
        *,
        height: int,
        width: int,
        steps: int = 30,
        guidance: float | None = None,
        noise_levels: int | None = None,
        invert: bool = False,
        negative_prompt: str | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Low-resolution videos [B, 3, F, h, w] in [-1, 1] -> refined videos [B, 3, F, height, width]."""
        if videos.ndim != 5 or videos.shape[1] != 3 or videos.shape[0] != len(prompts):
            raise ValueError(f"videos must be [B={len(prompts)}, 3, F, H, W] in [-1, 1], got {tuple(videos.shape)}")
        levels = noise_levels or self.noise_levels
        b, _, frames = videos.shape[:3]
        videos = videos.to(self.device, torch.float32)
        folded = videos.transpose(1, 2).reshape(b * frames, 3, *videos.shape[-2:])
        folded = F.interpolate(folded, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        upsampled = folded.reshape(b, frames, 3, height, width).transpose(1, 2).clamp(-1, 1)
        latents = self.vae.encode(upsampled)
        text = self.encode_text(prompts)
        negative = (self.negative_embedding(b) if negative_prompt is None
                    else self.encode_text([negative_prompt]).expand(b, -1, -1))
        cond, uncond = {"text": text}, {"text": negative}
        param = self.diffusion.param
        was_training = self.unet.training
        self.unet.eval()
        try:
            if invert:
                x = ddim_invert(self.unet, latents, param, steps, model_kwargs=uncond, num_levels=levels)
            else:
                generator = torch.Generator(device=self.device).manual_seed(seed)
                noise = self.diffusion.noise(latents.shape, generator=generator, device=self.device)
                t = torch.full((b,), levels - 1, dtype=torch.long, device=self.device)
                x = param.q_sample(latents, t, noise)
            scale = self.diffusion.guidance_scale if guidance is None else guidance
            latents = denoise_from(self.unet, x, param, sdedit_timesteps(levels, steps), cond=cond, uncond=uncond,
                                   guidance_scale=scale)
        finally:
            self.unet.train(was_training)
        return self.vae.decode(latents).clamp(-1, 1)
