"""Frozen OpenCLIP image encoder: images [B, 3, H, W] in [-1, 1] -> projected CLIP embedding [B, 1, embed_dim]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from vgen.models.frozen import FrozenModule
from vgen.models.text_encoder import build_clip, clip_config


class OpenCLIPImageEncoder(FrozenModule):
    """``encode_image`` of an OpenCLIP model with VGen's preprocessing (I2VGen-XL image condition).

    Centre square crop of the short side, bilinear (antialiased) resize to the model's input size, CLIP mean/std
    normalisation of the [0, 1] pixels; all in torch, batched and differentiable. The pooled, projected embedding
    is returned as is (not L2-normalised).

    Args:
        arch: "ViT-H-14" (embedding 1024, input 224) or "tiny" (embedding 32, input 32).
        weights: OpenCLIP weights file; ``None``: random init from a fixed seed.
    """

    def __init__(self, arch: str = "ViT-H-14", weights: str | None = None):
        super().__init__()
        config = clip_config(arch)
        self.visual = build_clip(config, weights).visual
        size = config["vision_cfg"]["image_size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.dim: int = config["embed_dim"]
        self.freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised [B, 3, *image_size] ready for the vision tower."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x = images[:, :, top:top + side, left:left + side]
        if x.shape[-2:] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        mean = x.new_tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
        return ((x + 1) / 2 - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 1, dim]."""
        dtype = next(self.visual.parameters()).dtype
        return self.visual(self.preprocess(images).to(dtype))[:, None]
