"""DreamVideo's appearance guidance as conditions of the ``adapter`` kind (read by the motion adapter,
:class:`vgen.models.dreamvideo.MotionAdapter`; the base network never reads them).

* :class:`AppearanceImage` -- the image-encoder (CLIP) embedding of one frame, c: [B, D] or [B, 1, D] (repeated to
  every frame) or [B, F, D] (one per frame). In training the frame is drawn at random from the clip; dropped
  (``dropout`` = VGen's ``p_image_zero``) and unconditional values are a zero vector, as VGen's ``zero_feature``.
* :class:`AdapterStrength` -- the scale lambda of the appearance term (VGen's ``ag_strength``): a number or one per
  sample [B]; absent = 1. Never dropped; at sampling DreamVideo gives the conditional and the unconditional branch
  their own strengths.

Each temporal adapter adds ``lambda * W_c c`` to its input (W_c with a bias, one per adapter). The encoded value is
``[c, 1]`` per frame, [B, F, D + 1]: the last entry marks the embedding as present. ``drop_to: drop`` (the UNet's
per-sample keep masks) zeroes both, which removes the whole term, bias included, so the projection of a dropped
sample gets no gradient; ``drop_to: zeros`` (VGen) keeps the bias, and only W_c gets none.
"""

from __future__ import annotations

import torch

from vgen.models.conditions.base import Condition, ConditionError, ConditionInputs, UNetDims
from vgen.models.conditions.standard import frame_embedding

FRAMES = ("first", "middle", "random")


class AppearanceImage(Condition):
    """The image-encoder embedding of one frame of the clip (or of the appearance reference image at sampling),
    handed to the motion adapter.

    Args:
        image_dim: embedding width (0 = the UNet's ``image_dim``).
        frame: the frame the image encoder sees: ``random`` (DreamVideo's ``get_random_frame``), ``first``,
            ``middle`` or an index.
    """

    routes = ("adapter",)
    uses_reference = True
    needs_image_encoder = True

    def __init__(self, dims: UNetDims, *, image_dim: int = 0, frame: str | int = "random", **kwargs):
        super().__init__(**kwargs)
        if isinstance(image_dim, bool) or not isinstance(image_dim, int) or image_dim < 0:
            raise ValueError(f"image_dim must be an integer >= 0, got {image_dim!r}")
        if frame not in FRAMES and not (isinstance(frame, int) and not isinstance(frame, bool)):
            raise ValueError(f"frame must be one of {FRAMES} or a frame index, got {frame!r}")
        self.image_dim = image_dim or dims.image_dim
        self.frame = frame

    def extract(self, inputs: ConditionInputs) -> torch.Tensor | None:
        return frame_embedding(self, inputs)

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        if value.ndim == 2:
            value = value[:, None]
        if value.ndim != 3 or value.shape[-1] != self.image_dim or value.shape[1] not in (1, num_frames):
            raise ConditionError(f"condition {self.name!r} must be [B, 1, image_dim={self.image_dim}] (one "
                                 f"embedding for the clip) or [B, F={num_frames}, {self.image_dim}] (one per frame), "
                                 f"got shape {tuple(value.shape)}")
        value = value.expand(-1, num_frames, -1)
        return torch.cat([value, value.new_ones(*value.shape[:2], 1)], dim=-1)

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.randn(batch_size, 1, self.image_dim, dtype=dtype)


class AdapterStrength(Condition):
    """A number per sample [B] (or one for the batch) that scales an adapter's condition term; absent = 1."""

    routes = ("adapter",)

    def __init__(self, dims: UNetDims, *, drop_to: str = "keep", guide_to: str = "keep", **kwargs):
        super().__init__(drop_to=drop_to, guide_to=guide_to, **kwargs)

    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor:
        if value.ndim > 1 or value.dtype == torch.bool or value.is_complex():
            raise ConditionError(f"condition {self.name!r} must be a number, or one per sample [B], got shape "
                                 f"{tuple(value.shape)}")
        return value if value.is_floating_point() else value.float()

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.ones(batch_size, dtype=dtype)


__all__ = ["AdapterStrength", "AppearanceImage"]
