"""The frozen encoders' side of conditioning, shared by the training stages and :class:`vgen.pipeline.VideoPipeline`.

:class:`FrozenEncoding` is a mixin for a module that has ``vae``, ``text_encoder``, ``image_encoder`` (or None),
``unet`` and a ``negative_prompt``: it encodes batches (or cached embeddings of latent-cache shards), builds the
:class:`vgen.models.conditions.ConditionInputs` of a batch, and turns them into UNet condition values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vgen.models.conditions import ConditionError, ConditionInputs


class FrozenEncoding:
    """Mixin (see the module docstring). Caches the negative- and empty-prompt embeddings per device."""

    negative_prompt: str
    _prompt_cache: dict | None = None

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder(list(captions))

    @torch.no_grad()
    def prompt_embedding(self, prompt: str, batch_size: int) -> torch.Tensor:
        """The embedding of one fixed prompt, computed once per device, expanded to ``batch_size``."""
        if self._prompt_cache is None:
            self._prompt_cache = {}
        key = (prompt, str(self.device))
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.encode_text([prompt])
        return self._prompt_cache[key].expand(batch_size, -1, -1)

    def negative_embedding(self, batch_size: int) -> torch.Tensor:
        return self.prompt_embedding(self.negative_prompt, batch_size)

    def null_embedding(self, batch_size: int) -> torch.Tensor:
        """The empty-prompt embedding (VGen's ``zero_y``)."""
        return self.prompt_embedding("", batch_size)

    # ------------------------------------------------------------------ batches
    @staticmethod
    def batch_samples(batch: Mapping[str, Any]) -> torch.Tensor:
        """The batch's clips: ``latent`` [B, C, F, h, w] for latent-cache batches, else ``video`` [B, 3, F, H, W]."""
        return batch["latent"] if "latent" in batch else batch["video"]

    @torch.no_grad()
    def batch_latents(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Clean latents: the cached ``latent`` when the batch has it (no VAE call), else the VAE's."""
        if "latent" not in batch:
            return self.encode_video(batch["video"])
        latents = batch["latent"]
        channels = getattr(self.vae, "latent_channels", None)
        if latents.ndim != 5 or (channels is not None and latents.shape[1] != channels):
            raise ValueError(f"batch latent {tuple(latents.shape)} is not [B, {channels}, F, h, w] (model.vae's "
                             "latent channels): encode the shards with this run's VAE (data_pipelines/encode.py --vae)")
        return latents

    @torch.no_grad()
    def batch_text(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Caption embeddings [B, L, D]: the cached ``text_embedding`` when the batch has it, else the encoder's."""
        if "text_embedding" not in batch:
            return self.encode_text(batch["caption"])
        text = batch["text_embedding"]
        expected = self.negative_embedding(1).shape[1:]
        if text.shape[1:] != expected:
            raise ValueError(f"batch text_embedding {tuple(text.shape)} does not match model.text_encoder's "
                             f"[B, {expected[0]}, {expected[1]}]: encode the shards with this run's text encoder "
                             "(data_pipelines/encode.py --text-encoder)")
        return text

    @torch.no_grad()
    def batch_image_embedding(self, batch: Mapping[str, Any], frame: str | int = "first") -> torch.Tensor:
        """Image-encoder embedding [B, 1, D] of one frame of each clip (``first``, ``middle``, ``random`` -- one
        index for the batch -- or an index); latent batches have the first frame's cached ``image_embedding``."""
        if self.image_encoder is None:
            raise ConditionError("this model has an image condition but no model.image_encoder")
        if "video" in batch:
            video = batch["video"]
            frames = video.shape[2]
            index = {"first": 0, "middle": frames // 2}.get(frame) if isinstance(frame, str) else int(frame)
            if index is None:
                index = int(torch.randint(frames, (1,)).item())
            return self.image_encoder(video[:, :, min(index, frames - 1)])
        if frame not in ("first", 0):
            raise ValueError(f"image frame {frame!r} needs pixels, but latent batches store only the first frame's "
                             "image embedding: use frame first")
        if "image_embedding" not in batch:
            raise ValueError("this model needs the first frame's image embedding, but the latent batch has no "
                             "image_embedding: encode the shards with data_pipelines/encode.py --image-encoder")
        image = batch["image_embedding"]
        return image[:, None] if image.ndim == 2 else image

    # ------------------------------------------------------------------ condition values
    def condition_inputs(self, batch: Mapping[str, Any], latents: torch.Tensor | None, num_frames: int
                         ) -> ConditionInputs:
        return ConditionInputs(batch=batch, encoders=self, num_frames=num_frames, latents=latents)

    @torch.no_grad()
    def condition_values(self, inputs: ConditionInputs, unet=None, given: Mapping[str, Any] | None = None
                         ) -> dict[str, torch.Tensor]:
        """``{name: value}`` of every condition of the UNet that ``inputs`` provide (absent ones left out); the
        ``given`` values are taken as they are instead of extracted."""
        unet = self.unet if unet is None else unet
        values = {}
        for name, condition in unet.conditions.items():
            if given is not None and name in given:
                values[name] = given[name]
                continue
            value = condition.value(inputs)
            if value is not None:
                values[name] = value
        return values
