"""Latent consistency models (LCM / VideoLCM): the distillation loss and the multistep sampler, as pure functions.

A consistency model maps any point ``x_t`` of a probability-flow ODE trajectory to the trajectory's end:
``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)``, where ``x0_hat`` comes from the network's raw output
(eps, v or x0, per ``param.prediction``) and the boundary scalings make ``f(x, 0) = x``.

Distillation (Luo et al., arXiv 2310.04378; VideoLCM, arXiv 2312.09109) runs the frozen teacher's DDIM solver
one skip of ``k = T / solver_steps`` timesteps along the ODE and regresses the student at the start point onto
the EMA target network at the solver's end point. Models are called as ``model(x, t, **kwargs)`` like every
sampler in :mod:`vgen.diffusion.samplers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vgen.diffusion.loss import Denoiser, frame_noise
from vgen.diffusion.parameterization import Parameterization
from vgen.diffusion.samplers import ddim_step, guided_output

DISTANCES = ("huber", "l2")
StepCallback = Callable[[dict[str, Any]], None]


def boundary_scalings(
    t: torch.Tensor, like: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at integer timesteps ``t`` [B], shaped to broadcast against ``like``.

    With s = timestep_scaling * t: c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s / sqrt(s^2 +
    sigma_data^2); so c_skip(0) = 1 and c_out(0) = 0, and for t >= 1 the output is essentially x0_hat.
    Computed in float64, then cast to ``like``'s dtype.
    """
    scaled = t.to(torch.float64) * timestep_scaling
    denominator = scaled**2 + sigma_data**2
    c_skip, c_out = sigma_data**2 / denominator, scaled / denominator.sqrt()
    shape = (-1, *([1] * (like.ndim - 1)))
    return (c_skip.to(like.device, like.dtype).view(shape), c_out.to(like.device, like.dtype).view(shape))


