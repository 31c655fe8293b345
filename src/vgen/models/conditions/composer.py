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

from collections.abc import Sequence
from typing import ClassVar

import torch
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
        resolution: ``[W, H]`` of the training frames in pixels; the encoder pools to (H/2, W/2), so its output has
            the latent size H/8 x W/8 whatever size the maps come in.
        encoder_depth: layers of the temporal transformer (the original's ``adapter_transformer_layers``).
        member: the batch member holding the maps (default: the condition's name); [B, C, F, H, W] or, for one
            channel, [B, F, H, W].

    Dropped in training by zeroing its output (VideoComposer's DropPath), kept in the unconditional branch.
    """

    routes = ("concat",)
    summed = True
    uses_reference = True

    def __init__(self, dims: UNetDims, *, composition: str | None = None, in_channels: int = 0,
                 resolution: Sequence[int] = (256, 256), encoder_depth: int = 1, member: str | None = None,
                 drop_to: str = "drop", guide_to: str = "keep", dropout: float = 0.5, **kwargs):
        if composition is not None and composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)} (or null with in_channels), "
                             f"got {composition!r}")
        channels, *names = COMPOSITIONS[composition] if composition else (0, None, None)
        in_channels = in_channels or channels
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
        resolution = tuple(resolution)
        if len(resolution) != 2 or any(not isinstance(v, int) or v < 8 for v in resolution):
            raise ValueError(f"resolution must be [W, H] in pixels (each >= 8), got {list(resolution)}")
        if not dims.concat_channels:
            raise ValueError("needs the UNet's shared concat block: set model.unet.concat_channels (VideoComposer: 8)")
        defaults = {"encoder.": f"{names[0]}.", "temporal.": f"{names[1]}."} if composition else {}
        kwargs["original_names"] = {**defaults, **(kwargs.get("original_names") or {})}
        super().__init__(drop_to=drop_to, guide_to=guide_to, dropout=dropout, **kwargs)
        self.composition, self.in_channels, self.resolution, self.member = composition, in_channels, resolution, member
        c = dims.concat_channels
        width, height = resolution
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c * 4, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d((height // 2, width // 2)),
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

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        if value.ndim != 5 or value.shape[1] != self.in_channels:
            raise ConditionError(f"condition {self.name!r} must be [B, {self.in_channels}, F, H, W] pixel-space maps, "
                                 f"got shape {tuple(value.shape)}")
        if value.shape[2] != num_frames:
            raise ConditionError(f"condition {self.name!r} has {value.shape[2]} frames, the video {num_frames}")
        b = value.shape[0]
        feats = self.encoder(fold_frames(value))  # [(B F), c, h, w]
        _, c, h, w = feats.shape
        feats = feats.reshape(b, num_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)
        feats = self.temporal(feats)
        return feats.reshape(b, h, w, num_frames, c).permute(0, 4, 3, 1, 2)

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        """Maps at the training resolution (the latent ``height`` x ``width`` is not needed: the encoder pools)."""
        return torch.rand(batch_size, self.in_channels, num_frames, self.resolution[1], self.resolution[0],
                          dtype=dtype)


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
