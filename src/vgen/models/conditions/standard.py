"""The standard conditions of the VGen family: caption tokens, CLIP image tokens, the I2VGen-XL first frame (concat
+ local tokens) and scalar embeddings such as fps; plus the building blocks they share and the demo model's pooled
text pathway (:class:`TextPooling`, a UNet option rather than a condition: it reads the caption tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from vgen.diffusion.embedding import sinusoidal_embedding
from vgen.models.attention import Attention
from vgen.models.blocks import FrameSequenceEncoder, fold_frames
from vgen.models.conditions.base import Condition, ConditionError, ConditionInputs, UNetDims


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


def sinusoid_for(values: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of ``values`` in float64 for float64 weights ``like``, else float32, cast to them."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return sinusoidal_embedding(values, dim, dtype=dtype).to(like.dtype)


def _check(name: str, value: torch.Tensor, ok: bool, expected: str) -> None:
    if not ok:
        raise ConditionError(f"condition {name!r} must be {expected}, got shape {tuple(value.shape)}")


class TextTokens(Condition):
    """Caption tokens of the frozen text encoder [B, L, context_dim], used as cross-attention tokens unchanged.

    Dropped / unconditional: the negative-prompt embedding (VGen); ``empty_prompt`` for the empty-prompt one.
    """

    routes = ("tokens",)

    def __init__(self, dims: UNetDims, *, dropout: float = 0.1, drop_to: str = "negative_prompt",
                 guide_to: str = "negative_prompt", required: bool = True, **kwargs):
        super().__init__(dropout=dropout, drop_to=drop_to, guide_to=guide_to, required=required, **kwargs)
        self.context_dim = dims.context_dim

    def extract(self, inputs: ConditionInputs) -> torch.Tensor:
        return inputs.encoders.batch_text(inputs.batch)

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        _check(self.name, value, value.ndim == 3 and value.shape[-1] == self.context_dim,
               f"[B, L, context_dim={self.context_dim}] (text-encoder tokens)")
        return value

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.randn(batch_size, 77, self.context_dim, dtype=dtype)


def frame_embedding(condition: Condition, inputs: ConditionInputs) -> torch.Tensor | None:
    """The image-encoder embedding [B, 1, D] of the frame ``condition.frame`` of the batch's clips (or the latent
    batch's cached ``image_embedding``); None when the batch has neither, or has pixels but no image encoder and
    the condition is optional."""
    if "video" not in inputs.batch and "image_embedding" not in inputs.batch:
        return None
    if getattr(inputs.encoders, "image_encoder", None) is None and "video" in inputs.batch:
        if condition.required:
            raise ConditionError(f"the condition {condition.name!r} reads image-encoder embeddings: set "
                                 "model.image_encoder")
        return None
    return inputs.encoders.batch_image_embedding(inputs.batch, condition.frame)


class ImageTokens(Condition):
    """A CLIP image embedding [B, 1, image_dim] -> ``num_tokens`` cross-attention tokens through an MLP
    (Linear -> SiLU -> Linear). I2VGen-XL's global image tokens (``context_embedding``, hidden 4 x model_channels)
    and TF-T2V's (``pre_image_condition``, hidden 1024).

    Args:
        num_tokens: tokens made. image_dim: width of the image embedding (0 = the UNet's ``image_dim``).
        hidden_dim: MLP hidden width (0 = the UNet's timestep-embedding width, 4 x model_channels).
        frame: which frame of the clip (or reference video) is embedded: ``first``, ``middle``, ``random`` or an index.
    """

    routes = ("tokens",)
    uses_reference = True
    needs_image_encoder = True
    default_original_names: ClassVar[dict[str, str]] = {"mlp.": "context_embedding."}

    def __init__(self, dims: UNetDims, *, num_tokens: int = 4, image_dim: int = 0, hidden_dim: int = 0,
                 frame: str | int = "first", **kwargs):
        super().__init__(**kwargs)
        for key, value, low in (("num_tokens", num_tokens, 1), ("image_dim", image_dim, 0), ("hidden_dim", hidden_dim, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if frame not in ("first", "middle", "random") and not (isinstance(frame, int) and not isinstance(frame, bool)):
            raise ValueError(f"frame must be first, middle, random or a frame index, got {frame!r}")
        self.num_tokens, self.image_dim, self.frame = num_tokens, image_dim or dims.image_dim, frame
        self.context_dim = dims.context_dim
        hidden = hidden_dim or dims.embed_dim
        self.mlp = nn.Sequential(nn.Linear(self.image_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dims.context_dim * num_tokens))

    def extract(self, inputs: ConditionInputs) -> torch.Tensor | None:
        return frame_embedding(self, inputs)

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        _check(self.name, value, value.ndim in (2, 3) and value.shape[-1] == self.image_dim,
               f"[B, 1, image_dim={self.image_dim}] (an image-encoder embedding)")
        return self.mlp(value).reshape(-1, self.num_tokens, self.context_dim)

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.randn(batch_size, 1, self.image_dim, dtype=dtype)


class ScalarEmbedding(Condition):
    """A per-clip number (fps, a motion score, ...) [B] -> MLP(sinusoid) added to the timestep embedding.

    The MLP's last layer starts at zero (``zero_init``), so a new scalar condition starts as a no-op. The value is
    read from the batch member of the condition's name (``fps`` for I2VGen-XL's fps embedding).
    """

    routes = ("embedding",)

    def __init__(self, dims: UNetDims, *, zero_init: bool = True, drop_to: str = "keep", guide_to: str = "keep",
                 **kwargs):
        super().__init__(drop_to=drop_to, guide_to=guide_to, **kwargs)
        self.dim = dims.model_channels
        self.mlp = EmbeddingMLP(dims.model_channels, dims.embed_dim, zero_init_last=zero_init)

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        _check(self.name, value, value.ndim <= 1, "a number per clip, [B] or a scalar")
        weight = self.mlp[0].weight
        return self.mlp(sinusoid_for(value.reshape(-1), self.dim, weight))

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.full((batch_size,), 8)


class FirstFrame(Condition):
    """I2VGen-XL's first-frame conditioning from the VAE latent of the input image ([B, C, H, W] or a latent video
    [B, C, F, H, W] of which frame 0 is used).

    * ``concat``: a per-frame conv stack over [frame-0 latent, then constant maps k/(F-1)] followed by a small
      temporal transformer, giving ``latent_channels`` extra input channels for every frame. The original adds this
      tensor twice (an acknowledged bug the released weights were trained with), so it is scaled by 2 here.
    * ``tokens``: a conv encoder pooling the frame-0 latent to an 8x8 grid -> 64 cross-attention tokens.

    Never dropped and kept in the unconditional branch (I2VGen-XL); zero for single-frame targets (``stills``).
    """

    routes = ("concat", "tokens")
    uses_reference = True
    default_original_names: ClassVar[dict[str, str]] = {"concat_encoder.": "local_image_concat.",
                                                         "temporal_encoder.": "local_temporal_encoder.",
                                                         "token_encoder.": "local_image_embedding."}

    def __init__(self, dims: UNetDims, *, encoder_depth: int = 1, drop_to: str = "keep", guide_to: str = "keep",
                 stills: str = "zeros", required: bool = True, **kwargs):
        super().__init__(drop_to=drop_to, guide_to=guide_to, stills=stills, required=required, **kwargs)
        c = self.latent_channels = dims.latent_channels
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
            nn.Conv2d(c * 16, dims.context_dim, 3, stride=2, padding=1),
        )

    @property
    def channels(self) -> int:
        return self.latent_channels

    def extract(self, inputs: ConditionInputs) -> torch.Tensor | None:
        return None if inputs.latents is None else inputs.latents[:, :, :1]

    def forward(self, value: torch.Tensor, num_frames: int) -> dict[str, torch.Tensor]:
        _check(self.name, value, value.ndim in (4, 5) and value.shape[1] == self.latent_channels,
               f"[B, {self.latent_channels}, H, W] or [B, {self.latent_channels}, F, H, W] (the image's VAE latent)")
        frame0 = value.unsqueeze(2) if value.ndim == 4 else value[:, :, :1]
        return {"concat": self.concat(frame0, num_frames), "tokens": self.tokens(frame0)}

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

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.randn(batch_size, self.latent_channels, 1, height, width, dtype=dtype)


def original_names(conditions: Mapping[str, Condition]) -> dict[str, str]:
    """``{our key prefix: original VGen key prefix}`` over ``conditions`` (as registered under ``conditions.``)."""
    return {f"conditions.{name}.{ours}": theirs for name, cond in conditions.items()
            for ours, theirs in cond.original_names.items()}
