"""Textual inversion (DreamVideo's subject step 1): one learned token embedding in a frozen OpenCLIP text encoder.

A *placeholder* (``*`` by default, or a configured word such as ``<sks>``) stands for the subject in captions
("a * on the beach"). Its embedding row is the only trainable tensor: a :class:`Placeholder` holds it as its own
``nn.Parameter`` [width], initialised from an initializer word's row (e.g. "dog"), while the base token table
stays frozen, so an optimizer (and ZeRO / FSDP) only ever sees that one vector. At forward, every occurrence of
the placeholder's token id has its embedding replaced by the learned row; a caption without the placeholder
encodes exactly (bit for bit) as without textual inversion.

Token ids: a placeholder that is already one CLIP token (``*`` is id 265, "sks" is 48136) keeps that id, as the
original's ``EmbeddingManager`` did: every occurrence of the token is the subject. Any other word (``<sks>``,
``my_dog``) becomes a new token, id = the tokenizer's vocabulary size (49408), which the base table has no row
for. Captions are lower-cased by the tokenizer, so the placeholder matches in any case. Note that BPE merges
punctuation glued to ``*``: "a *." has no ``*`` token; write "a * ." (a new-token placeholder has no such issue).

Files: :func:`save_placeholder` writes one safetensors file, tensor ``embedding`` [width] plus metadata ``token``
and ``init_word``; :func:`read_placeholder` reads it back, checking the width, with one-line errors naming the file.

How a training stage uses it (the text encoder is a :class:`vgen.models.frozen.FrozenModule`, frozen and in eval
mode, and :class:`vgen.stages.base.DiffusionStage` calls ``requires_grad_(False)`` on it when it is built):

1. after ``super().__init__``: ``self.text_encoder.add_placeholder(token, init_word)`` (trainable);
2. optimizer: ``self.text_encoder.placeholder.parameters()`` (one tensor); the UNet stays frozen;
3. captions: ``self.text_encoder(batch["caption"])`` with grad enabled, not ``encode_text`` / ``batch_text`` (both
   ``torch.no_grad``; ``batch_text`` also takes cached ``text_embedding`` of latent shards, which knows nothing
   of the placeholder). The null / negative prompt embeddings may stay cached (they have no placeholder);
4. checkpoints: ``placeholder.state_dict()`` (``{"embedding": ...}``) with ``placeholder.metadata()``; the
   embedding alone for sampling: ``text_encoder.save_placeholder(path)``, loaded (frozen) with
   ``text_encoder.load_placeholder(path)`` by the subject step 2 and by the sampling pipeline.
"""

from __future__ import annotations

import re
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

FORMAT = "vgen.textual_inversion"
EMBEDDING_KEY = "embedding"


class Placeholder(nn.Module):
    """The learned embedding ``embedding`` [width] of token ``token_id`` (the placeholder ``token``), started from
    the embedding of ``init_word``."""

    def __init__(self, token: str, init_word: str, token_id: int, embedding: torch.Tensor):
        super().__init__()
        if embedding.ndim != 1:
            raise ValueError(f"a placeholder embedding is one vector [width], got shape {tuple(embedding.shape)}")
        self.token, self.init_word, self.token_id = token, init_word, int(token_id)
        self.embedding = nn.Parameter(embedding.detach().clone())

    def embed(self, tokens: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        """``table(tokens)`` with the placeholder's rows replaced by :attr:`embedding` (its gradient flows there)."""
        hits = tokens == self.token_id
        if not bool(hits.any()):
            return table(tokens)
        x = table(tokens.masked_fill(hits, 0))  # a new token's id has no row in the table
        return torch.where(hits[..., None], self.embedding.to(x.dtype), x)

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "token": self.token, "init_word": self.init_word}

    def extra_repr(self) -> str:
        return f"token={self.token!r}, init_word={self.init_word!r}, id={self.token_id}, width={self.embedding.numel()}"


def check_new_token(token: str) -> None:
    """A placeholder that is not one CLIP token becomes a tokenizer special token, matched by a regular expression
    that OpenCLIP builds without escaping: refuse words with whitespace or regex characters."""
    if not token or re.escape(token) != token:
        raise ValueError(f"placeholder {token!r} is not one CLIP token and cannot become one: use a single-token "
                         "symbol such as '*', or a word of letters, digits, '_', '<' and '>' such as '<sks>'")


def save_placeholder(placeholder: Placeholder, path: str | Path) -> Path:
    """``placeholder`` alone as a safetensors file (float32 ``embedding`` + token / init-word metadata), written to a
    temporary name and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensor = placeholder.embedding.detach().float().cpu().contiguous()
    safetensors.torch.save_file({EMBEDDING_KEY: tensor}, str(tmp), metadata=placeholder.metadata())
    tmp.replace(path)
    return path


def read_placeholder(path: str | Path, width: int) -> tuple[str, str, torch.Tensor]:
    """``(token, init_word, embedding [width])`` of a file written by :func:`save_placeholder`; one-line errors
    naming the file for a missing file, an unreadable one, a missing tensor or token, or another width."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"textual-inversion file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            keys, metadata = list(file.keys()), file.metadata() or {}
            tensor = file.get_tensor(EMBEDDING_KEY) if EMBEDDING_KEY in keys else None
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())})") from None
    if tensor is None:
        raise ValueError(f"{path}: no {EMBEDDING_KEY!r} tensor (has {sorted(keys)}); a textual-inversion file is "
                         "written by OpenCLIPTextEncoder.save_placeholder")
    if not metadata.get("token"):
        raise ValueError(f"{path}: no 'token' in the file's metadata; a textual-inversion file is written by "
                         "OpenCLIPTextEncoder.save_placeholder")
    if tensor.ndim != 1 or tensor.numel() != width:
        raise ValueError(f"{path}: embedding of shape {tuple(tensor.shape)} does not fit this text encoder (width "
                         f"{width}): it was learned with another text encoder (model.text_encoder)")
    return metadata["token"], metadata.get("init_word", ""), tensor
