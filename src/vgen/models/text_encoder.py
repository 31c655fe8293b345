"""Frozen OpenCLIP text encoder: captions -> per-token features [B, 77, width] (Stable Diffusion 2 style).

Also builds the OpenCLIP models for :mod:`vgen.models.image_encoder`. Each encoder keeps only its own tower of
the CLIP model, so text and image encoders built from one weights file never hold a tensor twice.
"""

from __future__ import annotations

import copy

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer

from vgen.models.frozen import FrozenModule, build_frozen, read_state_dict

TINY_CLIP = {  # CPU tests and the demo: 3.4M parameters, 3.2M of them the 49408-token embedding
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_SKIPPED_LAYERS = {"last": 0, "penultimate": 1}


def clip_config(arch: str) -> dict:
    """``open_clip.CLIP`` keyword arguments of ``arch`` ("tiny" or an OpenCLIP model name such as "ViT-H-14")."""
    if arch == "tiny":
        return copy.deepcopy(TINY_CLIP)
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown OpenCLIP architecture {arch!r}; use 'tiny' or one of open_clip.list_models()")
    if config.get("custom_text") or "multimodal_cfg" in config or config["text_cfg"].get("hf_model_name"):
        raise ValueError(f"OpenCLIP architecture {arch!r} is not a plain open_clip.CLIP model; it is not supported")
    return config


def build_clip(config: dict, weights: str | None) -> open_clip.CLIP:
    """The whole CLIP model: seeded random init, or an OpenCLIP state dict file (``open_clip_pytorch_model.bin``
    or ``.safetensors``) loaded strictly."""
    state = None if weights is None else read_state_dict(weights)
    return build_frozen(lambda: open_clip.CLIP(**config), state, source=str(weights))


class OpenCLIPTextEncoder(FrozenModule):
    """Token features of an OpenCLIP text transformer, as VGen's ``FrozenOpenCLIPEmbedder``.

    Tokenise (77 tokens, truncated), token + positional embedding, run the residual blocks with the causal mask
    (all but the last one for ``layer="penultimate"``), then ``ln_final``. No pooling, no projection.

    Args:
        arch: "ViT-H-14" (width 1024) or "tiny" (width 64, for tests and the demo).
        weights: OpenCLIP weights file; ``None``: random init from a fixed seed (same embeddings in every process).
        layer: "penultimate" (Stable Diffusion 2, VGen) or "last".
        max_length: tokens per caption (at most the model's context length, 77).
    """

    def __init__(self, arch: str = "ViT-H-14", weights: str | None = None, layer: str = "penultimate",
                 max_length: int = 77):
        super().__init__()
        if layer not in _SKIPPED_LAYERS:
            raise ValueError(f"layer must be one of {list(_SKIPPED_LAYERS)}, got {layer!r}")
        clip = build_clip(clip_config(arch), weights)
        if not 1 <= max_length <= clip.context_length:
            raise ValueError(f"max_length must be in [1, {clip.context_length}] for {arch}, got {max_length}")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.num_layers = clip.transformer.layers - _SKIPPED_LAYERS[layer]
        self.dim: int = clip.transformer.width
        self.max_length = max_length
        self.tokenizer = SimpleTokenizer(context_length=max_length)
        self.freeze()

    def forward(self, captions: list[str]) -> torch.Tensor:
        """``captions`` -> [B, max_length, dim]."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, got a single string")
        tokens = self.tokenizer(list(captions)).to(self.token_embedding.weight.device)
        x = self.token_embedding(tokens) + self.positional_embedding[: self.max_length]
        causal_mask = torch.full((self.max_length, self.max_length), float("-inf"), device=x.device,
                                 dtype=x.dtype).triu_(1)
        for block in self.transformer.resblocks[: self.num_layers]:
            x = block(x, attn_mask=causal_mask)
        return self.ln_final(x)
