"""DreamVideo's adapters (arXiv 2312.04433; VGen ``UNetSD_DreamVideo``), applied to a built UNet from outside it.

Both are bottleneck adapters on the sub-layers of the UNet's transformer blocks: the first attention
(``self_attention``), the second (``cross_attention``: the cross-attention of a spatial transformer, the second
self-attention over frames of a temporal one) and the feed-forward (``feedforward``). An adapter of width ``dim``
computes

    A(x) = x + up(gelu(down(x + lambda * W_c c)))      hidden width dim / 2, ``up`` zero-initialised

and sits ``parallel`` to its sub-layer, ``x <- sublayer(norm(x)) + A(x)`` (in place of the plain residual), or
``serial``, ``x <- A(sublayer(norm(x)) + x)``. At initialisation A(x) = x exactly, so the adapted UNet computes the
base network bit for bit.

* :class:`IdentityAdapter` -- the subject (identity) adapter: spatial transformers, parallel to the
  cross-attention, no condition.
* :class:`MotionAdapter` -- the motion adapter: temporal transformers, parallel to both attentions and the
  feed-forward, with the appearance term ``lambda * W_c c``: c is the ``adapter``-kind UNet condition it names
  (:class:`vgen.models.conditions.dreamvideo.AppearanceImage`, a CLIP embedding of a random frame), lambda the one
  named by ``strength`` (:class:`~vgen.models.conditions.dreamvideo.AdapterStrength`, 1 when absent); W_c (with a
  bias) is one per adapter, and the term is shared by all h x w positions of a frame.

The adapted blocks keep their modules and parameters, so every base key stays as it is; the adapters' own keys are
the original's (``...transformer_blocks.0.cross_attn_adapter.down_linear.weight``), so VGen's DreamVideo adapter
files load as they are. Both can be applied to one UNet (subject and motion composed at inference), each saving
and loading only its own weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from vgen.models.adapters import Adapter, load_adapter_state
from vgen.models.blocks import SpatialTransformer, TemporalTransformer, TransformerBlock
from vgen.models.frozen import read_state_dict

log = logging.getLogger(__name__)

# sub-layer -> (the adapter's attribute in its transformer block, the sub-layer's LayerNorm); in the original's order
SUBLAYERS = {"self_attention": ("attn_adapter", "norm1"), "cross_attention": ("cross_attn_adapter", "norm2"),
             "feedforward": ("ff_adapter", "norm3")}
# parallel: beside the sub-layer | serial: after its residual | none: built (its weights load) but not applied
POSITIONS = ("parallel", "serial", "none")
ADAPTER_FORMAT = "vgen-dreamvideo-adapter"
_TRUNK = ("input_blocks.", "middle_block.", "output_blocks.")


@dataclass
class AdapterInputs:
    """The UNet's ``adapter``-kind condition values for one transformer call, and how many token rows share each
    (sample, frame) (h x w in a temporal transformer)."""

    values: Mapping[str, torch.Tensor]
    repeats: int

    def condition_term(self, linear: nn.Linear, condition: str, strength: str | None) -> torch.Tensor | None:
        """``lambda * present * (W_c c + b)`` per token row, [(B h w), F, dim]; None when ``condition`` is absent."""
        value = self.values.get(condition)
        if value is None:
            return None
        scale = value[..., -1:]  # 1 where the embedding is present, 0 where the UNet's keep mask dropped it
        lam = self.values.get(strength) if strength is not None else None
        if lam is not None:
            scale = lam.reshape(-1, 1, 1) * scale
        return (scale * linear(value[..., :-1])).repeat_interleave(self.repeats, dim=0)


class BottleneckAdapter(nn.Module):
    """``up(gelu(down(x + lambda W_c c)))``, the part of A(x) added to x (module names as in the original)."""

    is_adapter_module = True  # UNet3D leaves its parameters out of the trunk's spatial/temporal lists

    def __init__(self, dim: int, hidden_dim: int, position: str = "parallel", condition_dim: int | None = None,
                 condition: str | None = None, strength: str | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.down_linear = nn.Linear(dim, hidden_dim, **factory)
        self.up_linear = nn.Linear(hidden_dim, dim, **factory)
        self.condition_linear = nn.Linear(condition_dim, dim, **factory) if condition_dim else None
        nn.init.zeros_(self.up_linear.weight)
        nn.init.zeros_(self.up_linear.bias)
        self.position, self.condition, self.strength = position, condition, strength
        self.enabled = True

    @property
    def active(self) -> bool:
        return self.enabled and self.position != "none"

    def forward(self, x: torch.Tensor, inputs: AdapterInputs | None = None) -> torch.Tensor:
        if self.condition_linear is not None and inputs is not None:
            term = inputs.condition_term(self.condition_linear, self.condition, self.strength)
            if term is not None:
                x = x + term
        return self.up_linear(F.gelu(self.down_linear(x)))

    def extra_repr(self) -> str:
        return f"position={self.position}, condition={self.condition}, strength={self.strength}"


class AdaptedTransformerBlock(TransformerBlock):
    """A :class:`TransformerBlock` whose sub-layers may carry a :class:`BottleneckAdapter` (``attn_adapter``,
    ``cross_attn_adapter``, ``ff_adapter``); without them it computes exactly what the block computes."""

    adapter_inputs: AdapterInputs | None = None  # set by the enclosing transformer for the duration of one call

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self._sublayer(x, "self_attention", lambda h: self.attn1(h, context if self.disable_self_attn else None))
        x = self._sublayer(x, "cross_attention", lambda h: self.attn2(h, context))
        return self._sublayer(x, "feedforward", self.ff)

    def _sublayer(self, x, sublayer, fn):
        slot, norm = SUBLAYERS[sublayer]
        adapter = getattr(self, slot, None)
        out = fn(getattr(self, norm)(x))
        if adapter is None or not adapter.active:
            return out + x
        if adapter.position == "parallel":
            return out + (x + adapter(x, self.adapter_inputs))
        out = out + x
        return out + adapter(out, self.adapter_inputs)


class AdaptedTemporalTransformer(TemporalTransformer):
    """A :class:`TemporalTransformer` that hands the UNet's ``adapter_inputs`` to its adapted blocks."""

    takes_adapter_inputs = True  # UNet3D passes adapter_inputs= (an argument, so checkpointing recomputes alike)

    def forward(self, x, emb=None, context=None, num_frames=1, adapter_inputs=None):
        blocks = [b for b in self.transformer_blocks if isinstance(b, AdaptedTransformerBlock)]
        inputs = AdapterInputs(adapter_inputs or {}, repeats=x.shape[-2] * x.shape[-1])
        for block in blocks:
            block.adapter_inputs = inputs
        try:
            return super().forward(x, emb, context, num_frames)
        finally:
            for block in blocks:
                block.adapter_inputs = None


