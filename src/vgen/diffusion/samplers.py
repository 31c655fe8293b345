"""Samplers as pure functions of (model, x, parameterisation, conditions), around one DDIM update, :func:`ddim_step`.

The model is called as ``model(x, t, **kwargs)`` with ``t`` int64 [B] and returns its raw output (eps, v or x0,
per ``param.prediction``). Conditions are dicts of model kwargs (:func:`vgen.models.conditions.classifier_free.
guidance_pair` builds the unconditional one). Nothing here disables autograd: wrap calls in ``torch.no_grad()``
for plain inference, or leave it on to backpropagate through sampling steps (reward fine-tuning).

* :func:`ddim_sample` -- DDIM from pure noise (+ classifier-free guidance, eta), VGen's ``ddim_sample_loop``;
* :func:`ddim_invert` -- deterministic DDIM inversion, clean latent -> noisy latent;
* :func:`denoise_from` -- deterministic DDIM over any decreasing timesteps from a partly noised latent (SDEdit
  refinement, the reward-fine-tuning chain); :func:`sdedit_timesteps` gives the refiner's;
* :func:`vgen.diffusion.lcm.lcm_sample` -- multistep consistency sampling, whose re-noising is a DDIM step too.

The registry ``vgen.sample sampler=`` chooses from is :data:`vgen.pipeline.SAMPLERS`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vgen.diffusion.loss import Denoiser, frame_noise
from vgen.diffusion.parameterization import Parameterization
from vgen.diffusion.schedules import ddim_timesteps

StepCallback = Callable[[dict[str, Any]], None]


def ddim_step(
    param: Parameterization,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t_to: torch.Tensor,
    *,
    t_from: torch.Tensor | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    frame_correlation: float = 0.0,
) -> torch.Tensor:
    """The DDIM update: the point at level ``t_to`` of the trajectory through (``x0``, ``eps``).

    ``x_to = sqrt(ab_to) x0 + sqrt(1 - ab_to - s^2) eps + s z`` with ``s = eta sqrt((1 - ab_to) / (1 - ab_from)
    (1 - ab_from / ab_to))`` (``t_from`` is the current level; needed only for ``eta > 0``; no fresh noise is
    added on the step from level 0). ``t_to`` above the current level walks up the trajectory (inversion);
    ``eps`` may be any noise (LCM's re-noising). The fresh noise ``z`` has the recipe's ``frame_correlation``.
    """
    alpha, sigma = param.schedule.scalings(t_to, x0)
    if not eta:
        return alpha * x0 + sigma * eps
    if t_from is None:
        raise ValueError("ddim_step with eta > 0 needs t_from (the current level)")
    ab_from, ab_to = param.schedule.alpha_bar(t_from, x0), param.schedule.alpha_bar(t_to, x0)
    s = eta * ((1 - ab_to) / (1 - ab_from) * (1 - ab_from / ab_to)).sqrt()
    x = alpha * x0 + (1 - ab_to - s**2).sqrt() * eps
    noise = frame_noise(x0.shape, frame_correlation, generator, x0.dtype, x0.device)
    not_last = (t_from != 0).to(x0.dtype).view_as(s)
    return x + not_last * s * noise


def guided_output(
    model: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None = None,
    guidance_scale: float = 1.0,
    batch_cfg: bool = False,
) -> torch.Tensor:
    """Classifier-free guidance on the raw output: ``u + s * (c - u)``; cond only when ``uncond`` is None.

    ``batch_cfg`` runs cond and uncond in one call on a doubled batch (tensor kwargs, also inside nested dicts
    such as ``keep``, are concatenated along dim 0; any other kwarg must be equal in both dicts).
    """
    if uncond is None:
        return model(x, t, **cond)
    if batch_cfg:
        both = model(torch.cat([x, x]), torch.cat([t, t]), **_concat_kwargs(cond, uncond))
        out_cond, out_uncond = both.chunk(2)
    else:
        out_cond, out_uncond = model(x, t, **cond), model(x, t, **uncond)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def _concat_kwargs(cond: dict[str, Any], uncond: dict[str, Any]) -> dict[str, Any]:
    if cond.keys() != uncond.keys():
        raise ValueError(
            f"batch_cfg needs the same kwargs in cond and uncond, got {sorted(cond)} vs {sorted(uncond)}"
        )
    merged = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor):
            merged[key] = torch.cat([value, uncond[key]])
        elif isinstance(value, dict):
            merged[key] = _concat_kwargs(value, uncond[key])
        elif value == uncond[key]:
            merged[key] = value
        else:
            raise ValueError(f"batch_cfg: non-tensor kwarg {key!r} differs between cond and uncond")
    return merged


def _denoised(model, param: Parameterization, x, t, cond, uncond, guidance_scale, batch_cfg):
    """(x0, eps) of the guided model output at (x, t), eps re-derived from x0 as the original sampler does."""
    output = guided_output(model, x, t, cond or {}, uncond, guidance_scale, batch_cfg)
    x0 = param.predict_x0(output, x, t)
    return x0, param.eps_from_x0(x0, x, t), output


def ddim_sample(
    model: Denoiser,
    x_T: torch.Tensor,
    param: Parameterization,
    steps: int = 50,
    *,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    guidance_scale: float = 9.0,
    eta: float = 0.0,
    batch_cfg: bool = False,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    frame_correlation: float = 0.0,
    spacing: str = "leading",
) -> torch.Tensor:
    """DDIM from pure noise ``x_T`` over ``ddim_timesteps(T, steps, spacing)`` (VGen ``ddim_sample_loop``: leading).

    Each step: guided output -> x0 -> eps re-derived from x0 -> :func:`ddim_step` to the previous level, clamped
    at 0, so the last step lands on ab_0 (not 1) like the original and the result keeps a sqrt(1 - ab_0) eps
    component. ``spacing="trailing"`` takes eps as (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t), finite at a zero-terminal-SNR
    T-1. ``callback`` gets {"i", "t", "x", "x0"} after every step, ``x`` being the new x_prev.
    """
    stride = param.num_timesteps // steps
    x = x_T
    for i, step in enumerate(ddim_timesteps(param.num_timesteps, steps, spacing).tolist()):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        x0, eps, _ = _denoised(model, param, x, t, cond, uncond, guidance_scale, batch_cfg)
        if spacing == "trailing":  # the grid starts at T-1, where zero terminal SNR makes eps_from_x0 0/0
            alpha, sigma = param.schedule.scalings(t, x)
            eps = (x - alpha * x0) / sigma  # the same eps wherever both are defined
        x = ddim_step(param, x0, eps, (t - stride).clamp(min=0), t_from=t, eta=eta, generator=generator,
                      frame_correlation=frame_correlation)
        if callback is not None:
            callback({"i": i, "t": step, "x": x, "x0": x0})
    return x


def denoise_from(
    model: Denoiser,
    x: torch.Tensor,
    param: Parameterization,
    timesteps: Sequence[int],
    *,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    guidance_scale: float = 1.0,
    batch_cfg: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM from ``x`` at level ``timesteps[0]`` through the rest (any decreasing levels; a last
    level of -1 returns the x0 prediction of the step before it, with no leftover noise)."""
    for t_now, t_next in itertools.pairwise(timesteps):
        t = torch.full((x.shape[0],), t_now, dtype=torch.long, device=x.device)
        x0, eps, _ = _denoised(model, param, x, t, cond, uncond, guidance_scale, batch_cfg)
        x = x0 if t_next < 0 else ddim_step(param, x0, eps, torch.full_like(t, t_next))
    return x


def sdedit_timesteps(noise_levels: int, steps: int) -> list[int]:
    """``steps`` decreasing timesteps from ``noise_levels - 1`` (evenly spaced, distinct), then -1 (= clean)."""
    if not 1 <= steps <= noise_levels:
        raise ValueError(f"refine steps must be in [1, {noise_levels}], got {steps}")
    start = noise_levels - 1
    return [round(start - i * start / steps) for i in range(steps)] + [-1]


def ddim_invert(
    model: Denoiser,
    x0: torch.Tensor,
    param: Parameterization,
    steps: int,
    *,
    model_kwargs: dict[str, Any] | None = None,
    num_levels: int | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion (VGen ``ddim_reverse_sample_loop``): clean latent -> noisy latent.

    Walks t = 0, k, 2k, ... (k = num_levels // steps, num_levels defaulting to T), mapping x at level t to
    level min(t + k, num_levels - 1). SR600 uses steps=30, num_levels=700 with the negative-prompt kwargs.
    """
    num_levels = num_levels or param.num_timesteps
    stride = num_levels // steps
    x = x0
    for step in range(0, num_levels, stride):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        x0_pred, eps, _ = _denoised(model, param, x, t, model_kwargs, None, 1.0, False)
        x = ddim_step(param, x0_pred, eps, (t + stride).clamp(max=num_levels - 1))
    return x
