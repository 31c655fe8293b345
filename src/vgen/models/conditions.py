"""Condition pathways that can be attached to the UNet3D trunk.

Each piece turns one kind of conditioning input into either extra input channels (concatenated to the noisy
latent), extra cross-attention tokens, or an additive term of the timestep embedding. The UNet composes them from
its config; no variant is a copy of the whole network.
"""

from __future__ import annotations

import torch
from torch import nn

from vgen.models.attention import Attention
from vgen.models.blocks import FrameSequenceEncoder, fold_frames


class EmbeddingMLP(nn.Sequential):
    """Linear -> SiLU -> Linear applied to a sinusoidal embedding (timestep, fps)."""

    def __init__(self, dim: int, embed_dim: int, zero_init_last: bool = False):
        super().__init__(nn.Linear(dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        if zero_init_last:
            nn.init.zeros_(self[-1].weight)
            nn.init.zeros_(self[-1].bias)


class TextPooling(nn.Module):
    """Text tokens [B, L, context_dim] -> one vector [B, embed_dim] for the timestep embedding.

    A learned query attends over the tokens (so the caption's informative tokens can outweigh the padding),
    then Linear -> SiLU -> Linear. Pooled text in the time embedding reaches every ResBlock as a per-channel bias
    (the Imagen / SDXL pooled-text pathway); VGen itself conditions on text through cross-attention only.
    """

    def __init__(self, context_dim: int, embed_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, context_dim) / context_dim**0.5)
        self.attention = Attention(context_dim, 1, context_dim, context_dim)  # the UNet's attention (and backend)
        self.mlp = nn.Sequential(nn.Linear(context_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        pooled = self.attention(self.query.expand(text.shape[0], -1, -1).to(text.dtype), text)
        return self.mlp(pooled[:, 0])


class ImageTokens(nn.Module):
    """CLIP image embedding [B, 1, image_dim] -> ``num_tokens`` cross-attention tokens [B, num_tokens, context_dim]."""

    def __init__(self, image_dim: int, hidden_dim: int, context_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.context_dim = context_dim
        self.mlp = nn.Sequential(nn.Linear(image_dim, hidden_dim), nn.SiLU(),
                                 nn.Linear(hidden_dim, context_dim * num_tokens))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.mlp(image).reshape(-1, self.num_tokens, self.context_dim)


class FirstFrameCondition(nn.Module):
    """I2VGen-XL first-frame conditioning from the VAE latent of the input image.

    * ``concat``: a per-frame conv stack over [frame-0 latent, then constant maps k/(F-1)] followed by a small
      temporal transformer, giving ``latent_channels`` extra input channels for every frame. The original adds this
      tensor twice (an acknowledged bug the released weights were trained with), so it is scaled by 2 here.
    * ``tokens``: a conv encoder pooling the frame-0 latent to an 8x8 grid -> 64 cross-attention tokens.
    """

    def __init__(self, latent_channels: int = 4, token_dim: int = 1024, encoder_depth: int = 1):
        super().__init__()
        c = latent_channels
        self.concat_encoder = nn.Sequential(
            nn.Conv2d(c, c * 4, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c * 4, c * 4, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c * 4, c, 3, padding=1),
        )
        self.temporal_encoder = FrameSequenceEncoder(dim=c, heads=2, head_dim=c, depth=encoder_depth)
        self.token_encoder = nn.Sequential(
            nn.Conv2d(c, c * 8, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d((32, 32)),
            nn.Conv2d(c * 8, c * 16, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c * 16, token_dim, 3, stride=2, padding=1),
        )

    @staticmethod
    def first_frame(latent: torch.Tensor) -> torch.Tensor:
        """Accept [B, C, H, W] or [B, C, F, H, W] (only frame 0 is used) -> [B, C, 1, H, W]."""
        if latent.ndim == 4:
            return latent.unsqueeze(2)
        if latent.ndim != 5:
            raise ValueError(f"first-frame latent must be [B,C,H,W] or [B,C,F,H,W], got shape {tuple(latent.shape)}")
        return latent[:, :, :1]

    def concat(self, frame0: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[B, C, 1, H, W] -> [B, C, F, H, W] extra input channels."""
        b, c, _, h, w = frame0.shape
        if num_frames > 1:
            # The ramp values are computed in float32 in the original, whatever the model dtype.
            levels = (torch.arange(1, num_frames, device=frame0.device, dtype=torch.float32) / (num_frames - 1))
            levels = levels.to(frame0.dtype)
            ramps = levels.view(1, 1, -1, 1, 1).expand(b, c, -1, h, w)
            frame0 = torch.cat([frame0, ramps], dim=2)
        feats = self.concat_encoder(fold_frames(frame0))  # [(B F), C, H, W]
        feats = feats.reshape(b, num_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)
        feats = self.temporal_encoder(feats)
        feats = feats.reshape(b, h, w, num_frames, c).permute(0, 4, 3, 1, 2)
        return feats * 2

    def tokens(self, frame0: torch.Tensor) -> torch.Tensor:
        """[B, C, 1, H, W] -> [B, 64, token_dim]."""
        return self.token_encoder(frame0[:, :, 0]).flatten(2).transpose(1, 2)
