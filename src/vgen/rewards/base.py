"""The reward interface (frames in [0, 1] + captions -> one score per frame), simple differentiable rewards, and
their weighted sum.

Every reward is a frozen ``nn.Module`` (no parameter is ever trained; gradients flow through the *frames*), so
the stage moves it with the rest of the model and never saves it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vgen.models.frozen import FrozenModule


class RewardModel(FrozenModule):
    """``reward(frames, captions) -> [N]``: ``frames`` [N, 3, H, W] RGB in [0, 1], one caption per frame.

    Subclasses implement :meth:`score` and call :meth:`freeze` at the end of ``__init__``. Scores must be
    differentiable with respect to ``frames``; higher is better.
    """

    def forward(self, frames: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: frames must be [N, 3, H, W] RGB in [0, 1], got "
                             f"{tuple(frames.shape)}")
        if isinstance(captions, str) or len(captions) != frames.shape[0]:
            raise ValueError(f"{type(self).__name__}: need one caption per frame ({frames.shape[0]}), got "
                             f"{'a single string' if isinstance(captions, str) else len(captions)}")
        scores = self.score(frames, list(captions))
        if scores.shape != (frames.shape[0],):
            raise RuntimeError(f"{type(self).__name__}.score returned shape {tuple(scores.shape)}, expected "
                               f"[{frames.shape[0]}]")
        return scores

    def score(self, frames: torch.Tensor, captions: list[str]) -> torch.Tensor:
        raise NotImplementedError


def _rgb(values: Sequence[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name} must be 3 numbers in [0, 1] (RGB), got {list(values)}")
    return values


class ColorReward(RewardModel):
    """How close every pixel is to a colour: ``1 - mean |pixel - target|`` over pixels and channels, in [0, 1].

    ``target=[1, 0, 0]`` is the "redness" toy reward of the InstructVideo CPU proof. Ignores the caption.
    """

    def __init__(self, target: Sequence[float] = (1.0, 0.0, 0.0)):
        super().__init__()
        self.target = _rgb(target, "ColorReward target")
        self.freeze()

    def score(self, frames: torch.Tensor, captions: list[str]) -> torch.Tensor:
        target = frames.new_tensor(self.target).view(1, 3, 1, 1)
        return 1.0 - (frames - target).abs().mean(dim=(1, 2, 3))


class BrightnessReward(RewardModel):
    """Mean luma (ITU-R BT.601 weights) of each frame, in [0, 1]. Ignores the caption."""

    LUMA = (0.299, 0.587, 0.114)

    def __init__(self):
        super().__init__()
        self.freeze()

    def score(self, frames: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return (frames * frames.new_tensor(self.LUMA).view(1, 3, 1, 1)).sum(dim=1).mean(dim=(1, 2))


class WeightedSum(RewardModel):
    """``sum_k weights[k] * terms[k](frames, captions)``: compose rewards (e.g. HPSv2 + a little brightness).

    Args:
        terms: name -> reward model.
        weights: name -> weight; every term needs one (no silent default).
    """

    def __init__(self, terms: Mapping[str, RewardModel], weights: Mapping[str, float]):
        super().__init__()
        if not terms:
            raise ValueError("WeightedSum needs at least one term")
        if set(terms) != set(weights):
            raise ValueError(f"WeightedSum terms {sorted(terms)} and weights {sorted(weights)} must name the same "
                             "rewards")
        not_rewards = [k for k, v in terms.items() if not isinstance(v, RewardModel)]
        if not_rewards:
            raise TypeError(f"WeightedSum terms {not_rewards} are not vgen.rewards.RewardModel instances")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {k: float(v) for k, v in weights.items()}
        self.freeze()

    def score(self, frames: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return sum(self.weights[name] * term(frames, captions) for name, term in self.terms.items())
