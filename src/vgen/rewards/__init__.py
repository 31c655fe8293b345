"""Rewards for reward fine-tuning (InstructVideo): image rewards, the segmental video reward, and the
differentiable partial DDIM chain that turns a noised real clip into a scored edit."""

from vgen.rewards.base import BrightnessReward, ColorReward, RewardModel, WeightedSum
from vgen.rewards.chain import guided_ddim_step, partial_ddim_chain, partial_timesteps
from vgen.rewards.clip import CLIPScore, HPSv2Reward
from vgen.rewards.video import attenuation_weights, num_segments, segment_frame_indices, segmental_reward

__all__ = [
    "BrightnessReward",
    "CLIPScore",
    "ColorReward",
    "HPSv2Reward",
    "RewardModel",
    "WeightedSum",
    "attenuation_weights",
    "guided_ddim_step",
    "num_segments",
    "partial_ddim_chain",
    "partial_timesteps",
    "segment_frame_indices",
    "segmental_reward",
]
