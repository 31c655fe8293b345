"""Building blocks of the VGen/ModelScope 3D UNet.

Layout convention: spatial layers see frames folded into the batch, ``[(B F), C, H, W]``; temporal layers unfold
to ``[B, C, F, H, W]`` internally. Every block takes ``(x, emb, context, num_frames)`` so the UNet can run (and
activation-checkpoint) them uniformly.

Numerical details that matter for weight compatibility with the original code:
* GroupNorm statistics are per frame in ResBlocks/spatial transformers but span all frames in the temporal conv
  and temporal transformer (their GroupNorm sees 5-D input). eps 1e-5 for ResBlocks/temporal convs, 1e-6 for
  transformers.
* Temporal attention has no positional encoding, and both of its attention layers are self-attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vgen.diffusion.embedding import sinusoidal_embedding
from vgen.models.attention import Attention, multihead_attention
from vgen.models.fastpath import FAST


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [(B F), C, H, W]."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def unfold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[(B F), C, H, W] -> [B, C, F, H, W]."""
    bf, c, h, w = x.shape
    return x.reshape(bf // num_frames, num_frames, c, h, w).transpose(1, 2)


class GEGLUFeedForward(nn.Module):
    """Linear -> (value * gelu(gate)) -> dropout -> Linear, hidden width ``mult * dim``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        hidden = dim * mult
        self.net = nn.Sequential(_GEGLU(dim, hidden), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = _ValueGateLinear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x, split=FAST.split_geglu)
        return value * F.gelu(gate)


class _ValueGateLinear(nn.Linear):
    """``Linear(dim, 2 * hidden)`` whose output halves are GEGLU's value and gate. ``split=True`` computes them
    as two products with the weight's halves: two contiguous outputs, where the halves of one output are strided
    views that GELU and its backward handle much more slowly on CPU. Same parameters either way."""

    def forward(self, x: torch.Tensor, split: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if not split:
            return super().forward(x).chunk(2, dim=-1)
        half = self.out_features // 2
        bias = (None, None) if self.bias is None else (self.bias[:half], self.bias[half:])
        return F.linear(x, self.weight[:half], bias[0]), F.linear(x, self.weight[half:], bias[1])


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention (self when ``context_dim`` is None), GEGLU FF.

    ``disable_self_attn``: the first attention cross-attends to the context too (HiGen's text resampler).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None, dropout: float = 0.0,
                 disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = Attention(dim, heads, head_dim, context_dim if disable_self_attn else None, dropout)
        self.ff = GEGLUFeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the H*W tokens with cross-attention to ``context``."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, context_dim)])
        # The original constructs this as Linear(channels, inner); the shapes only agree because inner == channels.
        self.proj_out = nn.Linear(channels, inner)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, emb=None, context=None, num_frames=1):
        n, c, h, w = x.shape
        residual = x
        x = self.norm(x).flatten(2).transpose(1, 2)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x)
        return x.transpose(1, 2).reshape(n, c, h, w) + residual


class TemporalConv(nn.Conv3d):
    """``Conv3d`` with kernel (3, 1, 1) over ``[B, C, F, H, W]``; with ``FAST.temporal_conv_2d`` it runs as the
    equivalent 2-D convolution (kernel (3, 1)) on the ``[B, C, F, H*W]`` view. Same parameters as ``Conv3d``."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__(channels, out_channels or channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not FAST.temporal_conv_2d or x.ndim != 5:
            return super().forward(x)
        b, _, f, h, w = x.shape
        out = F.conv2d(x.reshape(b, x.shape[1], f, h * w), self.weight.squeeze(-1), self.bias, padding=(1, 0))
        return out.view(b, out.shape[1], f, h, w)


class PointwiseConv1d(nn.Conv1d):
    """1x1 ``Conv1d`` over ``[N, C, L]``; ``channels_last=True`` applies the same weights as a linear layer to
    ``[N, L, C]`` tokens. Same parameters as ``Conv1d(in, out, 1)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        if channels_last:
            return F.linear(x, self.weight.squeeze(-1), self.bias)
        return super().forward(x)


class TemporalTransformer(nn.Module):
    """Transformer over the frames at each spatial position (self-attention only).

    The original has no positional encoding here (frame order reaches the model only through the zero-padded
    temporal convs). ``position="sinusoidal"`` adds a fixed sinusoidal encoding of the frame index to the tokens
    after ``proj_in`` (AnimateDiff-style); it has no parameters, so state dicts are unchanged.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, position: str = "none"):
        super().__init__()
        if position not in ("none", "sinusoidal"):
            raise ValueError(f"position={position!r} is not one of ('none', 'sinusoidal')")
        self.position = position
        self.bypass = False  # UNet3D.set_temporal_bypass: act as the identity
        self.identity_for_stills = False  # HiGen: the identity on single frames (its residual branch times 0)
        inner = heads * head_dim
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = PointwiseConv1d(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, None)])
        self.proj_out = PointwiseConv1d(inner, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, emb=None, context=None, num_frames=1):
        if self.bypass or (self.identity_for_stills and num_frames == 1):
            return x
        video = unfold_frames(x, num_frames)  # [B, C, F, H, W]
        b, c, f, h, w = video.shape
        if FAST.channels_last_temporal:
            tokens = self.norm(video).permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c)
            tokens = self.proj_in(tokens, channels_last=True)  # [(B H W), F, inner]
        else:
            tokens = self.norm(video).permute(0, 3, 4, 1, 2).reshape(b * h * w, c, f)
            tokens = self.proj_in(tokens).transpose(1, 2)  # [(B H W), F, inner]
        if self.position == "sinusoidal":
            frames = torch.arange(f, device=tokens.device)
            tokens = tokens + sinusoidal_embedding(frames, tokens.shape[-1], dtype=torch.float32).to(tokens.dtype)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        if FAST.channels_last_temporal:  # [(B H W), F, C] -> [B, F, C, H, W] = the folded layout's order
            out = self.proj_out(tokens, channels_last=True).view(b, h, w, f, c).permute(0, 3, 4, 1, 2)
            return (out + x.reshape(b, f, c, h, w)).reshape(b * f, c, h, w)
        tokens = self.proj_out(tokens.transpose(1, 2))  # [(B H W), C, F]
        out = tokens.reshape(b, h, w, c, f).permute(0, 3, 4, 1, 2) + video
        return fold_frames(out)


