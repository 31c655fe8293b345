"""Image-text rewards from an OpenCLIP model: plain CLIP score and HPSv2 (Human Preference Score v2).

Both score a frame by the cosine similarity of the L2-normalised image and text embeddings (times ``scale``).
HPSv2 is an OpenCLIP ViT-H-14 fine-tuned on human preferences; its released ``HPS_v2.pt`` is an OpenCLIP state
dict (``{'state_dict': ...}``), and it is used without the logit scale, so scores are typically 0.2 - 0.3
(InstructVideo's reward). Pre-processing is InstructVideo's, in torch and differentiable: resize the short side
to the model's input size (bilinear, antialiased), centre crop, CLIP mean/std normalisation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer

from vgen.models.text_encoder import build_clip, clip_config
from vgen.rewards.base import RewardModel

log = logging.getLogger(__name__)


def _with_causal_mask(clip: torch.nn.Module) -> torch.nn.Module:
    """Re-create open_clip's non-persistent causal ``attn_mask`` where loading left it on the meta device.

    ``build_frozen`` builds on the meta device and loads the state dict, which has no non-persistent buffers.
    """
    mask = getattr(clip, "attn_mask", None)
    if isinstance(mask, torch.Tensor) and mask.is_meta:
        length = mask.shape[0]
        clip.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu_(1), persistent=False)
    left = [name for name, buffer in clip.named_buffers() if buffer.is_meta]
    if left:
        raise RuntimeError(f"OpenCLIP buffers {left} were not materialised after loading the weights")
    return clip


class CLIPScore(RewardModel):
    """``scale * cos(image_embedding(frame), text_embedding(caption))`` of an OpenCLIP model.

    Args:
        arch: OpenCLIP architecture ("ViT-H-14", "ViT-B-32", ... or vgen's "tiny" for tests).
        weights: OpenCLIP state dict file (``open_clip_pytorch_model.bin``, ``.safetensors``, or a
            ``{'state_dict': ...}`` checkpoint such as HPS_v2.pt); ``None``: seeded random init.
        scale: multiplies the cosine (1 = InstructVideo / HPSv2; 100 = the CLIPScore metric's convention).
    """

    def __init__(self, arch: str = "ViT-H-14", weights: str | None = None, scale: float = 1.0):
        super().__init__()
        config = clip_config(arch)
        self.clip = _with_causal_mask(build_clip(config, weights))
        for unused in ("logit_scale", "logit_bias"):  # scores are plain cosines; DeepSpeed cannot broadcast 0-d params
            if isinstance(getattr(self.clip, unused, None), torch.nn.Parameter):
                delattr(self.clip, unused)
        size = config["vision_cfg"]["image_size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.tokenizer = SimpleTokenizer(context_length=self.clip.context_length)
        self.scale = float(scale)
        self.arch = arch
        self.freeze()

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> normalised [N, 3, *image_size]."""
        height, width = frames.shape[-2:]
        target_h, target_w = self.image_size
        if (height, width) != (target_h, target_w):
            ratio = max(target_h / height, target_w / width)  # short side to the input size
            size = (max(target_h, round(height * ratio)), max(target_w, round(width * ratio)))
            frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
            top, left = (size[0] - target_h) // 2, (size[1] - target_w) // 2
            frames = frames[:, :, top:top + target_h, left:left + target_w]
        mean = frames.new_tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = frames.new_tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
        return (frames - mean) / std

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] (no gradient: the captions are data)."""
        unique = sorted(set(captions))
        tokens = self.tokenizer(unique).to(self.clip.token_embedding.weight.device)
        features = self.clip.encode_text(tokens, normalize=True)
        index = torch.tensor([unique.index(c) for c in captions], device=features.device)
        return features[index]

    def score(self, frames: torch.Tensor, captions: list[str]) -> torch.Tensor:
        dtype = next(self.clip.visual.parameters()).dtype
        image = self.clip.encode_image(self.preprocess(frames).to(dtype), normalize=True)
        text = self.text_features(captions).to(image.dtype)
        return self.scale * (image * text).sum(dim=-1).float()


class HPSv2Reward(CLIPScore):
    """HPSv2: an OpenCLIP ViT-H-14 with the user's ``HPS_v2.pt`` weights, cosine score without logit scale.

    ``weights`` is required for every architecture except vgen's ``tiny`` stand-in (random init, for tests):
    random ViT-H-14 weights would make the reward meaningless.
    """

    def __init__(self, weights: str | None = None, arch: str = "ViT-H-14"):
        if weights is None and arch != "tiny":
            raise ValueError("model.reward.weights is null: HPSv2 needs its weights file, e.g. "
                             "model.reward.weights=${paths.weights_dir}/HPS_v2.pt (from the HPSv2 release)")
        if weights is None:
            log.warning("HPSv2Reward(arch='tiny') without weights: a random stand-in for tests, not a reward")
        super().__init__(arch=arch, weights=weights, scale=1.0)
