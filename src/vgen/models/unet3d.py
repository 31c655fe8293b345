"""The VGen / ModelScope 3D UNet (Stable-Diffusion-2.1 layout with temporal layers), one implementation for all
variants. Condition pathways (fps, CLIP image tokens, I2VGen first-frame) and the SR600 refinement quirks are
switched on by config, not by copying the network.

Input ``x`` is a latent video ``[B, C, F, H, W]``; ``t`` is ``[B]`` integer timesteps; ``text`` is the
cross-attention token sequence ``[B, L, context_dim]``. Output has the shape of ``x`` with ``out_channels``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vgen.diffusion.embedding import sinusoidal_embedding
from vgen.models.blocks import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    TemporalConvBlock,
    TemporalTransformer,
    Upsample,
    fold_frames,
    unfold_frames,
)
from vgen.models.conditions import EmbeddingMLP, FirstFrameCondition, ImageTokens, TextPooling
from vgen.models.fourier import fourier_filter

RESAMPLE_MODES = ("standard", "sr600")
TEMPORAL_POSITIONS = ("none", "sinusoidal")


@dataclass
class UNet3DConfig:
    in_channels: int = 4  # latent channels of the noisy input
    out_channels: int = 4  # channels predicted (eps / v / x0)
    model_channels: int = 320  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per level
    num_res_blocks: int = 2  # ResBlocks per encoder level (decoder has one more)
    attention_scales: tuple[float, ...] = (1.0, 0.5, 0.25)  # resolutions (1 = full) that get transformers
    head_dim: int = 64  # attention head width (heads = channels // head_dim)
    init_temporal_heads: int = 8  # heads of the temporal transformer after the input conv
    context_dim: int = 1024  # width of cross-attention tokens (encoder and middle)
    decoder_context_dim: int = 1024  # the original hard-codes 1024 for decoder cross-attention
    temporal_attention: bool = True  # temporal transformers after each spatial transformer
    temporal_position: str = "none"  # frame-index encoding in temporal attention: "none" (original) | "sinusoidal"
    text_embedding: bool = False  # add attention-pooled text to the timestep embedding (not in VGen; for small models)
    scale_shift_norm: bool = False  # ResBlocks apply the embedding as FiLM after their 2nd GroupNorm (not in VGen)
    frame_embedding: bool = False  # add an MLP of sinusoid(frame index) to each frame's embedding (not in VGen)
    dropout: float = 0.1  # ResBlock dropout (temporal convs always use 0.1)
    fps_condition: bool = False  # add an MLP of sinusoid(fps) to the timestep embedding
    image_tokens: int = 0  # CLIP image embedding -> this many context tokens (0 = off)
    image_dim: int = 1024  # width of the CLIP image embedding
    image_token_hidden: int = 0  # hidden width of the image-token MLP (0 = 4 * model_channels; TF-T2V: 1024)
    concat_channels: int = 0  # extra input channels fed zeros (TF-T2V's 8 unused VideoComposer condition channels)
    first_frame_condition: bool = False  # I2VGen-XL first-frame latent concat + 64 local tokens
    first_frame_encoder_depth: int = 1  # layers of the first-frame temporal encoder
    resample: str = "standard"  # "standard" or "sr600" (asymmetric downsample padding, cropping upsample)
    skip_filters: tuple[tuple[float, float], ...] = ()  # FreeU: (backbone scale, skip Fourier scale) per decoder block
    skip_filter_threshold: int = 1  # half-width of the low-frequency box scaled by the skip filter
    gradient_checkpointing: bool = False  # recompute ResBlocks/transformers in backward

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_scales = tuple(float(s) for s in self.attention_scales)
        self.skip_filters = tuple(tuple(float(v) for v in pair) for pair in self.skip_filters)
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample={self.resample!r} is not one of {RESAMPLE_MODES}")
        if self.temporal_position not in TEMPORAL_POSITIONS:
            raise ValueError(f"temporal_position={self.temporal_position!r} is not one of {TEMPORAL_POSITIONS}")
        for key in ("model_channels", "head_dim", "in_channels", "out_channels", "num_res_blocks",
                    "init_temporal_heads", "context_dim", "decoder_context_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("image_token_hidden", "concat_channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
        if not self.channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m <= 0
                                        for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive integers, got {self.channel_mult}")
        widths = [self.model_channels * m for m in self.channel_mult]
        bad = [w for w in widths if w % 32 or w % self.head_dim]
        if bad:
            raise ValueError(f"level widths {widths} must be multiples of 32 (GroupNorm) and of head_dim={self.head_dim}")

    @classmethod
    def from_dict(cls, values: dict) -> UNet3DConfig:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown UNet3D config keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


class UNet3D(nn.Module):
    def __init__(self, config: UNet3DConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = UNet3DConfig.from_dict(overrides)
        elif overrides:
            config = UNet3DConfig.from_dict({**config.to_dict(), **overrides})
        self.config = cfg = config
        self.gradient_checkpointing = cfg.gradient_checkpointing
        dim, embed_dim = cfg.model_channels, cfg.model_channels * 4
        sr600 = cfg.resample == "sr600"

        self.time_embed = EmbeddingMLP(dim, embed_dim)
        self.image_tokens = (
            ImageTokens(cfg.image_dim, cfg.image_token_hidden or embed_dim, cfg.context_dim, cfg.image_tokens)
            if cfg.image_tokens else None
        )
        self.fps_embed = EmbeddingMLP(dim, embed_dim, zero_init_last=True) if cfg.fps_condition else None
        self.text_embed = TextPooling(cfg.context_dim, embed_dim) if cfg.text_embedding else None
        self.frame_embed = EmbeddingMLP(dim, embed_dim, zero_init_last=True) if cfg.frame_embedding else None
        self.first_frame = (
            FirstFrameCondition(cfg.in_channels, cfg.context_dim, cfg.first_frame_encoder_depth)
            if cfg.first_frame_condition else None
        )

        def transformers(channels: int, context_dim: int) -> list[nn.Module]:
            heads = channels // cfg.head_dim
            layers: list[nn.Module] = [SpatialTransformer(channels, heads, cfg.head_dim, context_dim)]
            if cfg.temporal_attention:
                layers.append(TemporalTransformer(channels, heads, cfg.head_dim, cfg.temporal_position))
            return layers

        input_channels = cfg.in_channels * (2 if cfg.first_frame_condition else 1) + cfg.concat_channels
        init = [nn.Conv2d(input_channels, dim, 3, padding=1)]
        if cfg.temporal_attention:
            init.append(TemporalTransformer(dim, cfg.init_temporal_heads, cfg.head_dim, cfg.temporal_position))
        self.input_blocks = nn.ModuleList([nn.ModuleList(init)])
        skip_channels, scale, ch = [dim], 1.0, dim
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            out_ch = dim * mult
            for _ in range(cfg.num_res_blocks):
                block = [ResBlock(ch, embed_dim, out_ch, cfg.dropout, cfg.scale_shift_norm)]
                if scale in cfg.attention_scales:
                    block += transformers(out_ch, cfg.context_dim)
                self.input_blocks.append(nn.ModuleList(block))
                skip_channels.append(out_ch)
                ch = out_ch
            if level != levels - 1:
                self.input_blocks.append(Downsample(ch, padding=(2, 1) if sr600 else 1))
                skip_channels.append(ch)
                scale /= 2.0

        middle = [ResBlock(ch, embed_dim, ch, cfg.dropout, cfg.scale_shift_norm),
                  SpatialTransformer(ch, ch // cfg.head_dim, cfg.head_dim, cfg.context_dim)]
        if cfg.temporal_attention:
            middle.append(TemporalTransformer(ch, ch // cfg.head_dim, cfg.head_dim, cfg.temporal_position))
        middle.append(ResBlock(ch, embed_dim, ch, cfg.dropout, cfg.scale_shift_norm))
        self.middle_block = nn.ModuleList(middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            out_ch = dim * mult
            for j in range(cfg.num_res_blocks + 1):
                block = [ResBlock(ch + skip_channels.pop(), embed_dim, out_ch, cfg.dropout, cfg.scale_shift_norm)]
                if scale in cfg.attention_scales:
                    block += transformers(out_ch, cfg.decoder_context_dim)
                ch = out_ch
                if level != 0 and j == cfg.num_res_blocks:
                    block.append(Upsample(ch, crop_rows=sr600))
                    scale *= 2.0
                self.output_blocks.append(nn.ModuleList(block))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)

    # ------------------------------------------------------------------ switches
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def set_temporal_bypass(self, enabled: bool = True) -> None:
        """Skip every temporal conv and temporal transformer (identity), e.g. for image-only pretraining."""
        for module in self.modules():
            if isinstance(module, (TemporalTransformer, TemporalConvBlock)):
                module.bypass = enabled

    def temporal_parameter_names(self) -> list[str]:
        """Parameters of the temporal convs and temporal transformers of the trunk."""
        return [f"{name}.{p}" for name, mod in self.named_modules()
                if isinstance(mod, (TemporalTransformer, TemporalConvBlock)) for p, _ in mod.named_parameters()]

    def spatial_parameter_names(self) -> list[str]:
        """Parameters of the trunk inherited from Stable Diffusion 2.1 (not temporal, not embeddings/conditions).

        This is exactly the set VGen lists in ``stable_diffusion_image_key_temporal_attention_x1.json`` (682 keys
        at full size), whose gradients the VGen recipe scales by ``grad_scale``.
        """
        temporal = set(self.temporal_parameter_names())
        trunk = ("input_blocks.", "middle_block.", "output_blocks.", "out.")
        return [n for n, _ in self.named_parameters() if n.startswith(trunk) and n not in temporal]

    # ------------------------------------------------------------------ forward
    def embed(self, t: torch.Tensor, fps: torch.Tensor | None) -> torch.Tensor:
        weight = self.time_embed[0].weight
        sinusoid_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dim = self.config.model_channels
        emb = self.time_embed(sinusoidal_embedding(t, dim, dtype=sinusoid_dtype).to(weight.dtype))
        if self.fps_embed is not None:
            if fps is None:
                if self.first_frame is not None:  # I2VGen-XL always conditions on fps
                    raise ValueError("this model is fps-conditioned: pass fps (frames per second, int [B])")
            else:
                fps = torch.as_tensor(fps, device=t.device).expand(t.shape[0])
                emb = emb + self.fps_embed(sinusoidal_embedding(fps, dim, dtype=sinusoid_dtype).to(weight.dtype))
        return emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        first_frame: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"x must be a latent video [B, C, F, H, W], got shape {tuple(x.shape)}")
        if text is None:
            raise ValueError("text context is required ([B, L, context_dim]); for the unconditional branch pass "
                             "the negative-prompt (or empty-prompt) embedding")
        b, c, f, _, _ = x.shape
        extra = (self.config.in_channels if self.first_frame is not None else 0) + self.config.concat_channels
        if c + extra != self.input_blocks[0][0].in_channels:
            raise ValueError(f"x has {c} channels, the model expects in_channels={self.config.in_channels}")
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != self.config.context_dim:
            raise ValueError(f"text must be [B={b}, L, context_dim={self.config.context_dim}], got {tuple(text.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or [B={b}] timesteps, got shape {tuple(t.shape)}")
        emb = self.embed(t, fps)
        if self.text_embed is not None:
            emb = emb + self.text_embed(text.to(emb.dtype))
        context = [text.to(x.dtype)]
        if self.first_frame is not None:
            if first_frame is None:
                raise ValueError("this model is first-frame conditioned: pass first_frame (the image's VAE latent)")
            frame0 = self.first_frame.first_frame(first_frame.to(x.dtype))
            x = torch.cat([x, self.first_frame.concat(frame0, f)], dim=1)
            context.append(self.first_frame.tokens(frame0))
        if self.config.concat_channels:
            x = torch.cat([x, x.new_zeros(b, self.config.concat_channels, *x.shape[2:])], dim=1)
        if self.image_tokens is not None and image is not None:
            context.append(self.image_tokens(image.to(x.dtype)))
        context = torch.cat(context, dim=1).repeat_interleave(f, dim=0)
        emb = emb.repeat_interleave(f, dim=0)
        if self.frame_embed is not None:  # frames are folded into the batch as (b0 f0, b0 f1, ..., b1 f0, ...)
            frames = sinusoidal_embedding(torch.arange(f, device=x.device), self.config.model_channels,
                                          dtype=torch.float32).to(emb.dtype)
            emb = emb + self.frame_embed(frames).repeat(b, 1)

        h = fold_frames(x)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, f)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, f)
        for i, block in enumerate(self.output_blocks):
            skip = skips.pop()
            if i < len(self.config.skip_filters):
                h, skip = self._filter_skip(h, skip, *self.config.skip_filters[i])
            if h.shape[-2:] != skip.shape[-2:]:
                raise ValueError(
                    f"latent size {tuple(x.shape[-2:])} does not survive the UNet pyramid (decoder {tuple(h.shape[-2:])}"
                    f" vs skip {tuple(skip.shape[-2:])}); use H and W divisible by {2 ** (len(self.config.channel_mult) - 1)}"
                )
            h = self._run(block, torch.cat([h, skip], dim=1), emb, context, f)
        return unfold_frames(self.out(h), f)

    def _filter_skip(self, h, skip, backbone_scale: float, skip_scale: float):
        half = h.shape[1] // 2
        h = torch.cat([h[:, :half] * backbone_scale, h[:, half:]], dim=1)
        return h, fourier_filter(skip, self.config.skip_filter_threshold, skip_scale)

    def _run(self, layers, h, emb, context, num_frames):
        if not isinstance(layers, nn.ModuleList):
            layers = [layers]
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                h = layer(h)
            elif self.gradient_checkpointing and torch.is_grad_enabled() and isinstance(
                layer, (ResBlock, SpatialTransformer, TemporalTransformer)
            ):
                h = checkpoint(layer, h, emb, context, num_frames, use_reentrant=False)
            else:
                h = layer(h, emb, context, num_frames)
        return h
