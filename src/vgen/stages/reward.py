"""Stage 4: reward fine-tuning as editing (InstructVideo, arXiv 2312.12490) with LoRA.

Each step takes real captioned clips, noises their latents to the DDIM level of ``tau`` (551 for tau = 0.6 of a
20-step grid), runs the guided DDIM chain back to level 0 with gradients through the last ``grad_steps`` steps
only (activation-checkpointed), decodes one random frame per segment with the frozen VAE (differentiably), and
scores them with a frozen image reward (HPSv2 in the paper). The loss is ``mean(1 - R)`` with R the temporally
attenuated segmental reward (:mod:`vgen.rewards.video`), plus an optional regulariser towards the base model's
prediction. Maths: :mod:`vgen.rewards.chain`; procedure: ``shared/docs/methods.md`` section 6.

Only the LoRA adapters (:mod:`vgen.models.lora`) train; the base UNet is frozen and comes from ``init.path``.
Checkpoints therefore hold the adapters only (``unet.<module>.lora_down.weight`` ...), plus their rank and alpha
under ``"lora"``; :func:`export_lora` writes one as a standalone LoRA file.
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
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from vgen.checkpoint.export import load_training_checkpoint
from vgen.checkpoint.original import FORMATS, init_unet
from vgen.diffusion import Diffusion, training_noise
from vgen.models.frozen import read_state_dict
from vgen.models.lora import (
    ATTENTION_TARGETS,
    LORA_FORMAT,
    apply_lora,
    load_lora,
    lora_config,
    lora_disabled,
    lora_parameter_names,
    mark_only_lora_trainable,
)
from vgen.rewards import (
    RewardModel,
    partial_ddim_chain,
    partial_timesteps,
    segment_frame_indices,
    segmental_reward,
)
from vgen.stages.base import DiffusionStage

log = logging.getLogger(__name__)

TUNING_DEFAULTS = {"tau": 0.6, "ddim_steps": 20, "guidance": 3.0, "grad_steps": 1, "checkpointing": True,
                   "segments": 4, "lambda_tar": 1.0, "kl_weight": 0.0, "batch_cfg": False}
LORA_DEFAULTS = {"rank": 4, "alpha": None, "targets": list(ATTENTION_TARGETS), "weights": None}
INIT_DEFAULTS = {"path": None, "format": "auto"}


def _options(name: str, given: Mapping | None, defaults: dict) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key stage.{name}.{unknown[0]}; valid keys: {sorted(defaults)}")
    return {**defaults, **given}


def _has_adapter_keys(path: str | Path) -> bool:
    """Whether a weights file holds LoRA adapters too (an original UNetSD_LoRA / InstructVideo checkpoint)."""
    path = Path(path)
    if path.is_dir():
        return False
    if path.suffix == ".safetensors":
        with safetensors.safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    else:
        keys = list(read_state_dict(path))
    return any("_lora." in k or ".lora_down." in k or ".lora_up." in k for k in keys)


class RewardFinetuneStage(DiffusionStage):
    """Reward fine-tuning of a text-to-video UNet through LoRA adapters (InstructVideo).

    Args (beyond :class:`DiffusionStage`):
        reward: a frozen :class:`vgen.rewards.RewardModel` (frames in [0, 1] + captions -> per-frame scores).
        init: ``path``/``format`` of the base weights (any :func:`vgen.checkpoint.original.init_unet` format;
            a file that already holds adapters, e.g. the released InstructVideo model, loads after them).
        lora: ``rank``, ``alpha`` (null = scale 1), ``targets`` (module-name patterns), ``weights`` (a LoRA file
            of :func:`vgen.models.lora.save_lora` to start from).
        tuning: ``tau``, ``ddim_steps``, ``guidance`` (CFG against ``conditioning.negative_prompt``, the empty
            prompt for InstructVideo), ``grad_steps`` (K), ``checkpointing``, ``segments`` (S), ``lambda_tar``,
            ``kl_weight`` (regulariser to the base model's guided prediction; 0 = off), ``batch_cfg``.
    """

    def __init__(
        self,
        unet: nn.Module,
        diffusion: Diffusion,
        vae: nn.Module,
        text_encoder: nn.Module,
        reward: nn.Module,
        image_encoder: nn.Module | None = None,
        init: Mapping | None = None,
        lora: Mapping | None = None,
        tuning: Mapping | None = None,
        optim: dict | None = None,
        ema: dict | None = None,
        conditioning: dict | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        max_nonfinite_steps: int = 3,
    ):
        init_cfg = _options("init", init, INIT_DEFAULTS)
        if init_cfg["format"] not in FORMATS:
            raise ValueError(f"stage.init.format must be one of {list(FORMATS)}, got {init_cfg['format']!r}")
        self.lora_cfg = _options("lora", lora, LORA_DEFAULTS)
        self.tuning = _options("tuning", tuning, TUNING_DEFAULTS)
        if not isinstance(reward, RewardModel):
            raise TypeError(f"stage.reward must be a vgen.rewards.RewardModel (e.g. model/reward=hpsv2), got "
                            f"{type(reward).__name__}")
        if getattr(unet.config, "first_frame_condition", False) or getattr(unet.config, "image_tokens", 0):
            raise ValueError("stage=reward fine-tunes text-to-video UNets; model.unet is image-conditioned")
        self.timesteps = self._check_tuning(diffusion.param.num_timesteps)
        self._prepare_unet(unet, init_cfg)
        conditioning = {"negative_prompt": "", "p_zero": 0.0, "spatial_grad_scale": 1.0, **(conditioning or {})}
        ema = {"enabled": False, **(ema or {})}
        super().__init__(unet, diffusion, vae, text_encoder, None, optim=optim, ema=ema, conditioning=conditioning,
                         gradient_checkpointing=gradient_checkpointing, compile=compile,
                         max_nonfinite_steps=max_nonfinite_steps)
        self.reward = reward.requires_grad_(False).eval()

    def _prepare_unet(self, unet: nn.Module, init_cfg: dict) -> None:
        path, fmt = init_cfg["path"], init_cfg["format"]
        if path is None:
            rank_zero_warn("stage.init.path is null: reward fine-tuning a randomly initialised UNet (only meaningful "
                           "for smoke tests; InstructVideo starts from ModelScope-T2V v1.4)")
        with_adapters = path is not None and _has_adapter_keys(path)
        if path is not None and not with_adapters:
            init_unet(unet, path, fmt)
        cfg = self.lora_cfg
        targets = [cfg["targets"]] if isinstance(cfg["targets"], str) else list(cfg["targets"])
        try:
            apply_lora(unet, cfg["rank"], cfg["alpha"], targets)
        except ValueError as err:
            raise ValueError(f"stage.lora: {err}") from None
        if with_adapters:
            init_unet(unet, path, fmt)
        if cfg["weights"] is not None:
            load_lora(unet, cfg["weights"])
        trainable = mark_only_lora_trainable(unet)
        log.info("LoRA rank %s on %d modules: %d trainable of %d parameters", cfg["rank"],
                 len(lora_config(unet)["modules"]), trainable, sum(p.numel() for p in unet.parameters()))

    def _check_tuning(self, num_timesteps: int) -> torch.Tensor:
        cfg = self.tuning
        try:
            timesteps = partial_timesteps(num_timesteps, cfg["ddim_steps"], cfg["tau"])
        except ValueError as err:
            raise ValueError(f"stage.tuning: {err}") from None
        checks = [
            ("grad_steps", isinstance(cfg["grad_steps"], int) and 1 <= cfg["grad_steps"] <= len(timesteps),
             f"an integer in [1, {len(timesteps)}] (the chain has int(tau * ddim_steps) = {len(timesteps)} steps)"),
            ("segments", isinstance(cfg["segments"], int) and cfg["segments"] >= 1, "an integer >= 1"),
            ("lambda_tar", cfg["lambda_tar"] >= 0, ">= 0"),
            ("guidance", cfg["guidance"] >= 0, ">= 0"),
            ("kl_weight", cfg["kl_weight"] >= 0, ">= 0"),
        ]
        for key, ok, valid in checks:
            if not ok:
                raise ValueError(f"stage.tuning.{key} must be {valid}, got {cfg[key]!r}")
        return timesteps

    # ------------------------------------------------------------------ persistence: the adapters only
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Checkpoints hold the LoRA weights only (the base UNet is frozen and rebuilt from ``init``)."""
        names = set(lora_parameter_names(self.unet))
        return {f"unet.{k}": v for k, v in self.unet.state_dict(keep_vars=keep_vars).items() if k in names}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise KeyError(f"checkpoint does not hold this run's LoRA adapters: missing {missing[:5]} ({len(missing)}),"
                           f" unexpected {unexpected[:5]} ({len(unexpected)})")
        full = self.unet.state_dict()
        full.update({k[len("unet."):]: v for k, v in state_dict.items()})
        return self.unet.load_state_dict(full, strict=True, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        config = lora_config(self.unet)
        checkpoint["lora"] = {"rank": config["rank"], "alpha": config["alpha"], "modules": config["modules"]}

    # ------------------------------------------------------------------ training
    def _base_prediction(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        with lora_disabled(self.unet):
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
        cond = {"text": self.batch_text(batch)}
        uncond = {"text": self.negative_embedding(b)} if cfg["guidance"] != 1.0 else None
        param = self.diffusion.param
        start = torch.full((b,), int(self.timesteps[0]), dtype=torch.long, device=latents.device)
        x_start = param.q_sample(latents, start, self._start_noise(batch, latents))
        x, regulariser = partial_ddim_chain(
            self.unet, param, x_start, self.timesteps, param.num_timesteps // cfg["ddim_steps"], cond=cond,
            uncond=uncond, guidance=cfg["guidance"], grad_steps=cfg["grad_steps"],
            checkpointing=cfg["checkpointing"], batch_cfg=cfg["batch_cfg"],
            reference=self._base_prediction if cfg["kl_weight"] > 0 else None)
        indices = segment_frame_indices(b, frames, cfg["segments"], device=x.device)
        picked = torch.stack([x[i][:, indices[i]] for i in range(b)])  # [B, C, S, h, w]: decode only these
        pixels = self.vae.decode(picked)
        reward, scores = segmental_reward(((pixels.float() + 1) / 2).clamp(0, 1), indices, frames, captions,
                                          self.reward, cfg["lambda_tar"])
        loss = (1 - reward).mean()
        self.log("train/reward", reward.mean().detach(), prog_bar=True, batch_size=b)
        self.log("train/frame_score", scores.mean().detach(), batch_size=b)
        if regulariser is not None:
            self.log("train/kl", regulariser.mean().detach(), batch_size=b)
            loss = loss + cfg["kl_weight"] * regulariser.mean()
        return loss


def export_lora(checkpoint_path: str | Path, out_path: str | Path, ema: bool = False) -> Path:
    """Write the adapters of a reward fine-tuning checkpoint to a LoRA file (:func:`vgen.models.lora.load_lora`)."""
    from vgen.checkpoint.export import unet_weights

    ckpt = load_training_checkpoint(checkpoint_path)
    if "lora" not in ckpt:
        raise KeyError(f"{checkpoint_path} is not a reward fine-tuning checkpoint (no 'lora' entry)")
    weights = unet_weights(ckpt, ema=ema)
    info = ckpt["lora"]
    metadata = {"format": LORA_FORMAT, "rank": str(info["rank"]), "alpha": json.dumps(info["alpha"]),
                "modules": json.dumps(info["modules"]), "global_step": str(ckpt.get("global_step"))}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
    tmp.replace(out_path)
    return out_path