class TemporalConvBlock(nn.Module):
    """Four (GroupNorm, SiLU, [Dropout], Conv3d(3,1,1)) stages over time with a residual; last conv zero-init."""

    def __init__(self, channels: int, dropout: float = 0.1):
        super().__init__()

        def stage(with_dropout: bool) -> nn.Sequential:
            layers = [nn.GroupNorm(32, channels), nn.SiLU()]
            if with_dropout:
                layers.append(nn.Dropout(dropout))
            layers.append(TemporalConv(channels))
            return nn.Sequential(*layers)

        self.conv1 = stage(False)
        self.conv2 = stage(True)
        self.conv3 = stage(True)
        self.conv4 = stage(True)
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)
        self.bypass = False  # UNet3D.set_temporal_bypass: act as the identity
        self.identity_for_stills = False  # HiGen: the identity on single frames (its residual branch times 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, F, H, W]
        if self.bypass or (self.identity_for_stills and x.shape[2] == 1):
            return x
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """2-D residual block with an additive timestep embedding, followed by a temporal conv block.

    ``scale_shift=True`` (not in VGen) applies the embedding after the second GroupNorm as ``norm(h) * (1 + scale)
    + shift`` (FiLM, as in ADM / guided-diffusion): with one channel per GroupNorm group (32-channel models) an
    additive per-channel embedding would be normalised away.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 scale_shift: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.temporal_conv = TemporalConvBlock(out_channels, dropout=0.1)

    def forward(self, x, emb=None, context=None, num_frames=1):
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        h = self.skip_connection(x) + h
        return fold_frames(self.temporal_conv(unfold_frames(h, num_frames)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv. ``padding=(2, 1)`` gives the SR600 variant's asymmetric pyramid."""

    def __init__(self, channels: int, padding: int | tuple[int, int] = 1):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x, emb=None, context=None, num_frames=1):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv; ``crop_rows`` drops one row at the top and bottom first (SR600 variant)."""

    def __init__(self, channels: int, crop_rows: bool = False):
        super().__init__()
        self.crop_rows = crop_rows
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None, context=None, num_frames=1):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.crop_rows:
            x = x[..., 1:-1, :]
        return self.conv(x)


class _PreNormResidual(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x)) + x


class _FusedQKVAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, heads * head_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * head_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.to_out(multihead_attention(q, k, v, self.heads))


class _MLP(nn.Module):
    def __init__(self, dim: int, out_dim: int, mult: int, dropout: float):
        super().__init__()
        hidden = dim * mult
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FrameSequenceEncoder(nn.Module):
    """Small transformer over a frame sequence: ``x += attn(LN(x)); x += mlp(x)`` per layer.

    The MLP is deliberately *not* pre-normed (as in I2VGen-XL's local temporal encoder).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, depth: int = 1, dropout: float = 0.05):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_PreNormResidual(dim, _FusedQKVAttention(dim, heads, head_dim, dropout)),
                           _MLP(dim, dim, 4, dropout)])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, F, dim]
        for attn, mlp in self.layers:
            x = attn(x)
            x = mlp(x) + x
        return x
