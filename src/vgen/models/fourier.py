"""FreeU-style Fourier filtering of UNet skip features (used by the SR600 refinement network)."""

from __future__ import annotations

import torch


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the centred low-frequency box of ``x`` ([N, C, H, W]) by ``scale``.

    2-D FFT over (H, W), fftshift, multiply rows ``[H//2 - threshold, H//2 + threshold)`` x the same columns range
    by ``scale``, undo the shift, inverse FFT, keep the real part. The box is not conjugate-symmetric, so the full
    complex inverse (not an rfft shortcut) is required to match the original. Runs in float64 for float64 input and
    in float32 otherwise (half precision has no reliable FFT).
    """
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    freq = torch.fft.fftshift(torch.fft.fftn(x.to(work_dtype), dim=(-2, -1)), dim=(-2, -1))
    h, w = freq.shape[-2:]
    mask = torch.ones((h, w), dtype=work_dtype, device=x.device)
    mask[h // 2 - threshold : h // 2 + threshold, w // 2 - threshold : w // 2 + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)
