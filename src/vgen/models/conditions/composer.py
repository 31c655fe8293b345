"""VideoComposer's compositional conditions (VGen ``UNetSD_TFT2V`` / ``UNetSD_VideoLCM`` with its compositions).

* :class:`SpatioTemporalCondition` -- one STC encoder per spatial or temporal condition (depth, sketch, motion
  vectors, masked video, the first frame, a single sketch, canny edges): pixel-space maps [B, C, F, Hp, Wp] ->
  conv -> adaptive average pool to half the training resolution -> two stride-2 convs down to ``concat_channels`` at
  latent resolution -> one temporal transformer over the frames of every position. The outputs of all present
  conditions are summed into the UNet's shared concat block (absent ones add nothing).
* :class:`PaletteTokens` -- a per-frame colour histogram -> one cross-attention token per frame.
* The style image is :class:`vgen.models.conditions.ImageTokens` (TF-T2V's ``pre_image_condition``, 4 tokens after
  the text).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vgen.models.blocks import FrameSequenceEncoder, fold_frames
from vgen.models.conditions.base import Condition, ConditionError, ConditionInputs, UNetDims

# Composition name -> (input channels, the original's two module names). The original spells the mask's temporal
# encoder ``mask_embedding_after`` after a ``masked_embedding``.
COMPOSITIONS: dict[str, tuple[int, str, str]] = {
    "depthmap": (1, "depth_embedding", "depth_embedding_after"),
    "motion": (2, "motion_embedding", "motion_embedding_after"),
    "canny": (1, "canny_embedding", "canny_embedding_after"),
    "mask": (4, "masked_embedding", "mask_embedding_after"),
    "sketch": (1, "sketch_embedding", "sketch_embedding_after"),
    "single_sketch": (1, "single_sketch_embedding", "single_sketch_embedding_after"),
    "local_image": (3, "local_image_embedding", "local_image_embedding_after"),
}


class SpatioTemporalCondition(Condition):
    """A spatial/temporal condition map through its STC encoder, summed into the shared concat block.

    Args:
        composition: which of :data:`COMPOSITIONS` (sets the input channels and the original module names), or
            ``None`` with ``in_channels`` for a condition of your own.
        in_channels: channels of the pixel-space maps (default: the composition's).

    The encoder pools to 4x the latent size (VGen: H/2 x W/2 of 8x-downsampled latents, the original's
    ``config.resolution // 2``), so after its two stride-2 convs its output has the latent size, whatever size the
    maps come in and whatever the VAE's downsampling (pixel space included).
        encoder_depth: layers of the temporal transformer (the original's ``adapter_transformer_layers``).
        member: the batch member holding the maps (default: the condition's name); [B, C, F, H, W] or, for one
            channel, [B, F, H, W].

    Dropped in training by zeroing its output (VideoComposer's DropPath), kept in the unconditional branch.
    """

    routes = ("concat",)
    summed = True
    uses_reference = True
    wants_latent_size = True

    def __init__(self, dims: UNetDims, *, composition: str | None = None, in_channels: int = 0,
                 encoder_depth: int = 1, member: str | None = None,
                 drop_to: str = "drop", guide_to: str = "keep", dropout: float = 0.5, **kwargs):
        if composition is not None and composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)} (or null with in_channels), "
                             f"got {composition!r}")
        channels, *names = COMPOSITIONS[composition] if composition else (0, None, None)
        in_channels = in_channels or channels
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
        if not dims.concat_channels:
            raise ValueError("needs the UNet's shared concat block: set model.unet.concat_channels (VideoComposer: 8)")
        defaults = {"encoder.": f"{names[0]}.", "temporal.": f"{names[1]}."} if composition else {}
        kwargs["original_names"] = {**defaults, **(kwargs.get("original_names") or {})}
        super().__init__(drop_to=drop_to, guide_to=guide_to, dropout=dropout, **kwargs)
        self.composition, self.in_channels, self.member = composition, in_channels, member
        c = dims.concat_channels
        self.encoder = nn.Sequential(  # [2] pools adaptively to 4x the latent size, given at forward
            nn.Conv2d(in_channels, c * 4, 3, padding=1), nn.SiLU(), nn.Identity(),
            nn.Conv2d(c * 4, c * 4, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c * 4, c, 3, stride=2, padding=1),
        )
        self.temporal = FrameSequenceEncoder(dim=c, heads=2, head_dim=c, depth=encoder_depth)

    def extract(self, inputs: ConditionInputs) -> torch.Tensor | None:
        value = inputs.batch.get(self.member or self.name)
        if value is None:
            return None
        value = torch.as_tensor(value, device=inputs.encoders.device)
        return value.unsqueeze(1) if value.ndim == 4 and self.in_channels == 1 else value

    def forward(self, value: torch.Tensor, num_frames: int, latent_size: tuple[int, int] | None = None
                ) -> torch.Tensor:
        if latent_size is None:
            raise ConditionError(f"condition {self.name!r} needs the latent size (the UNet passes it)")
        if value.ndim != 5 or value.shape[1] != self.in_channels:
            raise ConditionError(f"condition {self.name!r} must be [B, {self.in_channels}, F, H, W] pixel-space maps, "
                                 f"got shape {tuple(value.shape)}")
        if value.shape[2] != num_frames:
            raise ConditionError(f"condition {self.name!r} has {value.shape[2]} frames, the video {num_frames}")
        b = value.shape[0]
        enc = self.encoder
        feats = enc[1](enc[0](fold_frames(value)))
        feats = F.adaptive_avg_pool2d(feats, (4 * latent_size[0], 4 * latent_size[1]))
        feats = enc[5](enc[4](enc[3](feats)))  # [(B F), c, h, w]
        _, c, h, w = feats.shape
        feats = feats.reshape(b, num_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)
        feats = self.temporal(feats)
        return feats.reshape(b, h, w, num_frames, c).permute(0, 4, 3, 1, 2)

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        """Maps for an 8x-downsampled ``height`` x ``width`` latent (any size works: the encoder pools)."""
        return torch.rand(batch_size, self.in_channels, num_frames, 8 * height, 8 * width, dtype=dtype)


class PaletteTokens(Condition):
    """A per-frame colour histogram [B, F, bins] -> MLP -> one cross-attention token per frame (appended after the
    clip's tokens of each frame; VideoComposer's optional ``histogram``)."""

    routes = ("tokens",)
    default_original_names: ClassVar[dict[str, str]] = {"mlp.": "hist_context_embedding."}

    def __init__(self, dims: UNetDims, *, bins: int = 156, member: str | None = None, drop_to: str = "drop",
                 guide_to: str = "keep", dropout: float = 0.5, **kwargs):
        super().__init__(drop_to=drop_to, guide_to=guide_to, dropout=dropout, **kwargs)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
        self.bins, self.member, self.context_dim = bins, member, dims.context_dim
        self.mlp = nn.Sequential(nn.Linear(bins, dims.embed_dim), nn.SiLU(), nn.Linear(dims.embed_dim, dims.context_dim))

    def extract(self, inputs: ConditionInputs) -> torch.Tensor | None:
        value = inputs.batch.get(self.member or self.name)
        return None if value is None else torch.as_tensor(value, device=inputs.encoders.device)

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        if value.ndim != 3 or value.shape[1:] != (num_frames, self.bins):
            raise ConditionError(f"condition {self.name!r} must be [B, F={num_frames}, {self.bins}] histograms, got "
                                 f"shape {tuple(value.shape)}")
        return self.mlp(value)[:, :, None]  # [B, F, 1, context_dim]: per-frame tokens

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.rand(batch_size, num_frames, self.bins, dtype=dtype)
