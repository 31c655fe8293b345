"""Sinusoidal embeddings of integer timesteps (and fps)."""

from __future__ import annotations

import torch


def sinusoidal_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N] -> [N, dim] as ``cat([cos(t f), sin(t f)])`` with ``f = 10000 ** (-arange(dim//2) / (dim//2))``.

    Cosine first (VGen/ModelScope order, unlike diffusers' default); computed in ``dtype`` (float32 in the
    original); a zero column is appended for odd ``dim``.
    """
    half = dim // 2
    t = t.to(dtype)
    freqs = torch.pow(10000, -torch.arange(half, device=t.device, dtype=dtype).div(half))
    angles = torch.outer(t, freqs)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb
