"""Typed stage options: one dataclass per option group, with its defaults and its validation in one place.

Stages take the groups as plain mappings (from Hydra) and turn them into these with :func:`parse`, which names the
offending key (``stage.<group>.<key>``) for an unknown key or a bad value.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from vgen.training.optim import DECAY_MODES, IMPLEMENTATIONS

# VGen's unconditional text for classifier-free guidance (the only copy: configs say null for "this one").
NEGATIVE_PROMPT = ("Distorted, discontinuous, Ugly, blurry, low resolution, motionless, static, disfigured, "
                   "disconnected limbs, Ugly faces, incomplete arms")
DROPOUT_SCHEMES = ("independent", "all_none_each")
INIT_FORMATS = ("auto", "vgen", "sd21", "vgen_ckpt", "vgen_unet", "diffusers")

T = TypeVar("T")


class OptionError(ValueError):
    """A stage option is unknown or has a bad value (the message names ``stage.<group>.<key>``)."""


def _number(group: str, key: str, value: Any, low: float | None = None, high: float | None = None,
            integer: bool = False, low_open: bool = False, high_open: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        kind = "an integer" if integer else "a number"
        raise OptionError(f"stage.{group}.{key} must be {kind}{' ' + ' and '.join(bounds) if bounds else ''}, "
                          f"got {value!r}")


def _choice(group: str, key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise OptionError(f"stage.{group}.{key} must be one of {', '.join(choices)}, got {value!r}")


def parse(cls: type[T], group: str, given: Mapping | T | None) -> T:
    """``cls(**given)`` with unknown keys named (and the nearest valid one suggested)."""
    if isinstance(given, cls):
        return given
    given = dict(given or {})
    valid = [f.name for f in fields(cls) if f.init]
    for key in given:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise OptionError(f"unknown key stage.{group}.{key}{hint}; valid keys: {valid}")
    return cls(**given)


@dataclass
class OptimOptions:
    lr: float = 5e-5  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay
    warmup_steps: int = 10  # linear warm-up steps
    decay: str = "constant"  # constant | cosine | linear
    min_lr_ratio: float = 0.0  # final LR fraction of the peak
    total_steps: int = 1_000_000  # decay horizon
    implementation: str = "auto"  # AdamW kernels: auto (= foreach) | loop | foreach | fused

    def __post_init__(self):
        _number("optim", "lr", self.lr, 0, low_open=True)
        _choice("optim", "implementation", self.implementation, IMPLEMENTATIONS)
        if len(tuple(self.betas)) != 2:
            raise OptionError(f"stage.optim.betas must be two numbers, got {self.betas!r}")
        for beta in self.betas:
            _number("optim", "betas", beta, 0, 1, high_open=True)
        self.betas = tuple(float(b) for b in self.betas)
        _number("optim", "eps", self.eps, 0, low_open=True)
        _number("optim", "weight_decay", self.weight_decay, 0)
        _number("optim", "warmup_steps", self.warmup_steps, 0, integer=True)
        _choice("optim", "decay", self.decay, DECAY_MODES)
        _number("optim", "min_lr_ratio", self.min_lr_ratio, 0, 1)
        _number("optim", "total_steps", self.total_steps, 1, integer=True)


@dataclass
class EMAOptions:
    enabled: bool = True  # keep an exponential moving average of the trained weights
    decay: float = 0.9999  # per optimizer step
    start_step: int = 0  # copy (no averaging) before this step

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise OptionError(f"stage.ema.enabled must be true or false, got {self.enabled!r}")
        _number("ema", "decay", self.decay, 0, 1, high_open=True)
        _number("ema", "start_step", self.start_step, 0, integer=True)


@dataclass
class ConditioningOptions:
    """Classifier-free dropout across conditions (each condition's own probability is ``model.unet.conditions.
    <name>.dropout``), the negative prompt, and the SD-2.1 spatial gradient scale."""

    negative_prompt: str | None = None  # unconditional text of CFG; None = VGen's (NEGATIVE_PROMPT)
    scheme: str = "independent"  # independent | all_none_each (VideoComposer)
    p_joint_zero: float = 0.0  # every droppable condition nulled together (I2VGen-XL's unconditional branch)
    p_all_zero: float = 0.1  # all_none_each: share of samples with every condition dropped
    p_all_keep: float = 0.1  # all_none_each: share with every condition kept
    spatial_grad_scale: float = 1.0  # gradient scale on the SD-2.1-derived spatial parameters

    def __post_init__(self):
        if self.negative_prompt is None:
            self.negative_prompt = NEGATIVE_PROMPT
        if not isinstance(self.negative_prompt, str):
            raise OptionError(f"stage.conditioning.negative_prompt must be a string, got {self.negative_prompt!r}")
        _choice("conditioning", "scheme", self.scheme, DROPOUT_SCHEMES)
        for key in ("p_joint_zero", "p_all_zero", "p_all_keep"):
            _number("conditioning", key, getattr(self, key), 0, 1)
        if self.p_all_zero + self.p_all_keep > 1:
            raise OptionError("stage.conditioning.p_all_zero + p_all_keep must be <= 1, got "
                              f"{self.p_all_zero} + {self.p_all_keep}")
        _number("conditioning", "spatial_grad_scale", self.spatial_grad_scale, 0)


@dataclass
class InitOptions:
    path: str | None = None  # initial UNet weights (null = model.unet's random init)
    format: str = "auto"  # auto | vgen | sd21 | vgen_ckpt | vgen_unet | diffusers
    allow_missing: list[str] = field(default_factory=list)  # model key prefixes the file may lack (new paths)

    def __post_init__(self):
        _choice("init", "format", self.format, INIT_FORMATS)
        if self.path is not None:
            self.path = str(self.path)
        if isinstance(self.allow_missing, str) or not all(isinstance(p, str) and p for p in self.allow_missing):
            raise OptionError(f"stage.init.allow_missing must be a list of key prefixes, got {self.allow_missing!r}")
        self.allow_missing = list(self.allow_missing)


@dataclass
class PlaceholderOptions:
    token: str | None = None  # textual-inversion placeholder in captions ("*"); null = none
    init_word: str = "dog"  # one-token word whose embedding the placeholder starts from (train)
    path: str | None = None  # learned embedding to load (frozen): placeholder .safetensors or DreamVideo checkpoint
    train: bool = False  # learn the placeholder's embedding (subject step 1)

    def __post_init__(self):
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise OptionError(f"stage.placeholder.token must be a non-empty word or null, got {self.token!r}")
        if not isinstance(self.init_word, str) or not self.init_word.strip():
            raise OptionError(f"stage.placeholder.init_word must be a word, got {self.init_word!r}")
        if not isinstance(self.train, bool):
            raise OptionError(f"stage.placeholder.train must be true or false, got {self.train!r}")
        if self.path is not None:
            self.path = str(self.path)
        if self.token is None and (self.train or self.path is not None):
            raise OptionError("stage.placeholder.token is null, but placeholder.train or placeholder.path is set: "
                              "name the placeholder (e.g. token: '*')")
        if self.train and self.path is not None:
            raise OptionError("stage.placeholder: train a new embedding (train: true) or load one (path), not both")


@dataclass
class TextFreeOptions:
    mode: str = "none"  # none | empty_caption | all_videos
    condition: str = "image"  # the image-token condition text-free clips are conditioned through

    def __post_init__(self):
        _choice("text_free", "mode", self.mode, ("none", "empty_caption", "all_videos"))


@dataclass
class DistillOptions:
    solver_steps: int = 50  # N: teacher DDIM-solver grid (skip T / N)
    guidance: float = 9.0  # teacher guidance w (CFG scale 1 + w)
    target_decay: float = 0.95  # EMA rate of the target network
    loss: str = "huber"  # huber | l2
    huber_c: float = 0.001  # pseudo-Huber constant
    sigma_data: float = 0.5  # boundary-scaling sigma_data
    timestep_scaling: float = 10.0  # boundary-scaling s
    sample_steps: int = 4  # LCM steps of validation videos and vgen.sample
    batch_cfg: bool = False  # teacher cond + uncond in one doubled batch

    def check(self, num_timesteps: int) -> None:
        _number("distill", "solver_steps", self.solver_steps, 1, num_timesteps, integer=True)
        _number("distill", "guidance", self.guidance, 0)
        _number("distill", "target_decay", self.target_decay, 0, 1, high_open=True)
        _choice("distill", "loss", self.loss, ("huber", "l2"))
        _number("distill", "huber_c", self.huber_c, 0, low_open=True)
        _number("distill", "sigma_data", self.sigma_data, 0, low_open=True)
        _number("distill", "timestep_scaling", self.timestep_scaling, 0, low_open=True)
        _number("distill", "sample_steps", self.sample_steps, 1, self.solver_steps, integer=True)


@dataclass
class TeacherOptions:
    checkpoint: str | None = None  # the teacher's vgen checkpoint or released weights; None = a copy of the init
    ema: bool | None = None  # None = EMA weights when present; True = require them; False = raw weights


@dataclass
class TuningOptions:
    tau: float = 0.6  # edit strength: the chain starts int(tau * ddim_steps) steps from the end
    ddim_steps: int = 20  # DDIM grid of the chain
    guidance: float = 3.0  # CFG scale of the chain
    grad_steps: int = 1  # K: gradients through the last K steps
    checkpointing: bool = True  # recompute each differentiable step in backward
    segments: int = 4  # S: one frame per segment is scored
    lambda_tar: float = 1.0  # temporal attenuation of the segment scores
    kl_weight: float = 0.0  # regulariser weight towards the base model's prediction
    batch_cfg: bool = False  # cond + uncond in one doubled batch

    def check(self, chain_length: int) -> None:
        _number("tuning", "grad_steps", self.grad_steps, 1, chain_length, integer=True)
        _number("tuning", "segments", self.segments, 1, integer=True)
        _number("tuning", "lambda_tar", self.lambda_tar, 0)
        _number("tuning", "guidance", self.guidance, 0)
        _number("tuning", "kl_weight", self.kl_weight, 0)

