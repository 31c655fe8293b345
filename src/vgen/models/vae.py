"""Frozen autoencoders that map videos [B, 3, F, H, W] in [-1, 1] to latents [B, C, F, H/ds, W/ds] and back.

:class:`VideoAutoencoder` wraps diffusers' ``AutoencoderKL`` (the Stable Diffusion 2.1 KL-f8 VAE) frame by frame;
:class:`IdentityAutoencoder` keeps videos in pixel space. This module also holds the helpers every frozen
encoder uses: :class:`FrozenModule`, :func:`read_state_dict`, :func:`load_strict` and :func:`build_frozen`.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL
from torch import nn

from vgen.checkpoint.ldm_vae import to_diffusers_vae

_KL_F8 = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "norm_num_groups": 32,
          "layers_per_block": 2, "block_out_channels": (128, 256, 512, 512),
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
AUTOENCODER_CONFIGS = {
    "sd21": _KL_F8,  # Stable Diffusion 2.1 KL-f8: 83,653,863 parameters, 248 tensors
    "tiny": {**_KL_F8, "norm_num_groups": 8, "layers_per_block": 1, "block_out_channels": (32, 32),
             "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2},
}


class FrozenModule(nn.Module):
    """Base of inference-only wrappers: call :meth:`freeze` at the end of ``__init__``; ``train()`` keeps eval."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save`` file (a ``{'state_dict': ...}`` wrapper is opened).

    Pickle files are read with ``weights_only=True``: a file that also stores Python objects is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} stores Python objects besides tensors, so it can only be read with full unpickling, which "
            "vgen refuses (weights_only=True). Convert it once to safetensors, where you trust the file: "
            "python -c \"import sys, torch, safetensors.torch as st; s = torch.load(sys.argv[1], weights_only=False); "
            "st.save_file({k: v.contiguous() for k, v in s.get('state_dict', s).items()}, sys.argv[2])\" "
            "IN.ckpt OUT.safetensors"
        ) from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise TypeError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Give ``module`` the tensors of ``state_dict`` (cast to each parameter's dtype; ``assign=True``, so a module
    built on the meta device becomes real). Raises naming every missing, unexpected and mismatched key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match {type(module).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): {', '.join(keys)}")
        raise ValueError("\n".join(lines))
    module.load_state_dict({k: state_dict[k].to(v.dtype) for k, v in expected.items()}, strict=True, assign=True)


def build_frozen(factory: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor] | None, source: str,
                 seed: int = 0) -> nn.Module:
    """``factory()`` given the tensors of ``state_dict`` (built on the meta device, so no time is spent on a random
    init), or, without weights, random-initialised from ``seed`` so every process builds the same model."""
    if state_dict is None:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return factory()
    with torch.device("meta"):
        module = factory()
    load_strict(module, state_dict, source)
    return module


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

    def __init__(self):
        super().__init__()
        self.freeze()

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor:
        """Returns ``video`` unchanged."""
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Returns ``latents`` clamped to [-1, 1], the range every decoder returns."""
        return latents.clamp(-1, 1)
