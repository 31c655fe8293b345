"""Frozen OpenCLIP text encoder: captions -> per-token features [B, 77, width] (Stable Diffusion 2 style).

Also builds the OpenCLIP models for :mod:`vgen.models.image_encoder`. Each encoder keeps only its own tower of
the CLIP model, so text and image encoders built from one weights file never hold a tensor twice.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer

from vgen.models.frozen import FrozenModule, build_frozen, read_state_dict
from vgen.models.textual_inversion import Placeholder, check_new_token, read_placeholder, save_placeholder

log = logging.getLogger(__name__)

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

    Textual inversion (:mod:`vgen.models.textual_inversion`): :meth:`add_placeholder` gives the encoder one learned
    token embedding, :attr:`placeholder`, its only trainable parameter; :meth:`save_placeholder` /
    :meth:`load_placeholder` write and read it alone.

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
        self.tokenizer = self._base_tokenizer = SimpleTokenizer(context_length=max_length)
        self.placeholder: Placeholder | None = None
        self._warned_lost_placeholder = False
        self.freeze()

    # ------------------------------------------------------------------ textual inversion
    def add_placeholder(self, token: str = "*", init_word: str = "dog",
                        embedding: torch.Tensor | None = None) -> Placeholder:
        """Make ``token`` a placeholder with its own trainable embedding, initialised from the row of ``init_word``
        (one CLIP token), or set to ``embedding`` [dim] (``init_word`` then only recorded); replaces a previous
        placeholder. A ``token`` that is one CLIP token keeps its id; any other word becomes a new token (see
        :mod:`vgen.models.textual_inversion`)."""
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"placeholder token must be a non-empty string, got {token!r}")
        token = token.strip().lower()  # the tokenizer lower-cases captions
        base, table = self._base_tokenizer, self.token_embedding.weight
        if embedding is None:
            init_ids = base.encode(init_word) if isinstance(init_word, str) else []
            if len(init_ids) != 1:
                raise ValueError(f"initializer word {init_word!r} is {len(init_ids)} CLIP tokens; textual inversion "
                                 "starts from one token's embedding: choose a single-token word (e.g. 'dog')")
            embedding = table[init_ids[0]]
        elif tuple(embedding.shape) != (self.dim,):
            raise ValueError(f"placeholder embedding must have shape ({self.dim},), got {tuple(embedding.shape)}")
        token_ids = base.encode(token)
        if len(token_ids) == 1:
            tokenizer, token_id = base, token_ids[0]
        else:
            check_new_token(token)
            tokenizer = SimpleTokenizer(context_length=self.max_length, additional_special_tokens=[token])
            token_id = tokenizer.encoder[token]
        self.tokenizer = tokenizer
        self.placeholder = Placeholder(token, init_word, token_id, embedding.to(device=table.device, dtype=table.dtype))
        self._placeholder_word = re.compile(rf"(?<!\w){re.escape(token)}(?!\w)")
        self._warned_lost_placeholder = False
        return self.placeholder

    def remove_placeholder(self) -> None:
        """Back to the plain encoder."""
        self.placeholder, self.tokenizer = None, self._base_tokenizer

    def save_placeholder(self, path: str | Path) -> Path:
        """The placeholder's embedding alone, as safetensors with its token and initializer word."""
        if self.placeholder is None:
            raise ValueError("this text encoder has no placeholder to save: add_placeholder() first")
        return save_placeholder(self.placeholder, path)

    def load_placeholder(self, path: str | Path, trainable: bool = False) -> Placeholder:
        """The placeholder of a :meth:`save_placeholder` file, frozen unless ``trainable``."""
        token, init_word, embedding = read_placeholder(path, self.dim)
        return self.add_placeholder(token, init_word, embedding).requires_grad_(trainable)

    def _warn_if_placeholder_lost(self, captions: list[str], tokens: torch.Tensor) -> None:
        """Warn once when a caption names the placeholder but its tokens lack it ("a *.": BPE merges ``*.``)."""
        if self._warned_lost_placeholder:
            return
        for caption, row in zip(captions, tokens):
            if self._placeholder_word.search(caption.lower()) and not bool((row == self.placeholder.token_id).any()):
                self._warned_lost_placeholder = True
                log.warning("caption %r names the placeholder %r, but its tokens do not hold it (BPE merged it with the "
                            "characters next to it, or the caption was truncated), so the learned embedding is not "
                            "used there: write it apart (e.g. 'a %s .')", caption, self.placeholder.token,
                            self.placeholder.token)
                return

    def forward(self, captions: list[str]) -> torch.Tensor:
        """``captions`` -> [B, max_length, dim]."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, got a single string")
        captions = list(captions)
        tokens = self.tokenizer(captions)
        if self.placeholder is not None:
            self._warn_if_placeholder_lost(captions, tokens)
        tokens = tokens.to(self.token_embedding.weight.device)
        if self.placeholder is None:
            x = self.token_embedding(tokens)
        else:
            x = self.placeholder.embed(tokens, self.token_embedding)
        x = x + self.positional_embedding[: self.max_length]
        causal_mask = torch.full((self.max_length, self.max_length), float("-inf"), device=x.device,
                                 dtype=x.dtype).triu_(1)
        for block in self.transformer.resblocks[: self.num_layers]:
            x = block(x, attn_mask=causal_mask)
        return self.ln_final(x)
