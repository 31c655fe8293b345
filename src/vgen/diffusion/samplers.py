"""DDIM sampling and inversion as pure functions of (model, x, parameterisation, conditions).

The model is called as ``model(x, t, **kwargs)`` with ``t`` int64 [B] and returns its raw output (eps, v or
x0, per ``param.prediction``). Conditions are dicts of model kwargs; in VGen the "unconditional" dict holds
the negative-prompt embedding. Nothing here disables autograd: wrap calls in ``torch.no_grad()`` for plain
inference, or leave it on to backpropagate through sampling steps (reward fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vgen.diffusion.loss import Denoiser, frame_noise
from vgen.diffusion.parameterization import Parameterization
from vgen.diffusion.schedules import ddim_timesteps

StepCallback = Callable[[dict[str, Any]], None]


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

    ``batch_cfg`` runs cond and uncond in one call on a doubled batch (tensor kwargs are concatenated along
    dim 0; any other kwarg must be equal in both dicts).
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
        elif value == uncond[key]:
            merged[key] = value
        else:
            raise ValueError(f"batch_cfg: non-tensor kwarg {key!r} differs between cond and uncond")
    return merged


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
) -> torch.Tensor:
    """DDIM from pure noise ``x_T`` over ``ddim_timesteps(T, steps)`` (VGen ``ddim_sample_loop``).

    Each step: guided output -> x0 -> eps re-derived from x0 -> x_prev = sqrt(ab_prev) x0 +
    sqrt(1 - ab_prev - s^2) eps + s z, with s = eta sqrt((1 - ab_prev)/(1 - ab_t) (1 - ab_t/ab_prev)).
    The previous timestep is clamped at 0, so the last step lands on ab_0 (not 1) like the original and the
    result keeps a sqrt(1 - ab_0) eps component. ``callback`` gets {"i", "t", "x", "x0"} after every step,
    ``x`` being the new x_prev. With ``eta > 0`` the fresh noise z has the model's ``frame_correlation``
    (:func:`vgen.diffusion.loss.frame_noise`).
    """
    num_timesteps = param.num_timesteps
    stride = num_timesteps // steps
    x = x_T
    for i, step in enumerate(ddim_timesteps(num_timesteps, steps).tolist()):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        t_prev = (t - stride).clamp(min=0)
        output = guided_output(model, x, t, cond or {}, uncond, guidance_scale, batch_cfg)
        x0 = param.predict_x0(output, x, t)
        eps = param.eps_from_x0(x0, x, t)
        x = _ddim_update(param, x, x0, eps, t, t_prev, eta, generator, frame_correlation)
        if callback is not None:
            callback({"i": i, "t": step, "x": x, "x0": x0})
    return x


def _ddim_update(
    param: Parameterization,
    x: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    eta: float,
    generator: torch.Generator | None,
    frame_correlation: float = 0.0,
) -> torch.Tensor:
    ab = param.schedule.alpha_bar(t, x)
    ab_prev = param.schedule.alpha_bar(t_prev, x)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps
    if eta:
        noise = frame_noise(x.shape, frame_correlation, generator, x.dtype, x.device)
        not_last = (t != 0).to(x.dtype).view_as(sigma)
        x_prev = x_prev + not_last * sigma * noise
    return x_prev


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
        t_next = (t + stride).clamp(max=num_levels - 1)
        x0_pred = param.predict_x0(model(x, t, **(model_kwargs or {})), x, t)
        eps = param.eps_from_x0(x0_pred, x, t)
        alpha_next, sigma_next = param.schedule.scalings(t_next, x)
        x = alpha_next * x0_pred + sigma_next * eps
    return x