def x0_and_eps(
    param: Parameterization, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a raw network output; finite at alpha_bar = 0 (zero terminal SNR) for v-prediction.

    v: x0 = alpha x_t - sigma v and eps = alpha v + sigma x_t (at t = T-1 with zero terminal SNR: x0 = -v,
    eps = x_t). eps: x0 from the inverse scalings. x0: eps = (x_t - alpha x0) / sigma.
    """
    if param.prediction == "v":
        alpha, sigma = param.schedule.scalings(t, x_t)
        return alpha * x_t - sigma * output, alpha * output + sigma * x_t
    if param.prediction == "eps":
        return param.predict_x0(output, x_t, t), output
    alpha, sigma = param.schedule.scalings(t, x_t)
    return output, (x_t - alpha * output) / sigma


def consistency_function(
    model: Denoiser,
    param: Parameterization,
    x_t: torch.Tensor,
    t: torch.Tensor,
    model_kwargs: dict[str, Any] | None = None,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(model(x_t, t))."""
    x0, _ = x0_and_eps(param, model(x_t, t, **(model_kwargs or {})), x_t, t)
    c_skip, c_out = boundary_scalings(t, x_t, sigma_data, timestep_scaling)
    return c_skip * x_t + c_out * x0


def solver_timesteps(num_timesteps: int = 1000, solver_steps: int = 50) -> torch.Tensor:
    """Ascending DDIM-solver grid ``k, 2k, ..., T`` minus 1 with k = T // solver_steps: 19, 39, ..., 999 for 50."""
    if not 1 <= solver_steps <= num_timesteps:
        raise ValueError(f"solver_steps must be in [1, {num_timesteps}], got {solver_steps}")
    skip = num_timesteps // solver_steps
    return torch.arange(1, solver_steps + 1) * skip - 1


def ddim_solver_step(
    teacher: Denoiser,
    param: Parameterization,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None = None,
    guidance: float = 0.0,
    batch_cfg: bool = False,
) -> torch.Tensor:
    """One deterministic DDIM step of the (guided) teacher from ``t`` to ``t_prev``.

    Guidance uses the LCM convention ``c + w (c - u)``, i.e. classifier-free guidance at scale ``1 + w``
    (w = 9 is CFG 10). Guiding the raw output equals guiding x0 and eps separately, as VideoLCM writes it,
    because both are linear in the output. x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps.
    """
    use_cfg = uncond is not None and guidance != 0.0
    output = guided_output(teacher, x_t, t, cond, uncond if use_cfg else None, 1.0 + guidance, batch_cfg)
    x0, eps = x0_and_eps(param, output, x_t, t)
    return ddim_step(param, x0, eps, t_prev)


def distance(prediction: torch.Tensor, target: torch.Tensor, kind: str = "huber", huber_c: float = 0.001):
    """Per-sample distance [B], in at least float32: pseudo-Huber mean(sqrt(d^2 + c^2) - c), or l2 mean(d^2)."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    diff = prediction.to(dtype) - target.to(dtype)
    if kind == "huber":
        per_element = (diff**2 + huber_c**2).sqrt() - huber_c
    elif kind == "l2":
        per_element = diff**2
    else:
        raise ValueError(f"unknown distance {kind!r}; valid choices: {', '.join(DISTANCES)}")
    return per_element.flatten(1).mean(dim=1)


def consistency_distillation_loss(
    student: Denoiser,
    target: Denoiser,
    teacher: Denoiser,
    param: Parameterization,
    x0: torch.Tensor,
    *,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None = None,
    guidance: float = 9.0,
    solver_steps: int = 50,
    index: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    frame_correlation: float = 0.0,
    loss: str = "huber",
    huber_c: float = 0.001,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    batch_cfg: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample consistency-distillation loss [B] and the intermediates (for logging and tests).

    For each sample: n ~ U{0..solver_steps-1} (or ``index``), t = grid[n], t_prev = max(t - k, 0),
    x_t = q_sample(x0, t, noise), ``noise`` drawn (when not given) with the recipe's ``frame_correlation``
    (:func:`vgen.diffusion.loss.frame_noise`; 0 = plain N(0, I)); student f(x_t, t) against the target network's
    f(x_hat_prev, t_prev), x_hat_prev being the guided teacher's DDIM step. Teacher and target run without
    gradients; the student gets ``cond`` only (no guidance input), as does the target.
    """
    grid = solver_timesteps(param.num_timesteps, solver_steps).to(x0.device)
    if index is None:
        index = torch.randint(0, solver_steps, (x0.shape[0],), generator=generator, device=x0.device)
    t = grid[index]
    t_prev = (t - param.num_timesteps // solver_steps).clamp(min=0)
    if noise is None:
        noise = frame_noise(x0.shape, frame_correlation, generator, x0.dtype, x0.device)
    x_t = param.q_sample(x0, t, noise)
    prediction = consistency_function(student, param, x_t, t, cond, sigma_data, timestep_scaling)
    with torch.no_grad():
        x_prev = ddim_solver_step(teacher, param, x_t, t, t_prev, cond, uncond, guidance, batch_cfg)
        target_value = consistency_function(target, param, x_prev, t_prev, cond, sigma_data, timestep_scaling)
    per_sample = distance(prediction, target_value, loss, huber_c)
    return per_sample, {"t": t, "t_prev": t_prev, "x_t": x_t, "x_prev": x_prev, "prediction": prediction,
                        "target": target_value}


def lcm_timesteps(num_timesteps: int = 1000, steps: int = 4, original_steps: int = 50) -> torch.Tensor:
    """Descending inference timesteps: ``steps`` evenly spaced picks of the reversed solver grid.

    Index floor(linspace(0, original_steps, steps, endpoint=False)) of 999, 979, ..., 19: 4 steps give
    999, 759, 499, 259 (diffusers' ``LCMScheduler`` rule since v0.25).
    """
    if not 1 <= steps <= original_steps:
        raise ValueError(f"LCM steps must be in [1, {original_steps}] (the distillation grid), got {steps}")
    grid = solver_timesteps(num_timesteps, original_steps).flip(0)
    picks = torch.floor(torch.arange(steps, dtype=torch.float64) * (original_steps / steps)).long()
    return grid[picks]


def lcm_sample(
    model: Denoiser,
    x_T: torch.Tensor,
    param: Parameterization,
    steps: int = 4,
    *,
    cond: dict[str, Any] | None = None,
    original_steps: int = 50,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    frame_correlation: float = 0.0,
) -> torch.Tensor:
    """Multistep consistency sampling from pure noise ``x_T`` (no classifier-free guidance).

    At each timestep: denoised = f(x, t); then, unless it is the last step, re-noise to the next timestep,
    x = sqrt(ab_next) denoised + sqrt(1 - ab_next) n. With ``eta = 1`` (LCM, diffusers' ``LCMScheduler``) n is
    fresh N(0, I) noise from ``generator``; with ``eta = 0`` it is the noise the trajectory already carries,
    eps = (x - sqrt(ab_t) denoised) / sqrt(1 - ab_t), which makes the sampler deterministic in x_T (a DDIM step on
    the consistency function's x0); in between, eta z + sqrt(1 - eta^2) eps. Returns the last ``denoised``.
    ``callback`` gets {"i", "t", "x", "x0"} after every step (``x0`` = denoised). The fresh noise has the
    model's ``frame_correlation`` (:func:`vgen.diffusion.loss.frame_noise`).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    timesteps = lcm_timesteps(param.num_timesteps, steps, original_steps).tolist()
    x = x_T
    denoised = x_T
    for i, step in enumerate(timesteps):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        denoised = consistency_function(model, param, x, t, cond, sigma_data, timestep_scaling)
        if i + 1 < len(timesteps):
            noise = torch.zeros_like(x)
            if eta > 0:
                noise = eta * frame_noise(x.shape, frame_correlation, generator, x.dtype, x.device)
            if eta < 1:
                alpha_t, sigma_t = param.schedule.scalings(t, x)
                noise = noise + (1 - eta**2) ** 0.5 * (x - alpha_t * denoised) / sigma_t
            x = ddim_step(param, denoised, noise, torch.full_like(t, timesteps[i + 1]))
        else:
            x = denoised
        if callback is not None:
            callback({"i": i, "t": step, "x": x, "x0": denoised})
    return denoised
