"""The condition registry: every conditioning input of the UNet3D is one :class:`Condition` module.

A condition has

* a **kind**, the route into the network: ``concat`` (channels concatenated to the noisy latent, or, with
  ``summed``, added into the UNet's shared ``concat_channels`` block as VideoComposer's STC encoders are),
  ``tokens`` (cross-attention tokens, concatenated in config order), ``embedding`` (added to the timestep
  embedding, per clip [B, D] or per frame [B, F, D]), ``feature`` (added to the output of the first input conv) or
  ``adapter`` (handed by name to the adapters applied to the UNet, e.g. DreamVideo's motion adapter; the base
  network itself never reads it);
* an **encoding**, ``forward(value, num_frames)``, from its input value to that route;
* an **extraction**, :meth:`Condition.extract`, from a training batch or the inputs of a sampling call (with the
  frozen encoders of :class:`ConditionInputs`) to its input value;
* its **null values**: ``drop_to`` in training (classifier-free dropout) and ``guide_to`` in the unconditional
  branch of classifier-free guidance, each one of :data:`NULL_RULES`;
* its own **dropout** probability.

The UNet builds its conditions from config (``model.unet.conditions``: a mapping name -> ``{_target_, ...}``) and
its forward takes them as a mapping (or keywords) by name. Classifier-free dropout (:mod:`vgen.models.conditions.
dropout`) and guidance (:func:`guidance_pair`) are generic: one code path for every condition.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

KINDS = ("concat", "tokens", "embedding", "feature", "adapter")
# zeros: zero input value | negative_prompt / empty_prompt: that text's embedding | keep: unchanged |
# drop: the condition's *output* is multiplied by zero (VideoComposer's DropPath; for summed concat = absent)
NULL_RULES = ("zeros", "negative_prompt", "empty_prompt", "keep", "drop")
RESERVED_NAMES = frozenset({"keep", "conditions", "x", "t"})
# Condition settings that do not change the network (classifier-free training and guidance, value extraction).
BEHAVIOUR_KEYS = frozenset({"dropout", "drop_to", "guide_to", "required", "stills", "from_batch", "frame",
                            "original_names"})


@dataclass(frozen=True)
class UNetDims:
    """The widths a condition module may need from the UNet it is part of."""

    model_channels: int  # width of the first level (= the input conv's output)
    embed_dim: int  # timestep-embedding width (4 x model_channels)
    context_dim: int  # cross-attention token width
    latent_channels: int  # channels of the noisy latent (in_channels)
    image_dim: int = 1024  # width of image-encoder (CLIP) embeddings
    concat_channels: int = 0  # width of the shared block summed concat conditions go into


class Encoders(Protocol):
    """The frozen encoders (a training stage or a :class:`vgen.pipeline.VideoPipeline`)."""

    device: torch.device

    def batch_text(self, batch: Mapping[str, Any]) -> torch.Tensor: ...  # [B, L, D] of batch["caption"]

    def negative_embedding(self, batch_size: int) -> torch.Tensor: ...  # [B, L, D]

    def null_embedding(self, batch_size: int) -> torch.Tensor: ...  # [B, L, D] of the empty prompt

    def batch_image_embedding(self, batch: Mapping[str, Any], frame: str | int) -> torch.Tensor: ...  # [B, 1, D]


@dataclass
class ConditionInputs:
    """What condition values are extracted from: one training batch, or the inputs of one sampling call.

    ``batch`` holds ``caption`` and, as a batch does, ``video`` [B, 3, F', H, W] (at sampling: the reference
    frames, e.g. the first-frame image as F' = 1) or cached embeddings, ``fps`` and any member a condition reads by
    name. ``latents`` are the clean latents of those frames (training: of the clip itself), ``num_frames`` the
    frames of the video being denoised.
    """

    batch: Mapping[str, Any]
    encoders: Encoders
    num_frames: int
    latents: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        if self.latents is not None:
            return self.latents.shape[0]
        return len(self.batch["caption"])


class ConditionError(ValueError):
    """A condition value is missing or malformed (the message names the condition)."""


class Condition(nn.Module):
    """One conditioning input. Subclasses set :attr:`kind` and implement :meth:`forward`.

    Args:
        dropout: probability that classifier-free dropout nulls this condition for a training sample.
        drop_to: what a dropped training sample gets (:data:`NULL_RULES`).
        guide_to: what the unconditional branch of classifier-free guidance gets (:data:`NULL_RULES`).
        required: the UNet refuses a forward without this condition (else a missing one is simply absent).
        stills: ``keep`` or ``zeros``: the value for single-frame targets (an image cannot condition on itself).
        from_batch: extracted from every batch / sampling call; ``False``: only where a stage or the caller asks
            for it (TF-T2V's image tokens, used for its text-free videos only).
        original_names: ``{own submodule prefix: key prefix in the original VGen class}`` (class defaults apply).
    """

    routes: ClassVar[tuple[str, ...]] = ()  # one or more of KINDS; forward returns a dict when there are several
    summed: ClassVar[bool] = False  # concat kind: added into the UNet's shared concat block instead of own channels
    uses_reference: ClassVar[bool] = False  # extracted from reference frames (video / first-frame image)
    needs_image_encoder: ClassVar[bool] = False  # its value is an image-encoder (CLIP) embedding
    wants_latent_size: ClassVar[bool] = False  # forward also takes ``latent_size=(h, w)`` of the noisy latent
    default_original_names: ClassVar[dict[str, str]] = {}

    def __init__(self, *, dropout: float = 0.0, drop_to: str = "zeros", guide_to: str = "zeros",
                 required: bool = False, stills: str = "keep", from_batch: bool = True,
                 original_names: Mapping[str, str] | None = None):
        super().__init__()
        if not self.routes or any(r not in KINDS for r in self.routes):
            raise TypeError(f"{type(self).__name__}.routes must be one or more of {KINDS}, got {self.routes!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        for key, rule in (("drop_to", drop_to), ("guide_to", guide_to)):
            if rule not in NULL_RULES:
                raise ValueError(f"{key} must be one of {NULL_RULES}, got {rule!r}")
        if stills not in ("keep", "zeros"):
            raise ValueError(f"stills must be keep or zeros, got {stills!r}")
        self.name = ""  # set by the UNet
        self.dropout = float(dropout)
        self.drop_to = drop_to
        self.guide_to = guide_to
        self.required = bool(required)
        self.stills = stills
        self.from_batch = bool(from_batch)
        self.original_names = {**self.default_original_names, **(original_names or {})}

    @property
    def kind(self) -> str:
        return "+".join(self.routes)

    # ------------------------------------------------------------------ encoding (inside the UNet)
    def forward(self, value: torch.Tensor, num_frames: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """``value`` -> the tensor of its route (a dict route -> tensor for several routes):
        concat [B, C, F, h, w], tokens [B, N, context_dim], embedding [B, embed_dim] or [B, F, embed_dim],
        feature [B, model_channels, h, w] or [B, model_channels, F, h, w], adapter: what its adapters read."""
        raise NotImplementedError

    @property
    def channels(self) -> int:
        """Input channels a ``concat`` condition adds (summed ones add none of their own)."""
        return 0

    # ------------------------------------------------------------------ values (outside the UNet)
    def extract(self, inputs: ConditionInputs) -> torch.Tensor | None:
        """This condition's value for ``inputs`` (``None`` = absent). Default: the batch member of its name."""
        value = inputs.batch.get(self.name)
        if value is None:
            return None
        return torch.as_tensor(value, device=inputs.encoders.device)

    def value(self, inputs: ConditionInputs, requested: bool = False) -> torch.Tensor | None:
        """:meth:`extract` (``None`` for a ``from_batch: false`` condition unless ``requested``), with ``stills:
        zeros`` applied to single-frame targets."""
        if not (self.from_batch or requested):
            return None
        value = self.extract(inputs)
        if value is None and self.required:
            raise ConditionError(f"the condition {self.name!r} ({type(self).__name__}) is required, but this batch "
                                 "or sampling call does not provide it")
        if value is not None and self.stills == "zeros" and inputs.num_frames == 1:
            value = torch.zeros_like(value)
        return value

    def null(self, rule: str, value: torch.Tensor, encoders: Encoders) -> torch.Tensor:
        """The null value under ``rule`` (not ``drop``, which acts on the output) for a batch of values."""
        if rule == "keep":
            return value
        if rule == "zeros":
            return torch.zeros_like(value)
        if rule == "negative_prompt":
            return encoders.negative_embedding(value.shape[0]).to(value)
        if rule == "empty_prompt":
            return encoders.null_embedding(value.shape[0]).to(value)
        raise ValueError(f"condition {self.name!r}: {rule!r} is not a value-level null rule")

    def example(self, batch_size: int, num_frames: int, height: int, width: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A random value of the right shape (memory planning, tests)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, dropout={self.dropout}, drop_to={self.drop_to}, guide_to={self.guide_to}"
                + (", required" if self.required else ""))


def _resolve(target: str):
    module, _, name = target.rpartition(".")
    if not module:
        raise ValueError(f"_target_ {target!r} is not a dotted class path")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"_target_ {target!r} cannot be imported: {err}") from None


def build_condition(name: str, spec: Mapping[str, Any], dims: UNetDims) -> Condition:
    """A :class:`Condition` from ``{_target_: <class path>, **kwargs}`` (the class gets ``dims=`` too)."""
    if name in RESERVED_NAMES or not name.isidentifier():
        raise ValueError(f"model.unet.conditions: {name!r} cannot name a condition (an identifier other than "
                         f"{sorted(RESERVED_NAMES)})")
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ValueError(f"model.unet.conditions.{name} must be a mapping with a _target_ (a vgen.models.conditions "
                         f"class), got {spec!r}")
    cls = _resolve(str(spec["_target_"]))
    if not (isinstance(cls, type) and issubclass(cls, Condition)):  # a config value: ValueError, as every bad key
        raise ValueError(f"model.unet.conditions.{name}._target_={spec['_target_']} is not a Condition class")  # noqa: TRY004
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    try:
        condition = cls(dims=dims, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.unet.conditions.{name}: {err}") from None
    condition.name = name
    return condition


def canonical_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with every constructor default filled in (its class's and :class:`Condition`'s), so two specs of
    the same condition compare equal however many defaults they spell out."""
    cls = _resolve(str(spec["_target_"]))
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or "__init__" not in vars(klass):
            continue
        for name, parameter in inspect.signature(klass.__init__).parameters.items():
            if parameter.default is not inspect.Parameter.empty and name != "dims":
                defaults[name] = parameter.default
    return {**defaults, **dict(spec)}


def architecture_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a condition spec that decides its modules and their shapes."""
    return {k: v for k, v in canonical_spec(spec).items() if k not in BEHAVIOUR_KEYS}