def _specialise(module: nn.Module, cls: type) -> None:
    """Give ``module`` the forward of ``cls``, a subclass of its class that adds no state of its own (parameters,
    names and hooks stay; FSDP2's ``fully_shard`` specialises module classes the same way)."""
    if isinstance(module, cls):
        return
    if type(module) is not cls.__base__:
        raise TypeError(f"cannot adapt a {type(module).__name__}: expected a {cls.__base__.__name__}")
    module.__class__ = cls


def _sublayer_positions(sublayers: Sequence[str] | Mapping[str, str] | str) -> dict[str, str]:
    """``[names]`` (all parallel) or ``{name: position}`` -> ``{name: position}`` in the original's order."""
    if isinstance(sublayers, str):
        sublayers = [sublayers]
    given = dict(sublayers) if isinstance(sublayers, Mapping) else dict.fromkeys(sublayers, "parallel")
    unknown = [s for s in given if s not in SUBLAYERS]
    if unknown or not given:
        raise ValueError(f"adapter sublayers must be a non-empty list (or name -> position mapping) of "
                         f"{list(SUBLAYERS)}, got {list(given) or sublayers!r}")
    bad = {s: p for s, p in given.items() if p not in POSITIONS}
    if bad:
        raise ValueError(f"adapter positions must be one of {POSITIONS}, got {bad}")
    return {s: given[s] for s in SUBLAYERS if s in given}


