"""The differentiable partial DDIM chain of reward fine-tuning ("editing", InstructVideo / DRaFT-K).

A real clip's latent is noised to the DDIM level ``t_start`` (the first of the last ``int(tau * D)`` timesteps
of the D-step grid: 551 for tau = 0.6, D = 20, T = 1000) and denoised back with deterministic DDIM (eta = 0)
under classifier-free guidance. Gradients flow through the last ``grad_steps`` (K) steps only; the earlier ones
run under ``no_grad``, and each differentiable step can be recomputed in backward (activation checkpointing).
The step is the one of :func:`vgen.diffusion.ddim_sample` (so the chain equals the tail of a full DDIM run).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from vgen.diffusion import Parameterization, ddim_step, ddim_timesteps, guided_output
from vgen.diffusion.loss import Denoiser


def partial_timesteps(num_timesteps: int, steps: int, tau: float) -> torch.Tensor:
    """The last ``int(tau * steps)`` timesteps (descending) of the ``steps``-step DDIM grid; [0] is the start."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"ddim_steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    count = int(tau * steps + 1e-9)  # the original's int(tau * D), safe from 0.7 * 20 = 13.999...
    if not 0.0 < tau <= 1.0 or count < 1:
        raise ValueError(f"tau must be in (0, 1] with int(tau * ddim_steps) >= 1, got tau={tau}, ddim_steps={steps}")
    return ddim_timesteps(num_timesteps, steps)[-count:]


def guided_ddim_step(model: Denoiser, param: Parameterization, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              cond: dict[str, Any], uncond: dict[str, Any] | None, guidance: float,
              batch_cfg: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided eta=0 DDIM step (:func:`vgen.diffusion.ddim_step`): ``(x_prev, guided model output)``."""
    output = guided_output(model, x, t, cond, uncond, guidance, batch_cfg)
    x0 = param.predict_x0(output, x, t)
    return ddim_step(param, x0, param.eps_from_x0(x0, x, t), t_prev), output


def partial_ddim_chain(
    model: Denoiser,
    param: Parameterization,
    x_start: torch.Tensor,
    timesteps: torch.Tensor,
    stride: int,
    *,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None = None,
    guidance: float = 3.0,
    grad_steps: int = 1,
    checkpointing: bool = True,
    batch_cfg: bool = False,
    reference: Denoiser | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Denoise ``x_start`` (at level ``timesteps[0]``) over ``timesteps``; returns ``(x, regulariser)``.

    Step i goes from ``timesteps[i]`` to ``max(timesteps[i] - stride, 0)`` (``stride = T // D``), so the last
    step lands on level 0 like the original sampler. Only the last ``grad_steps`` steps build a graph
    (``grad_steps = 0``: none; ``len(timesteps)``: the full chain), each wrapped in non-reentrant activation
    checkpointing when ``checkpointing``.

    ``reference`` (e.g. the UNet with its LoRA disabled) adds a regulariser: the mean over the differentiable
    steps of the per-sample mean squared difference between the guided outputs of ``model`` and ``reference``
    (for eps-prediction and a shared DDIM variance this is the KL between the two steps' Gaussians up to a
    constant). It is ``None`` without a reference.
    """
    n = len(timesteps)
    if isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or not 0 <= grad_steps <= n:
        raise ValueError(f"grad_steps must be an integer in [0, {n}] (the chain has {n} steps), got {grad_steps!r}")
    x = x_start
    penalties = []
    for i, step in enumerate(timesteps.tolist()):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        t_prev = (t - stride).clamp(min=0)

        def run(x_in: torch.Tensor, t=t, t_prev=t_prev) -> tuple[torch.Tensor, torch.Tensor]:
            return guided_ddim_step(model, param, x_in, t, t_prev, cond, uncond, guidance, batch_cfg)

        if i < n - grad_steps:
            with torch.no_grad():
                x, _ = run(x)
            continue
        target = None
        if reference is not None:
            with torch.no_grad():
                target = guided_output(reference, x, t, cond, uncond, guidance, batch_cfg)
        x, output = checkpoint(run, x, use_reentrant=False) if checkpointing else run(x)
        if target is not None:
            dtype = torch.promote_types(output.dtype, torch.float32)  # fp16/bf16 outputs: square in float32
            penalties.append((output.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1))
    regulariser = torch.stack(penalties).mean(dim=0) if penalties else None
    return x, regulariser
