"""The VGen / ModelScope 3D UNet (Stable-Diffusion-2.1 layout with temporal layers), one implementation for all
variants. Conditioning inputs are :class:`vgen.models.conditions.Condition` modules built from config
(``conditions``: text tokens, CLIP image tokens, the I2VGen-XL first frame, fps, ...); the SR600 refinement quirks
are switched on by config too, not by copying the network.

Input ``x`` is a latent video ``[B, C, F, H, W]``; ``t`` is ``[B]`` integer timesteps; the conditions come as a
mapping (or keywords) by name, e.g. ``unet(x, t, {"text": tokens})`` or ``unet(x, t, text=tokens)``. Output has
the shape of ``x`` with ``out_channels``.

Adapters (:mod:`vgen.models.adapters`) are applied from outside: they add modules, and the values of ``adapter``-kind
conditions reach the layers that declare ``takes_adapter_inputs`` as ``adapter_inputs={name: value}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

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
from vgen.models.conditions import ConditionError, EmbeddingMLP, TextPooling, UNetDims, build_condition
from vgen.models.conditions.base import architecture_spec
from vgen.models.conditions.standard import sinusoid_for
from vgen.models.fastpath import FAST
from vgen.models.fourier import fourier_filter

RESAMPLE_MODES = ("standard", "sr600")
TEMPORAL_POSITIONS = ("none", "sinusoidal")
TEXT_CONDITION = {"_target_": "vgen.models.conditions.TextTokens"}
# UNet3DConfig keys of vgen before the condition registry -> their condition (old run configs still build).
LEGACY_CONDITION_KEYS = ("fps_condition", "image_tokens", "image_token_hidden", "first_frame_condition",
                         "first_frame_encoder_depth")
# Parameter prefixes of those versions -> where the same tensors live now (old checkpoints still load).
LEGACY_KEY_PREFIXES = (("image_tokens.mlp.", "conditions.image.mlp."), ("fps_embed.", "conditions.fps.mlp."),
                       ("first_frame.", "conditions.first_frame."))


def legacy_conditions(values: Mapping) -> dict:
    """The ``conditions`` equivalent of the pre-registry condition switches in ``values`` (a UNet3DConfig dict)."""
    conditions = {"text": dict(TEXT_CONDITION)}
    if values.get("first_frame_condition"):
        conditions["first_frame"] = {"_target_": "vgen.models.conditions.FirstFrame",
                                     "encoder_depth": values.get("first_frame_encoder_depth", 1)}
    if values.get("image_tokens"):
        conditions["image"] = {"_target_": "vgen.models.conditions.ImageTokens", "num_tokens": values["image_tokens"],
                               "hidden_dim": values.get("image_token_hidden", 0)}
        if values.get("first_frame_condition"):
            conditions["image"]["stills"] = "zeros"
        elif values.get("concat_channels"):  # TF-T2V: the image tokens of its text-free videos only
            conditions["image"].update(original_names={"mlp.": "pre_image_condition."}, frame="middle",
                                       from_batch=False)
    if values.get("fps_condition"):
        conditions["fps"] = {"_target_": "vgen.models.conditions.ScalarEmbedding",
                             "required": bool(values.get("first_frame_condition")),
                             "original_names": {"mlp.": "fps_embedding."}}
    return conditions


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
    image_dim: int = 1024  # width of image-encoder (CLIP) embeddings, for the conditions that read them
    conditions: dict = field(default_factory=lambda: {"text": dict(TEXT_CONDITION)})  # name -> {_target_, ...}
    concat_channels: int = 0  # input channels summed concat conditions share (TF-T2V / VideoComposer: 8; zeros if none)
    resample: str = "standard"  # "standard" or "sr600" (asymmetric downsample padding, cropping upsample)
    skip_filters: tuple[tuple[float, float], ...] = ()  # FreeU: (backbone scale, skip Fourier scale) per decoder block
    skip_filter_threshold: int = 1  # half-width of the low-frequency box scaled by the skip filter
    gradient_checkpointing: bool = False  # recompute ResBlocks/transformers in backward
    temporal_identity_for_stills: bool = False  # temporal layers are the identity on single frames (HiGen)

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_scales = tuple(float(s) for s in self.attention_scales)
        self.skip_filters = tuple(tuple(float(v) for v in pair) for pair in self.skip_filters)
        if not isinstance(self.conditions, Mapping) or not all(isinstance(v, Mapping) for v in self.conditions.values()):
            raise ValueError(f"conditions must be a mapping name -> {{_target_: <Condition class>, ...}}, "
                             f"got {self.conditions!r}")
        self.conditions = {str(k): copy.deepcopy(dict(v)) for k, v in self.conditions.items()}
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample={self.resample!r} is not one of {RESAMPLE_MODES}")
        if self.temporal_position not in TEMPORAL_POSITIONS:
            raise ValueError(f"temporal_position={self.temporal_position!r} is not one of {TEMPORAL_POSITIONS}")
        for key in ("model_channels", "head_dim", "in_channels", "out_channels", "num_res_blocks",
                    "init_temporal_heads", "context_dim", "decoder_context_dim", "image_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        value = self.concat_channels
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"concat_channels must be an integer >= 0, got {value!r}")
        if not self.channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m <= 0
                                        for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive integers, got {self.channel_mult}")
        widths = [self.model_channels * m for m in self.channel_mult]
        bad = [w for w in widths if w % 32 or w % self.head_dim]
        if bad:
            raise ValueError(f"level widths {widths} must be multiples of 32 (GroupNorm) and of head_dim={self.head_dim}")

    @classmethod
    def from_dict(cls, values: Mapping) -> UNet3DConfig:
        values = dict(values)
        if any(k in values for k in LEGACY_CONDITION_KEYS) and "conditions" not in values:
            values["conditions"] = legacy_conditions(values)
        for key in LEGACY_CONDITION_KEYS:
            values.pop(key, None)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown UNet3D config keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture(self) -> dict:
        """The settings that decide the network's modules and computation: without the training switches
        (dropout, gradient checkpointing) and the conditions' behaviour settings (dropout, null rules, ...).
        Two UNets with equal architectures load each other's weights and compute the same function."""
        values = self.to_dict()
        for key in ("dropout", "gradient_checkpointing"):
            values.pop(key)
        values["conditions"] = {name: architecture_spec(spec) for name, spec in values["conditions"].items()}
        return values


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
        dims = UNetDims(model_channels=dim, embed_dim=embed_dim, context_dim=cfg.context_dim,
                        latent_channels=cfg.in_channels, image_dim=cfg.image_dim, concat_channels=cfg.concat_channels)
        self.conditions = nn.ModuleDict({name: build_condition(name, spec, dims) for name, spec in cfg.conditions.items()})
        if not any("tokens" in c.routes for c in self.conditions.values()):
            raise ValueError("conditions: at least one must give cross-attention tokens (e.g. text: TextTokens)")
        summed = [n for n, c in self.conditions.items() if c.summed]
        if summed and not cfg.concat_channels:
            raise ValueError(f"conditions {summed} are summed into the shared concat block: set concat_channels > 0")
        self.text_embed = TextPooling(cfg.context_dim, embed_dim) if cfg.text_embedding else None
        self.frame_embed = EmbeddingMLP(dim, embed_dim, zero_init_last=True) if cfg.frame_embedding else None
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

        def transformers(channels: int, context_dim: int) -> list[nn.Module]:
            heads = channels // cfg.head_dim
            layers: list[nn.Module] = [SpatialTransformer(channels, heads, cfg.head_dim, context_dim)]
            if cfg.temporal_attention:
                layers.append(TemporalTransformer(channels, heads, cfg.head_dim, cfg.temporal_position))
            return layers

        input_channels = cfg.in_channels + sum(c.channels for c in self.conditions.values()) + cfg.concat_channels
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
        for module in self.modules():
            if isinstance(module, (TemporalTransformer, TemporalConvBlock)):
                module.identity_for_stills = cfg.temporal_identity_for_stills

    # ------------------------------------------------------------------ switches
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def set_temporal_bypass(self, enabled: bool = True) -> None:
        """Skip every temporal conv and temporal transformer (identity), e.g. for image-only pretraining."""
        for module in self.modules():
            if isinstance(module, (TemporalTransformer, TemporalConvBlock)):
                module.bypass = enabled

    def temporal_parameter_names(self) -> list[str]:
        """Parameters of the temporal convs and temporal transformers of the trunk (not of adapters in them)."""
        added = self._adapter_module_parameter_names()
        return [f"{name}.{p}" for name, mod in self.named_modules()
                if isinstance(mod, (TemporalTransformer, TemporalConvBlock)) for p, _ in mod.named_parameters()
                if f"{name}.{p}" not in added]

    def spatial_parameter_names(self) -> list[str]:
        """Parameters of the trunk inherited from Stable Diffusion 2.1 (not temporal, not embeddings/conditions).

        This is exactly the set VGen lists in ``stable_diffusion_image_key_temporal_attention_x1.json`` (682 keys
        at full size), whose gradients the VGen recipe scales by ``grad_scale``.
        """
        excluded = set(self.temporal_parameter_names()) | self._adapter_module_parameter_names()
        trunk = ("input_blocks.", "middle_block.", "output_blocks.", "out.")
        return [n for n, _ in self.named_parameters() if n.startswith(trunk) and n not in excluded]

    def _adapter_module_parameter_names(self) -> set[str]:
        """Parameters of modules that adapters added (marked ``is_adapter_module``)."""
        return {f"{name}.{p}" for name, mod in self.named_modules() if getattr(mod, "is_adapter_module", False)
                for p, _ in mod.named_parameters()}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, conditions: Mapping[str, torch.Tensor] | None = None,
                *, keep: Mapping[str, torch.Tensor] | None = None, **named: torch.Tensor) -> torch.Tensor:
        """Denoise ``x`` at ``t`` given ``conditions`` (a mapping and/or keywords by condition name).

        ``keep`` maps a condition name to a per-sample [B] mask its encoded output is multiplied by (0 = dropped at
        the output, VideoComposer's DropPath). A condition that is not given is absent (an error if ``required``).
        """
        conditions = {**(conditions or {}), **named}
        unknown = sorted(set(conditions) - set(self.conditions)) + sorted(set(keep or {}) - set(self.conditions))
        if unknown:
            raise ConditionError(f"unknown condition {unknown[0]!r}; this model's conditions: {list(self.conditions)}")
        if x.ndim != 5:
            raise ValueError(f"x must be a latent video [B, C, F, H, W], got shape {tuple(x.shape)}")
        b, c, f, _, _ = x.shape
        if c != self.config.in_channels:
            raise ValueError(f"x has {c} channels, the model expects in_channels={self.config.in_channels}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or [B={b}] timesteps, got shape {tuple(t.shape)}")

        weight = self.time_embed[0].weight
        emb = self.time_embed(sinusoid_for(t, self.config.model_channels, weight))
        frame_emb, tokens, frame_tokens, concat, features = [], [], [], [], []
        adapter_inputs: dict[str, torch.Tensor] = {}
        summed = None
        text = None
        for name, cond in self.conditions.items():
            value = conditions.get(name)
            if value is None:
                if cond.required:
                    raise ConditionError(f"this model needs the condition {name!r} ({type(cond).__name__})")
                if cond.channels:
                    concat.append(x.new_zeros(b, cond.channels, *x.shape[2:]))
                continue
            value = torch.as_tensor(value, device=x.device)
            if value.is_floating_point():
                value = value.to(x.dtype)
            if value.ndim and value.shape[0] != b:
                raise ConditionError(f"condition {name!r} has batch size {value.shape[0]}, x has {b}")
            out = cond(value, f, latent_size=tuple(x.shape[-2:])) if cond.wants_latent_size else cond(value, f)
            outs = out if isinstance(out, dict) else {cond.routes[0]: out}
            mask = None if keep is None else keep.get(name)
            for route, tensor in outs.items():
                if mask is not None:
                    tensor = tensor * torch.as_tensor(mask, device=x.device).to(tensor.dtype).view(
                        -1, *[1] * (tensor.ndim - 1))
                if route == "tokens" and tensor.ndim == 4:  # [B, F, N, D]: tokens of each frame
                    frame_tokens.append(tensor.to(x.dtype).reshape(b * f, *tensor.shape[2:]))
                elif route == "tokens":
                    tokens.append(tensor.to(x.dtype))
                    if name == "text":
                        text = tensor
                elif route == "embedding":
                    tensor = tensor.to(emb.dtype).expand(b, *tensor.shape[1:])
                    if tensor.ndim == 3:
                        frame_emb.append(tensor)
                    else:
                        emb = emb + tensor
                elif route == "concat" and cond.summed:
                    summed = tensor if summed is None else summed + tensor
                elif route == "concat":
                    concat.append(tensor.to(x.dtype))
                elif route == "adapter":
                    adapter_inputs[name] = tensor.to(x.dtype) if tensor.is_floating_point() else tensor
                else:
                    features.append(tensor.to(x.dtype))
        if not tokens:
            raise ConditionError("no cross-attention tokens: pass the text condition ([B, L, context_dim]); for the "
                                 "unconditional branch pass the negative-prompt (or empty-prompt) embedding")
        if self.text_embed is not None and text is not None:
            emb = emb + self.text_embed(text.to(emb.dtype))
        if self.config.concat_channels:
            concat.append(summed.to(x.dtype) if summed is not None
                          else x.new_zeros(b, self.config.concat_channels, *x.shape[2:]))
        if concat:
            x = torch.cat([x, *concat], dim=1)
        clip_tokens = torch.cat(tokens, dim=1)
        if FAST.clip_context and not frame_tokens:  # [B, L, D]: cross-attention projects it once per clip
            context = clip_tokens
        else:  # the original: the clip's tokens repeated for every frame, [(B F), L, D]
            context = torch.cat([clip_tokens.repeat_interleave(f, dim=0), *frame_tokens], dim=1)
        emb = emb.repeat_interleave(f, dim=0)
        for per_frame in frame_emb:  # [B, F, D] -> rows (b0 f0, b0 f1, ..., b1 f0, ...)
            emb = emb + per_frame.reshape(b * f, -1)
        if self.frame_embed is not None:  # frames are folded into the batch as (b0 f0, b0 f1, ..., b1 f0, ...)
            frames = sinusoidal_embedding(torch.arange(f, device=x.device), self.config.model_channels,
                                          dtype=torch.float32).to(emb.dtype)
            emb = emb + self.frame_embed(frames).repeat(b, 1)

        first = self.input_blocks[0]
        h = first[0](fold_frames(x))
        for feature in features:  # [B, C, h, w] (every frame) or [B, C, F, h, w]
            h = h + fold_frames(feature.unsqueeze(2).expand(-1, -1, f, -1, -1) if feature.ndim == 4 else feature)
        h = self._run(first[1:], h, emb, context, f, adapter_inputs)
        skips = [h]
        for block in self.input_blocks[1:]:
            h = self._run(block, h, emb, context, f, adapter_inputs)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, f, adapter_inputs)
        for i, block in enumerate(self.output_blocks):
            skip = skips.pop()
            if i < len(self.config.skip_filters):
                h, skip = self._filter_skip(h, skip, *self.config.skip_filters[i])
            if h.shape[-2:] != skip.shape[-2:]:
                raise ValueError(
                    f"latent size {tuple(x.shape[-2:])} does not survive the UNet pyramid (decoder {tuple(h.shape[-2:])}"
                    f" vs skip {tuple(skip.shape[-2:])}); use H and W divisible by {2 ** (len(self.config.channel_mult) - 1)}"
                )
            h = self._run(block, torch.cat([h, skip], dim=1), emb, context, f, adapter_inputs)
        return unfold_frames(self.out(h), f)

    def _filter_skip(self, h, skip, backbone_scale: float, skip_scale: float):
        half = h.shape[1] // 2
        h = torch.cat([h[:, :half] * backbone_scale, h[:, half:]], dim=1)
        return h, fourier_filter(skip, self.config.skip_filter_threshold, skip_scale)

    def _run(self, layers, h, emb, context, num_frames, adapter_inputs=None):
        if not isinstance(layers, nn.ModuleList):
            layers = [layers]
        for layer in layers:
            # passed as an argument (not held in a module) so that checkpointing recomputes with the same values
            extra = {"adapter_inputs": adapter_inputs or {}} if getattr(layer, "takes_adapter_inputs", False) else {}
            if isinstance(layer, nn.Conv2d):
                h = layer(h)
            elif self.gradient_checkpointing and torch.is_grad_enabled() and isinstance(
                layer, (ResBlock, SpatialTransformer, TemporalTransformer)
            ):
                h = checkpoint(layer, h, emb, context, num_frames, use_reentrant=False, **extra)
            else:
                h = layer(h, emb, context, num_frames, **extra)
        return h


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    """State-dict pre-hook: parameters saved under the pre-registry names load into their conditions."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for old, new in LEGACY_KEY_PREFIXES:
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break