class TransformerAdapter(Adapter):
    """Bottleneck adapters on the sub-layers of every spatial (:class:`IdentityAdapter`) or temporal
    (:class:`MotionAdapter`) transformer block of the UNet."""

    markers = tuple(f"{slot}.{part}." for slot, _ in SUBLAYERS.values()
                    for part in ("down_linear", "up_linear", "condition_linear"))
    transformer_class: ClassVar[type] = nn.Module
    kind: ClassVar[str] = ""

    def __init__(self, sublayers, hidden_dim: int | None = None, condition: str | None = None,
                 strength: str | None = None, condition_dim: int | None = None, weights: str | None = None):
        self.sublayers = _sublayer_positions(sublayers)
        for key, value in (("hidden_dim", hidden_dim), ("condition_dim", condition_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be an integer >= 1 or null, got {value!r}")
        if strength is not None and condition is None:
            raise ValueError("a strength needs a condition to scale (set condition, or strength: null)")
        self.hidden_dim, self.condition, self.strength = hidden_dim, condition, strength
        self.condition_dim, self.weights = condition_dim, weights

    # ------------------------------------------------------------------ where
    def blocks(self, unet: nn.Module) -> Iterator[tuple[str, TransformerBlock, nn.Module]]:
        """(name, block, its transformer) of every transformer block this adapter adapts."""
        for name, module in unet.named_modules():
            if isinstance(module, self.transformer_class) and name.startswith(_TRUNK):
                for i, block in enumerate(module.transformer_blocks):
                    yield f"{name}.transformer_blocks.{i}", block, module

    def _condition_dim(self, unet: nn.Module) -> int | None:
        if self.condition is None:
            return None
        conditions = getattr(unet, "conditions", {})
        for name in (self.condition, self.strength):
            if name is not None and (name not in conditions or "adapter" not in conditions[name].routes):
                raise ValueError(f"the {self.kind} adapter reads the UNet condition {name!r}, but model.unet.conditions "
                                 f"has no adapter-kind condition of that name (have {list(conditions)}); add it, e.g. "
                                 "vgen.models.conditions.dreamvideo.AppearanceImage / AdapterStrength")
        width = getattr(conditions[self.condition], "image_dim", None) or self.condition_dim
        if width is None:
            raise ValueError(f"set condition_dim: the width of the condition {self.condition!r} is not known")
        if self.condition_dim is not None and self.condition_dim != width:
            raise ValueError(f"condition_dim={self.condition_dim} differs from the width of the condition "
                             f"{self.condition!r} ({width})")
        return width

    # ------------------------------------------------------------------ the Adapter interface
    def apply(self, unet: nn.Module) -> list[str]:
        targets = list(self.blocks(unet))
        if not targets:
            raise ValueError(f"the {self.kind} adapter found no {self.transformer_class.__name__} in "
                             f"{type(unet).__name__}")
        condition_dim = self._condition_dim(unet)
        taken = [f"{name} ({sub})" for name, block, _ in targets for sub in self.sublayers
                 if getattr(block, SUBLAYERS[sub][0], None) is not None]
        if taken:
            raise ValueError(f"these sub-layers already have an adapter: {taken[:4]}{' ...' if len(taken) > 4 else ''}")
        for _name, block, transformer in targets:
            if isinstance(transformer, TemporalTransformer):
                _specialise(transformer, AdaptedTemporalTransformer)
            _specialise(block, AdaptedTransformerBlock)
            width, like = block.norm1.normalized_shape[0], block.norm1.weight
            for sub, position in self.sublayers.items():
                module = BottleneckAdapter(width, self.hidden_dim or width // 2, position, condition_dim,
                                           self.condition, self.strength, device=like.device, dtype=like.dtype)
                setattr(block, SUBLAYERS[sub][0], module.train(block.training))
        if self.weights is not None:
            self.load_weights(unet, self.weights)
        return [name for name, _, _ in targets]

    def modules(self, unet: nn.Module) -> dict[str, BottleneckAdapter]:
        """``{name: adapter module}`` of this adapter in ``unet`` (empty before :meth:`apply`)."""
        found = {}
        for name, block, _ in self.blocks(unet):
            for sub in self.sublayers:
                module = getattr(block, SUBLAYERS[sub][0], None)
                if isinstance(module, BottleneckAdapter):
                    found[f"{name}.{SUBLAYERS[sub][0]}"] = module
        return found

    def parameter_names(self, unet: nn.Module) -> list[str]:
        return [f"{name}.{p}" for name, module in self.modules(unet).items() for p, _ in module.named_parameters()]

    def config(self) -> dict:
        return {"sublayers": dict(self.sublayers), "hidden_dim": self.hidden_dim, "condition": self.condition,
                "strength": self.strength, "condition_dim": self.condition_dim}

    @contextlib.contextmanager
    def disabled(self, unet: nn.Module) -> Iterator[None]:
        modules = list(self.modules(unet).values())
        previous = [m.enabled for m in modules]
        for m in modules:
            m.enabled = False
        try:
            yield
        finally:
            for m, enabled in zip(modules, previous):
                m.enabled = enabled

    # ------------------------------------------------------------------ weights of their own
    def state_dict(self, unet: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(unet.named_parameters())
        return {name: params[name].detach() for name in self.parameter_names(unet)}

    def save_weights(self, unet: nn.Module, path: str | Path) -> Path:
        """Write this adapter's weights (and its settings, as metadata) to a safetensors file, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        state = {k: v.contiguous().cpu() for k, v in self.state_dict(unet).items()}
        metadata = {"format": ADAPTER_FORMAT, "class": f"{type(self).__module__}.{type(self).__qualname__}",
                    "config": json.dumps(self.config())}
        safetensors.torch.save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    def load_weights(self, unet: nn.Module, path: str | Path) -> None:
        """Load this adapter's weights strictly from a file of adapter weights: :meth:`save_weights`, a VGen
        DreamVideo adapter ``.pth``, or one holding other DreamVideo adapters as well (theirs are left alone)."""
        state = read_state_dict(path)
        expected = set(self.parameter_names(unet))
        foreign = [k for k in state if k not in expected and not self.owns(k)]
        if foreign:
            raise KeyError(f"{path}: not a file of DreamVideo adapter weights; unexpected {foreign[:6]}"
                           f"{' ...' if len(foreign) > 6 else ''} ({len(foreign)})")
        load_adapter_state(unet, self, {k: v for k, v in state.items() if k in expected}, str(path))


class IdentityAdapter(TransformerAdapter):
    """DreamVideo's subject (identity) adapter on every spatial transformer block: by default parallel to the
    cross-attention, no condition (VGen ``spatial_adapter_list: [cross_attention]``).

    Args:
        sublayers: ``[names]`` (each parallel) or ``{name: parallel | serial | none}`` of ``self_attention``,
            ``cross_attention``, ``feedforward``.
        hidden_dim: bottleneck width (null = half the block's width).
        weights: a file of its weights to start from (:meth:`save_weights`, or a VGen adapter ``.pth``).
    """

    transformer_class = SpatialTransformer
    kind = "identity"

    def __init__(self, sublayers=("cross_attention",), hidden_dim: int | None = None, weights: str | None = None):
        super().__init__(sublayers, hidden_dim, weights=weights)

    def config(self) -> dict:
        return {"sublayers": dict(self.sublayers), "hidden_dim": self.hidden_dim}


class MotionAdapter(TransformerAdapter):
    """DreamVideo's motion adapter on every temporal transformer block: by default parallel to both attentions and
    the feed-forward, each adding ``lambda * W_c c`` of the UNet conditions ``condition`` (c) and ``strength``
    (lambda) to its input (VGen ``temporal_adapter_list`` with ``temporal_adapter_condition_dim``).

    Args:
        sublayers: as :class:`IdentityAdapter`'s.
        hidden_dim: bottleneck width (null = half the block's width).
        condition: the adapter-kind UNet condition c (null: adapters without the appearance term).
        strength: the adapter-kind UNet condition lambda (null, or absent at a call: 1).
        condition_dim: width of c (null = the condition's ``image_dim``; checked against it).
        weights: a file of its weights to start from.
    """

    transformer_class = TemporalTransformer
    kind = "motion"

    def __init__(self, sublayers=("self_attention", "cross_attention", "feedforward"), hidden_dim: int | None = None,
                 condition: str | None = "appearance", strength: str | None = "appearance_strength",
                 condition_dim: int | None = None, weights: str | None = None):
        super().__init__(sublayers, hidden_dim, condition, strength, condition_dim, weights)


__all__ = ["AdaptedTemporalTransformer", "AdaptedTransformerBlock", "BottleneckAdapter", "IdentityAdapter",
           "MotionAdapter", "TransformerAdapter"]
