"""Frozen autoencoders that map videos [B, 3, F, H, W] in [-1, 1] to latents [B, C, F, H/ds, W/ds] and back.

:class:`VideoAutoencoder` wraps diffusers' ``AutoencoderKL`` (the Stable Diffusion 2.1 KL-f8 VAE) frame by frame;
:class:`IdentityAutoencoder` keeps videos in pixel space. This module also holds the helpers every frozen
encoder uses: :class:`FrozenModule`, :func:`read_state_dict`, :func:`load_strict` and :func:`build_frozen`.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from vgen.checkpoint.ldm_vae import to_diffusers_vae
from vgen.models.frozen import FrozenModule, build_frozen, read_state_dict

_KL_F8 = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "norm_num_groups": 32,
          "layers_per_block": 2, "block_out_channels": (128, 256, 512, 512),
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
AUTOENCODER_CONFIGS = {
    "sd21": _KL_F8,  # Stable Diffusion 2.1 KL-f8: 83,653,863 parameters, 248 tensors
    "tiny": {**_KL_F8, "norm_num_groups": 8, "layers_per_block": 1, "block_out_channels": (32, 32),
             "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2},
}


def _frames(video: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [(B F), C, H, W]."""
    return video.transpose(1, 2).flatten(0, 1)


def _video(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """[(B F), C, H, W] -> [B, C, F, H, W]."""
    return frames.unflatten(0, (batch, -1)).transpose(1, 2)


class VideoAutoencoder(FrozenModule):
    """Frozen KL autoencoder applied to every frame independently (VGen's ``AutoencoderKL`` usage).

    Args:
        config: ``"sd21"`` | ``"tiny"`` or a dict of ``diffusers.AutoencoderKL`` keyword arguments.
        weights: a Stable Diffusion / LDM checkpoint (``v2-1_512-ema-pruned.ckpt``, ``first_stage_model.*``
            keys), a bare LDM first stage, or a diffusers VAE state dict (``.safetensors`` or ``.bin``). ``None``:
            random init from a fixed seed.
        scale_factor: latents are ``scale_factor`` times the posterior sample (SD: 0.18215).
        encode_chunk, decode_chunk: frames per encoder / decoder call (memory bound; results do not depend on it).
    """

    def __init__(self, config: dict | str = "sd21", weights: str | None = None, scale_factor: float = 0.18215,
                 encode_chunk: int = 16, decode_chunk: int = 8):
        super().__init__()
        if isinstance(config, str):
            if config not in AUTOENCODER_CONFIGS:
                raise ValueError(f"unknown autoencoder config {config!r}; choose one of {list(AUTOENCODER_CONFIGS)}"
                                 " or pass a dict of diffusers.AutoencoderKL arguments")
            config = AUTOENCODER_CONFIGS[config]
        if encode_chunk < 1 or decode_chunk < 1:
            raise ValueError(f"encode_chunk and decode_chunk must be >= 1, got {encode_chunk}, {decode_chunk}")
        state = None if weights is None else to_diffusers_vae(read_state_dict(weights))
        self.model = build_frozen(lambda: AutoencoderKL(**config), state, source=str(weights))
        self.latent_channels: int = self.model.config.latent_channels
        self.downsample: int = 2 ** (len(self.model.config.block_out_channels) - 1)
        self.scale_factor = scale_factor
        self.encode_chunk = encode_chunk
        self.decode_chunk = decode_chunk
        self.freeze()

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor:
        """[B, 3, F, H, W] (or [B, 3, H, W]) in [-1, 1] -> scaled latents [B, C, F, H/ds, W/ds] (or [B, C, h, w]).

        ``sample=True`` draws mean + std * N(0, 1) from the posterior (logvar clamped to [-30, 20]) with
        ``generator``; ``sample=False`` returns the mean.
        """
        if video.ndim == 4:
            return self.encode(video[:, :, None], generator, sample)[:, :, 0]
        self._check(video, 3, self.downsample, "video")
        dtype = self.model.dtype
        means, stds = [], []
        for chunk in _frames(video).to(dtype).split(self.encode_chunk):
            posterior = self.model.encode(chunk).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        latents = torch.cat(means)
        if sample:
            device = generator.device if generator is not None else latents.device
            noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
            latents = latents + torch.cat(stds) * noise.to(latents.device, dtype)
        return _video(latents * self.scale_factor, video.shape[0])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, F, h, w] (or [B, C, h, w]) -> pixels [B, 3, F, H, W] (or [B, 3, H, W]) in [-1, 1]."""
        if latents.ndim == 4:
            return self.decode(latents[:, :, None])[:, :, 0]
        self._check(latents, self.latent_channels, 1, "latents")
        frames = _frames(latents).to(self.model.dtype) / self.scale_factor
        pixels = torch.cat([self.model.decode(chunk).sample for chunk in frames.split(self.decode_chunk)])
        return _video(pixels.clamp(-1, 1), latents.shape[0])

    @staticmethod
    def _check(x: torch.Tensor, channels: int, multiple: int, name: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels or x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"{name} must be [B, {channels}, F, H, W] (or [B, {channels}, H, W]) with H and W "
                             f"multiples of {multiple}, got {tuple(x.shape)}")


class IdentityAutoencoder(FrozenModule):
    """Pixel-space stand-in for a VAE (the CPU demo): latents are the videos themselves."""

    latent_channels = 3
    scale_factor = 1.0
    downsample = 1

    def __init__(self, weights: str | None = None):
        super().__init__()
        if weights is not None:  # accepted so that configs can null every autoencoder's weights alike
            raise ValueError(f"model.vae: the identity autoencoder has no weights, got weights={weights!r}")
        self.freeze()

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor:
        """Returns ``video`` unchanged."""
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Returns ``latents`` clamped to [-1, 1], the range every decoder returns."""
        return latents.clamp(-1, 1)
