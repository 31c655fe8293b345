"""Noise schedules (float64) and per-timestep coefficient lookup.

Schedules follow VGen's ``tools/modules/diffusions/schedules.py`` (T = 1000 in every config); the golden
arrays are in ``shared/reference/diffusion_schedules.json``.
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("cosine", "linear_sd", "linear", "quadratic")


def beta_schedule(
    name: str,
    num_timesteps: int = 1000,
    *,
    init_beta: float | None = None,
    last_beta: float | None = None,
    cosine_s: float = 0.008,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Betas [T] in float64.

    ``linear`` and ``quadratic`` default to the DDPM range (1e-4, 2e-2) scaled by 1000/T; ``linear_sd``
    defaults to Stable Diffusion's (0.00085, 0.012). ``init_beta``/``last_beta`` are ignored by ``cosine``.
    """
    if name == "cosine":
        betas = _cosine_betas(num_timesteps, cosine_s)
    elif name == "linear_sd":
        betas = _quadratic_betas(num_timesteps, _default(init_beta, 0.00085), _default(last_beta, 0.012))
    elif name in ("linear", "quadratic"):
        scale = 1000.0 / num_timesteps
        init_beta = _default(init_beta, scale * 1e-4)
        last_beta = _default(last_beta, scale * 2e-2)
        if name == "linear":
            betas = torch.linspace(init_beta, last_beta, num_timesteps, dtype=torch.float64)
        else:
            betas = _quadratic_betas(num_timesteps, init_beta, last_beta)
    else:
        raise ValueError(f"unknown beta schedule {name!r}; valid choices: {', '.join(BETA_SCHEDULES)}")
    # Same trigger as the original: cosine's 0.999 clamp counts as "not yet zero terminal SNR".
    if zero_terminal_snr and abs(betas.max().item() - 1.0) > 1e-4:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


def _cosine_betas(num_timesteps: int, cosine_s: float) -> torch.Tensor:
    def f(u: float) -> float:
        return math.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

    steps = range(num_timesteps)
    betas = [min(1.0 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in steps]
    return torch.tensor(betas, dtype=torch.float64)


def _quadratic_betas(num_timesteps: int, init_beta: float, last_beta: float) -> torch.Tensor:
    return torch.linspace(init_beta**0.5, last_beta**0.5, num_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (arXiv 2305.08891): shift and scale sqrt(alpha_bar) so it ends at 0 and keeps its start."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


DDIM_SPACINGS = ("leading", "trailing")


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> torch.Tensor:
    """Descending DDIM timesteps with stride k = T // S.

    ``leading`` (VGen, the default): ``1 + arange(0, T, k)``: S=50 gives 981, 961, ..., 1 and S=4 751, 501, 251, 1
    (never T-1: from pure noise the first step starts below the zero-terminal-SNR end). ``trailing`` (Lin et al.,
    arXiv 2305.08891; diffusers ``timestep_spacing="trailing"``): ``T - 1 - k i`` for i < S: S=50 gives 999, 979, ...,
    19 -- the consistency-distillation solver grid (:func:`vgen.diffusion.lcm.solver_timesteps`) -- and S=4 999,
    749, 499, 249, so a few-step DDIM starts where LCM sampling does.
    """
    if spacing == "leading":
        return (1 + torch.arange(0, num_timesteps, num_timesteps // steps)).clamp(0, num_timesteps - 1).flip(0)
    if spacing == "trailing":
        if not 1 <= steps <= num_timesteps:
            raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
        return num_timesteps - 1 - torch.arange(steps) * (num_timesteps // steps)
    raise ValueError(f"unknown DDIM spacing {spacing!r}; valid choices: {', '.join(DDIM_SPACINGS)}")


def cosine_sigmas(num_timesteps: int = 1000, cosine_s: float = 0.008) -> torch.Tensor:
    """SR600 reverse-process sigmas ``sqrt(1 - alpha_bar)`` of the plain cosine schedule, float64.

    VGen's ``sigma_schedule(cosine, zero_terminal_snr=True)`` applies the rescale only when
    ``|sigma_T - 1| > 1e-4``; here sigma_T = 1 - 1.2e-9, so it is a no-op and is not implemented.
    """
    alphas_cumprod = torch.cumprod(1.0 - _cosine_betas(num_timesteps, cosine_s), dim=0)
    return (1.0 - alphas_cumprod).sqrt()


def logsnr_cosine_interp_sigmas(
    num_timesteps: int = 1000,
    scale_min: float = 2.0,
    scale_max: float = 4.0,
    logsnr_min: float = -15.0,
    logsnr_max: float = 15.0,
) -> torch.Tensor:
    """SR600 forward-process sigmas: shifted cosine logSNR, interpolated from ``scale_min`` to ``scale_max``.

    logSNR(u) = -2 log tan(angle(u)) - 2 log(scale), the shift moving linearly in u from ``scale_min`` (u=0,
    least noise) to ``scale_max`` (u=1); sigma = sqrt(sigmoid(-logSNR)). Computed in float32 like the
    original (its angle rounding changes sigma_0 by 8e-5 relative); returned as float64. sigma_T = 1.
    """
    angle_low_noise = math.atan(math.exp(-0.5 * logsnr_max))
    angle_high_noise = math.atan(math.exp(-0.5 * logsnr_min))
    weight_low = torch.linspace(1.0, 0.0, num_timesteps, dtype=torch.float32)
    angles = angle_high_noise + weight_low * (angle_low_noise - angle_high_noise)
    logsnr = -2.0 * torch.log(torch.tan(angles))
    logsnr_low = logsnr - 2.0 * math.log(scale_min)
    logsnr_high = logsnr - 2.0 * math.log(scale_max)
    interpolated = weight_low * logsnr_low + (1.0 - weight_low) * logsnr_high
    return torch.sigmoid(-interpolated).sqrt().double()


class NoiseSchedule:
    """Betas and alpha_bar (float64) plus the derived per-timestep coefficients.

    The lookups gather at integer timesteps ``t`` [B] and return values cast to ``like``'s dtype and device,
    shaped [B, 1, ..., 1] to broadcast against ``like``.
    """

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self._sqrt_ab = self.alphas_cumprod.sqrt()
        self._sqrt_one_minus_ab = (1.0 - self.alphas_cumprod).sqrt()
        self._sqrt_recip_ab = (1.0 / self.alphas_cumprod).sqrt()
        self._sqrt_recipm1_ab = (1.0 / self.alphas_cumprod - 1.0).sqrt()

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, **kwargs) -> NoiseSchedule:
        return cls(beta_schedule(name, num_timesteps, **kwargs))

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _gather(self.alphas_cumprod, t, like)

    def scalings(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ab_t), sqrt(1 - ab_t)): signal and noise scales of x_t."""
        return _gather(self._sqrt_ab, t, like), _gather(self._sqrt_one_minus_ab, t, like)

    def inverse_scalings(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(1/ab_t), sqrt(1/ab_t - 1)), used to go from (x_t, eps) to x0 and back."""
        return _gather(self._sqrt_recip_ab, t, like), _gather(self._sqrt_recipm1_ab, t, like)


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    picked = values.to(t.device)[t].to(device=like.device, dtype=like.dtype)
    return picked.view(-1, *([1] * (like.ndim - 1)))
