"""Training noise and the per-sample diffusion MSE loss (VGen ``DiffusionDDIM.loss``, loss_type mse)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vgen.diffusion.parameterization import Parameterization

Denoiser = Callable[..., torch.Tensor]


def frame_noise(
    shape: tuple[int, ...] | torch.Size,
    frame_correlation: float = 0.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit-variance Gaussian noise for [B, C, F, H, W] clips, ``frame_correlation`` of whose variance is shared by
    all frames of a clip (PYoCo's "mixed" noise: sqrt(rho) shared + sqrt(1 - rho) per-frame, rho = correlation).

    ``frame_correlation = 0`` is plain N(0, I), drawn exactly as ``torch.randn(shape)`` (same random stream).
    """
    if not 0.0 <= frame_correlation < 1.0:
        raise ValueError(f"frame_correlation must be in [0, 1), got {frame_correlation}")
    noise = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if frame_correlation and len(shape) == 5 and shape[2] > 1:
        shared = torch.randn((*shape[:2], 1, *shape[3:]), generator=generator, dtype=dtype, device=device)
        noise = (1.0 - frame_correlation) ** 0.5 * noise + frame_correlation**0.5 * shared
    return noise


def training_noise(
    like: torch.Tensor,
    offset_noise_strength: float = 0.1,
    generator: torch.Generator | None = None,
    frame_correlation: float = 0.0,
) -> torch.Tensor:
    """:func:`frame_noise` like ``like`` plus ``offset_noise_strength`` * N(0, 1) of shape [B, C, F, 1, 1].

    The offset is one value per (sample, channel, frame), constant over the two trailing (spatial) dims.
    """
    noise = frame_noise(like.shape, frame_correlation, generator, like.dtype, like.device)
    if offset_noise_strength:
        offset_shape = (*like.shape[:-2], 1, 1)
        offset = torch.randn(offset_shape, generator=generator, dtype=like.dtype, device=like.device)
        noise = noise + offset_noise_strength * offset
    return noise


def sample_timesteps(
    batch_size: int,
    num_timesteps: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
) -> torch.Tensor:
    """One integer training timestep in [0, T) per sample (int64).

    ``shift = 1``: uniform, drawn as ``torch.randint`` (the original). ``shift > 1`` moves the draws towards high
    noise: t = floor(T * s u / (1 + (s - 1) u)) with u ~ U[0, 1) (the timestep shift of SD3 / "simple diffusion"
    applied to the training distribution); e.g. s = 4 puts 17% of the draws in the noisiest 5% of the schedule,
    where a model learns the layout it must invent when sampling. ``shift < 1`` favours low noise.
    """
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    if shift == 1.0:
        return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    shifted = shift * u / (1.0 + (shift - 1.0) * u)
    return (shifted * num_timesteps).long().clamp_(0, num_timesteps - 1)


def diffusion_loss(
    model: Denoiser,
    param: Parameterization,
    x0: torch.Tensor,
    model_kwargs: dict[str, Any] | None = None,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    offset_noise_strength: float = 0.1,
    frame_correlation: float = 0.0,
    weight: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    timestep_shift: float = 1.0,
) -> torch.Tensor:
    """Per-sample loss [B]: mean over non-batch dims of (model(x_t, t) - target)^2.

    ``t`` defaults to :func:`sample_timesteps` (uniform, or shifted by ``timestep_shift``) and ``noise`` to
    :func:`training_noise` (an explicit ``noise`` gets no offset and no frame correlation). ``weight`` ([B] or
    broadcastable to x0) scales the squared error. ``loss_mask`` (DreamVideo's subject mask, at latent resolution and
    broadcastable to x0, e.g. [B, 1, F, h, w] from :func:`latent_mask`) multiplies both output and target, the mean
    still being over every element: what lies outside the mask adds 0, and the denominator is the full count.
    """
    if loss_mask is not None:
        try:
            torch.broadcast_shapes(loss_mask.shape, x0.shape)
        except RuntimeError:
            raise ValueError(f"loss_mask {tuple(loss_mask.shape)} does not broadcast to the latents "
                             f"{tuple(x0.shape)}: give it at latent resolution ([B, 1, F, h, w]; "
                             "vgen.diffusion.loss.latent_mask downsamples a pixel mask)") from None
    if t is None:
        t = sample_timesteps(x0.shape[0], param.num_timesteps, x0.device, generator, timestep_shift)
    if noise is None:
        noise = training_noise(x0, offset_noise_strength, generator, frame_correlation)
    x_t = param.q_sample(x0, t, noise)
    output = model(x_t, t, **(model_kwargs or {}))
    target = param.target(x0, noise, t)
    if loss_mask is not None:
        output, target = output * loss_mask, target * loss_mask
    squared_error = (output - target) ** 2
    if weight is not None:
        squared_error = squared_error * _per_sample_view(weight, x0)
    return squared_error.flatten(1).mean(dim=1)


def latent_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A pixel mask [B, 1, F, H, W] (or [B, 1, H, W] for every frame) at the resolution of ``latents``
    [B, C, F, h, w]: nearest-neighbour (pixel-centre sampling, as PIL's NEAREST that DreamVideo resizes its masks
    with), values kept (a binary mask stays binary), as ``latents``' dtype and device: the ``loss_mask`` of
    :func:`diffusion_loss`."""
    if mask.ndim == 4:
        mask = mask[:, :, None]
    if mask.ndim != 5 or mask.shape[1] != 1 or mask.shape[0] not in (1, latents.shape[0]):
        raise ValueError(f"mask must be [B, 1, F, H, W] or [B, 1, H, W] for latents {tuple(latents.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask.shape[2] not in (1, latents.shape[2]):
        raise ValueError(f"mask has {mask.shape[2]} frames but the latents {latents.shape[2]}")
    resized = F.interpolate(mask.float(), size=(mask.shape[2], *latents.shape[-2:]), mode="nearest-exact")
    return resized.to(device=latents.device, dtype=latents.dtype)


def _per_sample_view(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if weight.ndim == 1:
        return weight.view(-1, *([1] * (like.ndim - 1)))
    return weight
