"""CLIP scores of videos: CLIPSIM (text-frame cosine) and frame consistency (adjacent-frame cosine).

One OpenCLIP model (:func:`vgen.models.text_encoder.build_clip`, weights loaded strictly from a file) gives both
embeddings: the pooled, projected text embedding (``encode_text``) and the pooled, projected image embedding
(``encode_image``), each L2-normalised. Frames are centre-cropped to a square, resized (bilinear, antialiased) to
the model's input size and normalised with the CLIP mean and std, as :mod:`vgen.models.image_encoder` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer

from vgen.eval.i3d import one_line


class ClipScorer:
    """Normalised CLIP embeddings of prompts and video frames, from ``arch`` ("ViT-H-14", "tiny", ...) with the
    weights of ``weights`` (an OpenCLIP ``open_clip_pytorch_model.bin`` or ``.safetensors``)."""

    def __init__(self, arch: str, weights: str | Path, device: torch.device | str = "cpu"):
        from vgen.models.text_encoder import build_clip, clip_config

        try:
            model = build_clip(clip_config(arch), str(weights))
        except ValueError as err:  # a state dict that does not match the architecture: keys named
            raise ValueError(one_line(err)) from None
        # the causal text mask is not saved (built on the meta device, it holds no values): open_clip's own mask
        length = model.context_length
        model.attn_mask = torch.full((length, length), float("-inf")).triu_(1)
        self.model = model.to(device).eval()
        size = self.model.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.tokenizer = SimpleTokenizer(context_length=self.model.context_length)
        self.device = torch.device(device)
        self._memo: tuple[list, list[torch.Tensor]] | None = None  # the last videos' frame embeddings

    @torch.no_grad()
    def text(self, prompts: list[str]) -> torch.Tensor:
        """[N, D] unit text embeddings."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [F, H, W, 3] -> [F, D] unit image embeddings."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255
        height, width = x.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x = F.interpolate(x[:, :, top:top + side, left:left + side], size=self.image_size, mode="bilinear",
                          align_corners=False, antialias=True)
        x = (x - x.new_tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / x.new_tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def _frame_embeddings(self, videos: list[np.ndarray]) -> list[torch.Tensor]:
        """Each video's frame embeddings; CLIPSIM and consistency of the same list share one computation."""
        if self._memo is None or self._memo[0] is not videos:
            self._memo = (videos, [self.frames(video) for video in videos])
        return self._memo[1]

    def clipsim(self, videos: list[np.ndarray], prompts: list[str]) -> list[float]:
        """Per video: the mean over frames of the cosine between the prompt's and the frame's embeddings."""
        texts = self.text(prompts)
        return [float((frames @ text).mean()) for frames, text in zip(self._frame_embeddings(videos), texts)]

    def consistency(self, videos: list[np.ndarray]) -> list[float]:
        """Per video: the mean cosine of adjacent frames' embeddings (NaN for a single frame)."""
        return [float((e[1:] * e[:-1]).sum(-1).mean()) if len(e) > 1 else float("nan")
                for e in self._frame_embeddings(videos)]
