"""Multi-head attention used by every transformer in the UNet.

The default kernel is ``torch.nn.functional.scaled_dot_product_attention``. xformers is used only when it is
installed, the tensors live on CUDA and the backend allows it; a ``naive`` backend (explicit softmax) exists for
benchmarks and debugging. All three compute softmax(q kᵀ / √d) v and are numerically interchangeable.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from vgen.models.fastpath import FAST, SMALL_ATTENTION_KEYS

BACKENDS = ("auto", "sdpa", "xformers", "naive")
# CUDA kernels reject very large batch grids; chunking over the batch axis is numerically identical.
MAX_ATTENTION_BATCH = 32768

_backend = os.environ.get("VGEN_ATTENTION", "auto")


def set_attention_backend(name: str) -> None:
    """Select the attention kernel for the whole process (also via the VGEN_ATTENTION env var)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops

        return xops
    except Exception:  # noqa: BLE001 - ImportError, or a broken build that fails at import
        return None


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return scores.softmax(dim=-1) @ v


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: [B, heads, N, d] -> [B, heads, N, d]."""
    backend = _backend
    if backend == "naive" or (backend == "auto" and FAST.small_attention_bmm and not q.is_cuda
                              and k.shape[-2] <= SMALL_ATTENTION_KEYS):
        return _naive(q, k, v)
    if backend in ("auto", "xformers") and q.is_cuda:
        xops = _xformers_ops()
        if xops is not None:
            try:
                out = xops.memory_efficient_attention(*(u.transpose(1, 2) for u in (q, k, v)))
                return out.transpose(1, 2)
            except NotImplementedError:
                if backend == "xformers":
                    raise
        elif backend == "xformers":
            raise RuntimeError("attention backend 'xformers' requested but xformers is not importable")
    return F.scaled_dot_product_attention(q, k, v)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*d] projections -> [B, N, heads*d] attention output."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (u.reshape(b, u.shape[1], heads, d).transpose(1, 2) for u in (q, k, v))
    if b * heads > MAX_ATTENTION_BATCH and (q.is_cuda or not FAST.small_attention_bmm):
        step = max(1, MAX_ATTENTION_BATCH // heads)
        out = torch.cat([_kernel(q[i : i + step], k[i : i + step], v[i : i + step]) for i in range(0, b, step)])
    else:
        out = _kernel(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner)


class Attention(nn.Module):
    """Bias-free q/k/v projections, multi-head attention, output projection (+dropout).

    ``context_dim=None`` makes it self-attention; otherwise keys and values come from ``context``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, N, dim]; ``context`` [B, M, context_dim], or [B / F, M, context_dim]: one clip's context
        shared by F consecutive rows of ``x`` (its frames), projected once and attended to by all of them."""
        source = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        b, n = x.shape[:2]
        if source.shape[0] != b:  # a clip's keys/values serve all its frames: per-query softmax, so fold them
            clips = source.shape[0]
            if clips == 0 or b % clips:
                raise ValueError(f"context batch {clips} does not divide the query batch {b}")
            out = multihead_attention(q.reshape(clips, (b // clips) * n, -1), k, v, self.heads).reshape(b, n, -1)
        else:
            out = multihead_attention(q, k, v, self.heads)
        return self.to_out(out)
