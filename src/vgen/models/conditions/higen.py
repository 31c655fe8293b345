"""HiGen's conditions (VGen ``UNetSD_HiGen``): a learned-query text resampler, the motion and appearance cues added
to each frame's timestep embedding, and the spatial prior added after the input conv.

* :class:`TextResampler` -- ``num_tokens`` learned queries cross-attend (``depth`` blocks whose both attentions
  read the text) to the caption tokens mapped to 4 x model_channels; the result, mapped to the token width, is the
  whole cross-attention context (no raw text tokens).
* :class:`MotionCue` -- motion intensity per adjacent-frame pair [B, F-1] (ints; [B] for one frame) ->
  sinusoid -> linearly interpolated over time to F -> MLP (last layer zero-initialised).
* :class:`AppearanceCue` -- each frame's similarity to the frames of the clip [B, F, max_frames] -> MLP (last
  layer zero-initialised).
* :class:`SpatialPrior` -- a key-frame latent [B, C, H, W] -> zero-initialised conv, added to every frame's
  features after the first conv.

The zero-initialised paths make a HiGen UNet initialised from a T2V / I2VGen-XL checkpoint compute exactly what
that checkpoint computes (up to the text resampler, which HiGen trains from scratch).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vgen.models.blocks import TransformerBlock
from vgen.models.conditions.base import Condition, ConditionError, ConditionInputs, UNetDims
from vgen.models.conditions.standard import EmbeddingMLP, TextTokens, sinusoid_for


class TextResampler(TextTokens):
    """Caption tokens [B, L, text_dim] -> ``num_tokens`` context tokens through learned-query cross-attention
    (HiGen's ``TextContextCrossTransformerMultiLayer``)."""

    default_original_names: ClassVar[dict[str, str]] = {"": "context_embedding."}

    def __init__(self, dims: UNetDims, *, text_dim: int = 1024, num_tokens: int = 16, depth: int = 2, **kwargs):
        super().__init__(dims, **kwargs)
        for key, value in (("text_dim", text_dim), ("num_tokens", num_tokens), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        width = dims.embed_dim
        self.text_dim = text_dim
        self.context_transformer = nn.ModuleList(
            TransformerBlock(width, 8, width // 8, width, disable_self_attn=True) for _ in range(depth))
        self.input_mapping = nn.Linear(text_dim, width)
        self.output_mapping = nn.Linear(width, dims.context_dim)
        self.tokens = nn.Parameter(width**-0.5 * torch.randn(1, num_tokens, width))

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        if value.ndim != 3 or value.shape[-1] != self.text_dim:
            raise ConditionError(f"condition {self.name!r} must be [B, L, text_dim={self.text_dim}] (text-encoder "
                                 f"tokens), got shape {tuple(value.shape)}")
        text = self.input_mapping(value)
        out = self.tokens.repeat(text.shape[0], 1, 1)
        for block in self.context_transformer:
            out = block(out, text)
        return self.output_mapping(out)

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.randn(batch_size, 77, self.text_dim, dtype=dtype)


class MotionCue(Condition):
    """Motion intensity between adjacent frames [B, F-1] (or one per frame [B, F]; [B] for a single frame) ->
    sinusoid -> linear interpolation to F frames -> MLP, added to each frame's timestep embedding."""

    routes = ("embedding",)
    default_original_names: ClassVar[dict[str, str]] = {"mlp.": "msim_embedding."}

    def __init__(self, dims: UNetDims, *, drop_to: str = "keep", guide_to: str = "keep", **kwargs):
        super().__init__(drop_to=drop_to, guide_to=guide_to, **kwargs)
        self.dim = dims.model_channels
        self.mlp = EmbeddingMLP(dims.model_channels, dims.embed_dim, zero_init_last=True)

    def extract(self, inputs: ConditionInputs) -> torch.Tensor | None:
        """The batch's ``motion`` member (its name), else measured from the clip's frames
        (:func:`vgen.data.conditions.cues.motion_intensity`); 0 for single frames."""
        given = super().extract(inputs)
        if given is not None:
            return given
        video = inputs.batch.get("video")
        b = inputs.batch_size
        if inputs.num_frames == 1 or video is None or video.shape[2] == 1:
            return torch.zeros(b, dtype=torch.long, device=inputs.encoders.device)
        from vgen.data.conditions.cues import motion_intensity

        pixels = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1)
        return torch.stack([motion_intensity(clip.cpu()) for clip in pixels]).to(inputs.encoders.device)

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        weight = self.mlp[0].weight
        if num_frames == 1:
            if value.numel() != value.shape[0]:
                raise ConditionError(f"condition {self.name!r} of a single frame must be [B], got {tuple(value.shape)}")
            return self.mlp(sinusoid_for(value.reshape(-1), self.dim, weight))
        b = value.shape[0]
        if value.ndim != 2 or value.shape[1] not in (num_frames - 1, num_frames):
            raise ConditionError(f"condition {self.name!r} must be [B, F-1={num_frames - 1}] (one per adjacent-frame "
                                 f"pair) or [B, F={num_frames}], got shape {tuple(value.shape)}")
        embedding = sinusoid_for(value.flatten(), self.dim, weight).view(b, value.shape[1], self.dim)
        if value.shape[1] != num_frames:
            embedding = F.interpolate(embedding.transpose(1, 2), size=num_frames, mode="linear").transpose(1, 2)
        return self.mlp(embedding)  # [B, F, embed_dim]

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        if num_frames == 1:
            return torch.zeros(batch_size, dtype=torch.long)
        return torch.full((batch_size, num_frames - 1), 500, dtype=torch.long)


class AppearanceCue(Condition):
    """Each frame's appearance similarity to the clip's frames [B, F, max_frames] (padded) -> MLP, added to each
    frame's timestep embedding."""

    routes = ("embedding",)
    needs_image_encoder = True  # measured from the clip's frames with the image encoder
    default_original_names: ClassVar[dict[str, str]] = {"mlp.": "asim_embedding."}

    def __init__(self, dims: UNetDims, *, max_frames: int = 32, drop_to: str = "keep", guide_to: str = "keep",
                 **kwargs):
        super().__init__(drop_to=drop_to, guide_to=guide_to, **kwargs)
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
            raise ValueError(f"max_frames must be an integer >= 1, got {max_frames!r}")
        self.max_frames = max_frames
        self.mlp = nn.Sequential(nn.Linear(max_frames, dims.embed_dim), nn.SiLU(),
                                 nn.Linear(dims.embed_dim, dims.embed_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def extract(self, inputs: ConditionInputs) -> torch.Tensor | None:
        """The batch's member of this name, else the cosine similarities of the clip's frames' image-encoder
        embeddings (:func:`vgen.data.conditions.cues.appearance_similarity`); all ones for single frames."""
        from vgen.data.conditions.cues import appearance_schedule, appearance_similarity

        given = super().extract(inputs)
        if given is not None:
            return given
        video, device = inputs.batch.get("video"), inputs.encoders.device
        if inputs.num_frames == 1 or video is None or video.shape[2] == 1:
            return appearance_schedule(1, max_frames=self.max_frames).to(device).expand(inputs.batch_size, 1, -1)
        encoder = getattr(inputs.encoders, "image_encoder", None)
        if encoder is None:
            raise ConditionError(f"the condition {self.name!r} is measured with the image encoder: set "
                                 "model.image_encoder (or store the cue as a batch member)")
        b, _, f = video.shape[:3]
        with torch.no_grad():
            embeddings = encoder(video.transpose(1, 2).flatten(0, 1)).reshape(b, f, -1)
        return torch.stack([appearance_similarity(e, self.max_frames) for e in embeddings]).to(device)

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        if value.ndim != 3 or value.shape[1:] != (num_frames, self.max_frames):
            raise ConditionError(f"condition {self.name!r} must be [B, F={num_frames}, {self.max_frames}] (each "
                                 f"frame's similarity to the clip's frames, padded), got shape {tuple(value.shape)}")
        return self.mlp(value)

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.ones(batch_size, num_frames, self.max_frames, dtype=dtype)


class SpatialPrior(Condition):
    """A key-frame latent [B, C, H, W] -> zero-initialised conv to the first level's width, added to every frame's
    features right after the input conv (HiGen's ``img_embedding``)."""

    routes = ("feature",)
    default_original_names: ClassVar[dict[str, str]] = {"conv.": "img_embedding."}

    def __init__(self, dims: UNetDims, *, drop_to: str = "zeros", guide_to: str = "keep", stills: str = "zeros",
                 **kwargs):
        super().__init__(drop_to=drop_to, guide_to=guide_to, stills=stills, **kwargs)
        self.latent_channels = dims.latent_channels
        self.conv = nn.Conv2d(dims.latent_channels, dims.model_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def extract(self, inputs: ConditionInputs) -> torch.Tensor | None:
        """The batch's member of this name, else the clean latent of the clip's first frame (zeros for single
        frames through ``stills: zeros``)."""
        given = super().extract(inputs)
        if given is not None:
            return given
        return None if inputs.latents is None else inputs.latents[:, :, 0]

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        if value.ndim == 5 and value.shape[2] == 1:
            value = value[:, :, 0]
        if value.ndim != 4 or value.shape[1] != self.latent_channels:
            raise ConditionError(f"condition {self.name!r} must be [B, {self.latent_channels}, H, W] (a key-frame "
                                 f"latent), got shape {tuple(value.shape)}")
        return self.conv(value)

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.randn(batch_size, self.latent_channels, height, width, dtype=dtype)


__all__ = ["AppearanceCue", "MotionCue", "SpatialPrior", "TextResampler"]
