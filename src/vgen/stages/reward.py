"""Stage 4: reward fine-tuning as editing (InstructVideo, arXiv 2312.12490) with LoRA.

Each step takes real captioned clips, noises their latents to the DDIM level of ``tau`` (551 for tau = 0.6 of a
20-step grid), runs the guided DDIM chain back to level 0 with gradients through the last ``grad_steps`` steps
only (activation-checkpointed), decodes one random frame per segment with the frozen VAE (differentiably), and
scores them with a frozen image reward (HPSv2 in the paper). The loss is ``mean(1 - R)`` with R the temporally
attenuated segmental reward (:mod:`vgen.rewards.video`), plus an optional regulariser towards the base model's
prediction. Maths: :mod:`vgen.rewards.chain`; procedure: ``shared/docs/methods.md`` section 6.

The adapters (``stage.adapters``, LoRA in InstructVideo: :class:`vgen.models.lora.LoRA`) train alone; the base UNet
is frozen and comes from ``init.path``. Checkpoints therefore hold the adapters only (``unet.<module>.lora_down.weight``
...), their settings under ``"adapters"`` and the base weights' path under ``"base_weights"``; :func:`export_lora`
writes the LoRA of one as a standalone LoRA file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from vgen.checkpoint.export import load_training_checkpoint
from vgen.diffusion import Diffusion, training_noise
from vgen.models.adapters import adapters_disabled
from vgen.models.conditions.classifier_free import guidance_pair
from vgen.models.lora import LORA_FORMAT
from vgen.rewards import (
    RewardModel,
    partial_ddim_chain,
    partial_timesteps,
    segment_frame_indices,
    segmental_reward,
)
from vgen.stages.base import DiffusionStage
from vgen.stages.options import TuningOptions, parse

log = logging.getLogger(__name__)


class RewardFinetuneStage(DiffusionStage):
    """Reward fine-tuning of a text-to-video UNet through adapters (InstructVideo: LoRA).

    Args (beyond :class:`DiffusionStage`):
        reward: a frozen :class:`vgen.rewards.RewardModel` (frames in [0, 1] + captions -> per-frame scores).
        tuning: ``tau``, ``ddim_steps``, ``guidance`` (CFG against ``conditioning.negative_prompt``, the empty
            prompt for InstructVideo), ``grad_steps`` (K), ``checkpointing``, ``segments`` (S), ``lambda_tar``,
            ``kl_weight`` (regulariser to the base model's guided prediction; 0 = off), ``batch_cfg``.
        adapters, init: as the base; ``init`` may be a file that already holds the adapters (the released
            InstructVideo model), which then loads after them.
    """

    uses_condition_dropout = False  # the chain always sees the caption

    def __init__(self, unet: nn.Module, diffusion: Diffusion, vae: nn.Module, text_encoder: nn.Module,
                 reward: nn.Module, image_encoder: nn.Module | None = None, tuning: Mapping | None = None,
                 **base_options: Any):
        self.tuning = parse(TuningOptions, "tuning", tuning)
        if not isinstance(reward, RewardModel):
            raise TypeError(f"stage.reward must be a vgen.rewards.RewardModel (e.g. model/reward=hpsv2), got "
                            f"{type(reward).__name__}")
        if any(c.uses_reference and c.required for c in unet.conditions.values()):
            raise ValueError("stage=reward fine-tunes text-to-video UNets; model.unet is image-conditioned")
        if not base_options.get("adapters"):
            raise ValueError("stage.adapters is empty: reward fine-tuning trains adapters (e.g. LoRA) on a frozen base")
        self.timesteps = self._check_tuning(diffusion.param.num_timesteps)
        ema = {"enabled": False, **(base_options.pop("ema", None) or {})}
        super().__init__(unet, diffusion, vae, text_encoder, None, ema=ema, **base_options)
        self.reward = reward.requires_grad_(False).eval()

    def _check_tuning(self, num_timesteps: int) -> torch.Tensor:
        cfg = self.tuning
        try:
            timesteps = partial_timesteps(num_timesteps, cfg.ddim_steps, cfg.tau)
        except ValueError as err:
            raise ValueError(f"stage.tuning: {err}") from None
        cfg.check(len(timesteps))
        return timesteps

    # ------------------------------------------------------------------ training
    def _base_prediction(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        with adapters_disabled(self.unet, self.adapters):
            return self.unet(x, t, **kwargs)

    def _start_noise(self, batch: dict, latents: torch.Tensor) -> torch.Tensor:
        if "noise_seed" in batch:  # world-size independent draws (vgen.training.synthetic)
            return self._seeded_noise(batch, latents)["noise"]
        return training_noise(latents, self.diffusion.offset_noise_strength,
                              frame_correlation=self.diffusion.frame_noise_correlation)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        cfg = self.tuning
        captions = list(batch["caption"])
        latents = self.batch_latents(batch)
        b, frames = latents.shape[0], latents.shape[2]
        values = self.condition_values(self.condition_inputs(batch, latents, frames))
        cond, uncond = guidance_pair(self.unet.conditions, values, self)
        if cfg.guidance == 1.0:
            uncond = None
        param = self.diffusion.param
        start = torch.full((b,), int(self.timesteps[0]), dtype=torch.long, device=latents.device)
        x_start = param.q_sample(latents, start, self._start_noise(batch, latents))
        x, regulariser = partial_ddim_chain(
            self.unet, param, x_start, self.timesteps, param.num_timesteps // cfg.ddim_steps, cond=cond,
            uncond=uncond, guidance=cfg.guidance, grad_steps=cfg.grad_steps,
            checkpointing=cfg.checkpointing, batch_cfg=cfg.batch_cfg,
            reference=self._base_prediction if cfg.kl_weight > 0 else None)
        indices = segment_frame_indices(b, frames, cfg.segments, device=x.device)
        picked = torch.stack([x[i][:, indices[i]] for i in range(b)])  # [B, C, S, h, w]: decode only these
        pixels = self.vae.decode(picked)
        reward, scores = segmental_reward(((pixels.float() + 1) / 2).clamp(0, 1), indices, frames, captions,
                                          self.reward, cfg.lambda_tar)
        loss = (1 - reward).mean()
        self.log("train/reward", reward.mean().detach(), prog_bar=True, batch_size=b)
        self.log("train/frame_score", scores.mean().detach(), batch_size=b)
        if regulariser is not None:
            self.log("train/kl", regulariser.mean().detach(), batch_size=b)
            loss = loss + cfg.kl_weight * regulariser.mean()
        return loss


def export_lora(checkpoint_path: str | Path, out_path: str | Path, ema: bool = False) -> Path:
    """Write the adapters of a reward fine-tuning checkpoint to a LoRA file (:func:`vgen.models.lora.load_lora`)."""
    from vgen.checkpoint.export import unet_weights

    ckpt = load_training_checkpoint(checkpoint_path)
    lora = {n: a for n, a in ckpt.get("adapters", {}).items() if a["class"].endswith(".LoRA")}
    if len(lora) != 1:
        raise KeyError(f"{checkpoint_path} holds no LoRA adapter (a reward fine-tuning checkpoint has one)")
    info = next(iter(lora.values()))["config"]
    weights = {k: v for k, v in unet_weights(ckpt, ema=ema).items() if k.endswith((".lora_down.weight",
                                                                                    ".lora_up.weight"))}
    modules = list(dict.fromkeys(k.rsplit(".", 2)[0] for k in weights))
    metadata = {"format": LORA_FORMAT, "rank": str(info["rank"]), "alpha": json.dumps(info["alpha"]),
                "modules": json.dumps(modules), "global_step": str(ckpt.get("global_step"))}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
    tmp.replace(out_path)
    return out_path
