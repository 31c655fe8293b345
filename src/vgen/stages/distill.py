"""Stage 5: latent consistency distillation (VideoLCM, arXiv 2312.09109) and LCM sampling of the student.

A frozen teacher (any vgen stage-2/3 checkpoint, conditional variants included) drives a DDIM solver along its
probability-flow ODE; the student -- the trainable ``unet``, initialised from the teacher -- learns to map every
point of a trajectory to its end, against a target network that follows the student by EMA (rate 0.95). The
maths is in :mod:`vgen.diffusion.lcm`; this module adds the networks, their life cycle and checkpointing.

Teacher and target are deliberately *not* registered submodules: no strategy (DDP, ZeRO, FSDP2) wraps, shards or
hands them to the optimizer, and the teacher is never written to a checkpoint. They follow the stage's device and
dtype (``_apply``). The teacher is loaded in :meth:`setup` (fit only), so rebuilding a distilled checkpoint for
sampling (``vgen.sample``) does not need the teacher file.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from vgen.checkpoint.export import load_training_checkpoint, unet_weights
from vgen.config import ConfigError
from vgen.diffusion import Diffusion
from vgen.diffusion.lcm import consistency_distillation_loss
from vgen.models.conditions.classifier_free import guidance_pair
from vgen.stages.base import DiffusionStage
from vgen.stages.options import DistillOptions, TeacherOptions, parse
from vgen.training.ema import EMA

log = logging.getLogger(__name__)

# Encoder settings that may differ (where the weights file lives, chunking for memory).
_ENCODER_FREE_KEYS = {"weights", "encode_chunk", "decode_chunk"}


class ConsistencyDistillStage(DiffusionStage):
    """Consistency distillation of a frozen teacher into the trainable ``unet`` (the student).

    Args (beyond :class:`DiffusionStage`):
        teacher: ``checkpoint`` -- a vgen training checkpoint (``.ckpt`` file or sharded directory; the teacher
            UNet is built from its stored run config, which must match the run's model and diffusion), or released
            weights (a VGen ``.pth``, safetensors, a diffusers folder; loaded strictly into model.unet's
            architecture), or ``None`` = a frozen copy of the student's initial weights (smoke tests); ``ema``
            for vgen checkpoints (``None``: the EMA weights when present; ``True``: require them; ``False``: raw).
        distill: ``solver_steps`` (N, skip k = T/N), ``guidance`` (w; teacher CFG scale 1 + w), ``target_decay``,
            ``loss`` (huber | l2), ``huber_c``, ``sigma_data``, ``timestep_scaling``, ``sample_steps`` (LCM
            steps of validation videos and ``vgen.sample``), ``batch_cfg`` (teacher cond + uncond in one call).
        base_options: the remaining :class:`DiffusionStage` options (``gradient_checkpointing``, ...).
    """

    uses_condition_dropout = False  # the student sees every condition (VideoLCM: p_zero 0)

    def __init__(
        self,
        unet: nn.Module,
        diffusion: Diffusion,
        vae: nn.Module,
        text_encoder: nn.Module,
        image_encoder: nn.Module | None = None,
        teacher: dict | None = None,
        distill: dict | None = None,
        **base_options: Any,
    ):
        super().__init__(unet, diffusion, vae, text_encoder, image_encoder, **base_options)
        if self.init_cfg.path is not None:
            raise ValueError("stage.init.path does not apply to distillation: the student starts from the teacher "
                             "(stage.teacher.checkpoint)")
        self.teacher_cfg = parse(TeacherOptions, "teacher", teacher)
        self.distill_cfg = cfg = parse(DistillOptions, "distill", distill)
        cfg.check(diffusion.param.num_timesteps)
        # Plain dict, not attributes: nn.Module would register the networks as submodules.
        self._networks: dict[str, nn.Module | None] = {"teacher": None, "target": None}
        self._teacher_run_config: dict | None = None
        self._pending_target: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ teacher and target networks
    @property
    def teacher(self) -> nn.Module:
        return self._network("teacher")

    @property
    def target(self) -> nn.Module:
        return self._network("target")

    def _network(self, name: str) -> nn.Module:
        net = self._networks[name]
        if net is None:
            raise RuntimeError(f"the {name} network is built in setup('fit'); call stage.setup('fit') first")
        return net

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for net in self._networks.values():
            if net is not None:
                net._apply(fn, recurse)
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.prepare_networks()

    def prepare_networks(self) -> None:
        """Load the teacher, initialise the student (and its EMA) from it, and copy it into the target network."""
        if self._networks["teacher"] is not None:
            return
        path = self.teacher_cfg.checkpoint
        if path is None:
            rank_zero_warn("stage.teacher.checkpoint is null: distilling from a frozen copy of the student's initial "
                           "weights (only meaningful for smoke tests)")
            teacher = copy.deepcopy(self.unet)
        else:
            teacher = self._load_teacher(str(path))
            self.unet.load_state_dict(teacher.state_dict(), strict=True)
            if self.ema is not None:
                self.ema = EMA(self.unet, self.ema.decay, self.ema.start_step)
        reference = next(self.unet.parameters())
        teacher.to(device=reference.device, dtype=reference.dtype).requires_grad_(False).eval()
        target = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self._networks.update(teacher=teacher, target=target)
        if self._pending_target is not None:
            self._load_target(self._pending_target)
            self._pending_target = None
        self._check_encoders()

    def _load_teacher(self, path: str) -> nn.Module:
        key = f"stage.teacher.checkpoint={path}"
        if not Path(path).exists():
            raise ConfigError(f"{key}: no such file (point it at the stage-2/3 teacher's .ckpt)")
        if not is_vgen_checkpoint(Path(path)):
            return self._load_released_teacher(Path(path), key)
        weights, run_config, used_ema = read_teacher_checkpoint(Path(path), self.teacher_cfg.ema, key)
        if not isinstance(run_config, dict) or "unet" not in run_config.get("model", {}):
            raise ConfigError(f"{key}: the checkpoint has no vgen_config with model.unet (not written by vgen.train)")
        self._teacher_run_config = run_config
        teacher = instantiate(run_config["model"]["unet"])
        self._check_architecture(teacher, key)
        self._check_diffusion(instantiate(run_config["diffusion"]), key)
        teacher.load_state_dict(weights, strict=True)
        log.info("teacher: %s (%s weights)", path, "EMA" if used_ema else "raw")
        return teacher

    def _load_released_teacher(self, path: Path, key: str) -> nn.Module:
        """Released weights (a VGen ``.pth``, safetensors, a diffusers folder): model.unet's architecture, strictly."""
        from vgen.checkpoint.original import init_unet

        teacher = copy.deepcopy(self.unet)
        try:
            fmt = init_unet(teacher, path, "auto")
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{key}: {str(err).strip().splitlines()[0]}") from err
        if fmt == "sd21":
            raise ConfigError(f"{key} is a Stable Diffusion 2.1 checkpoint (spatial layers only), not a video teacher")
        log.info("teacher: %s (released weights, format %s, architecture of model.unet)", path, fmt)
        return teacher

    def _check_architecture(self, teacher: nn.Module, key: str) -> None:
        mine = getattr(self.unet, "config", None)
        theirs = getattr(teacher, "config", None)
        if type(teacher) is not type(self.unet) or mine is None or theirs is None:
            raise ConfigError(f"{key}: the teacher is a {type(teacher).__name__}, model.unet a "
                              f"{type(self.unet).__name__}; the student must have the teacher's architecture")
        mine, theirs = mine.architecture(), theirs.architecture()
        differ = [k for k in mine if mine[k] != theirs.get(k)]
        if differ:
            detail = ", ".join(f"{k} (teacher {theirs.get(k)!r}, model.unet {mine[k]!r})" for k in differ[:4])
            raise ConfigError(f"{key}: model.unet differs from the teacher's UNet in {detail}; the student is "
                              "initialised from the teacher, so choose the teacher's model/unet")

    def _check_diffusion(self, teacher_diffusion: Diffusion, key: str) -> None:
        mine, theirs = self.diffusion.param, teacher_diffusion.param
        if mine.prediction != theirs.prediction:
            raise ConfigError(f"{key}: diffusion.prediction={mine.prediction} but the teacher predicts "
                              f"{theirs.prediction}; choose the teacher's diffusion config")
        if mine.schedule.betas.shape != theirs.schedule.betas.shape or not torch.allclose(
                mine.schedule.betas, theirs.schedule.betas, rtol=0, atol=1e-12):
            raise ConfigError(f"{key}: the diffusion noise schedule differs from the teacher's; choose the teacher's "
                              "diffusion config")

    def _check_encoders(self) -> None:
        """The frozen encoders must be the teacher's (same class and settings; the weights path may differ)."""
        if self._teacher_run_config is None or self.run_config is None:
            return
        for name in ("vae", "text_encoder", "image_encoder") if self.image_encoder is not None else ("vae", "text_encoder"):
            mine = self.run_config.get("model", {}).get(name) or {}
            theirs = self._teacher_run_config.get("model", {}).get(name) or {}
            differ = sorted(k for k in set(mine) | set(theirs)
                            if k not in _ENCODER_FREE_KEYS and mine.get(k) != theirs.get(k))
            if differ:
                k = differ[0]
                raise ConfigError(f"model.{name}.{k}={mine.get(k)!r} differs from the teacher's ({theirs.get(k)!r}, "
                                  f"stage.teacher.checkpoint={self.teacher_cfg.checkpoint}); use the teacher's "
                                  f"model/{name}")

    def update_target(self) -> None:
        """Move the target network towards the student by ``distill.target_decay`` (after each optimizer step)."""
        update_target_network(self.target, self.unet, self.distill_cfg.target_decay)

    def _load_target(self, state: dict[str, torch.Tensor]) -> None:
        target = self.target
        expected, given = set(target.state_dict()), set(state)
        if expected != given:
            raise KeyError(f"checkpoint lcm_target does not match the UNet: missing {sorted(expected - given)[:5]}, "
                           f"unexpected {sorted(given - expected)[:5]}")
        reference = next(target.parameters())
        target.load_state_dict({k: v.to(reference.device) for k, v in state.items()}, strict=True)

    # ------------------------------------------------------------------ persistence
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._networks["target"] is not None:
            checkpoint["lcm_target"] = {k: v.detach().cpu() for k, v in self.target.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "lcm_target" not in checkpoint:
            raise KeyError("checkpoint has no lcm_target (the consistency target network): resume a distillation "
                           "run from its own checkpoints; the teacher goes in stage.teacher.checkpoint")
        if self._networks["target"] is None:
            self._pending_target = checkpoint["lcm_target"]
        else:
            self._load_target(checkpoint["lcm_target"])

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def distill_conditions(self, batch: dict, latents: torch.Tensor) -> tuple[dict, dict]:
        """(cond, uncond) UNet inputs: every condition of the batch, and for the teacher's unconditional branch each
        condition's guidance null (negative prompt, zero CLIP image embedding; the first frame is kept)."""
        values = self.condition_values(self.condition_inputs(batch, latents, latents.shape[2]))
        return guidance_pair(self.unet.conditions, values, self)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        cfg = self.distill_cfg
        latents = self.batch_latents(batch)
        cond, uncond = self.distill_conditions(batch, latents)
        per_sample, parts = consistency_distillation_loss(
            self.unet, self.target, self.teacher, self.diffusion.param, latents, cond=cond, uncond=uncond,
            **self._seeded_draws(batch, latents), frame_correlation=self.diffusion.frame_noise_correlation,
            guidance=cfg.guidance, solver_steps=cfg.solver_steps, loss=cfg.loss, huber_c=cfg.huber_c,
            sigma_data=cfg.sigma_data, timestep_scaling=cfg.timestep_scaling, batch_cfg=cfg.batch_cfg)
        if self._trainer is not None:  # the loss's own terms: comparable whatever distill.loss and huber_c are
            gap = (parts["prediction"].detach().float() - parts["target"].float()).pow(2).mean()
            self.log("train/consistency_mse", gap, batch_size=latents.shape[0])
            self.log("train/solver_timestep", parts["t"].float().mean(), batch_size=latents.shape[0])
        return per_sample.mean()

    def _seeded_draws(self, batch: dict, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample solver index and noise from ``batch["noise_seed"]`` (world-size independent; the noise with the
        recipe's frame correlation, as the teacher was trained); empty without."""
        if "noise_seed" not in batch:
            return {}
        indices, noises = [], []
        for i, seed in enumerate(batch["noise_seed"].tolist()):
            g = torch.Generator().manual_seed(int(seed))
            indices.append(torch.randint(0, self.distill_cfg.solver_steps, (1,), generator=g))
            noises.append(self.diffusion.noise(latents[i:i + 1].shape, generator=g))
        return {"index": torch.cat(indices).to(latents.device),
                "noise": torch.cat(noises).to(device=latents.device, dtype=latents.dtype)}

    def after_optimizer_step(self, stepped: bool) -> None:
        """After the optimizer step (and the base's EMA), the target update, before any callback checkpoints.

        A step the base's non-finite guard dropped (``step_skipped``: any micro-batch since the last step) moves no
        target either, nor does a DeepSpeed micro-batch that did not step.
        """
        super().after_optimizer_step(stepped)
        if stepped and not self.step_skipped:
            self.update_target()


def is_vgen_checkpoint(path: Path) -> bool:
    """A vgen training checkpoint: a file holding ``vgen_config``, or a sharded directory with vgen's marker."""
    if path.is_dir():
        from vgen.training.checkpointing import MARKER

        return (path / MARKER).is_file()
    if path.suffix == ".safetensors" or not zipfile.is_zipfile(path):
        return False
    from vgen.checkpoint.safe_load import CheckpointError, load_weights_only

    try:
        content = load_weights_only(path, mmap=True)
    except CheckpointError:  # not a readable weights-only file: the release loader reports it
        return False
    return isinstance(content, dict) and "vgen_config" in content


def read_teacher_checkpoint(path: Path, ema: bool | None, key: str) -> tuple[dict[str, torch.Tensor], dict, bool]:
    """(UNet weights, stored run config, whether they are the EMA weights) of a vgen training checkpoint.

    ``path`` is a ``.ckpt`` file or a sharded (DeepSpeed / FSDP2) checkpoint directory. ``ema``: ``None`` = the
    EMA weights when the checkpoint has them, ``True`` = require them, ``False`` = the raw weights.
    """
    if path.is_dir():
        from vgen.checkpoint.export import load_unet_weights

        try:
            weights, meta = load_unet_weights(path, ema=ema is not False)
            used = ema is not False
        except KeyError:
            if ema:
                raise ConfigError(f"{key}: stage.teacher.ema is true but the checkpoint has no EMA weights") from None
            weights, meta = load_unet_weights(path, ema=False)
            used = False
        return weights, meta.get("vgen_config"), used
    ckpt = load_training_checkpoint(path)
    if ema and "ema" not in ckpt:
        raise ConfigError(f"{key}: stage.teacher.ema is true but the checkpoint has no EMA weights")
    used = "ema" in ckpt if ema is None else bool(ema)
    return unet_weights(ckpt, ema=used), ckpt.get("vgen_config"), used


@torch.no_grad()
def update_target_network(target: nn.Module, online: nn.Module, rate: float) -> None:
    """target <- rate * target + (1 - rate) * online for the parameters; buffers are copied."""
    with _full_parameters(online) as current:
        for name, param in target.named_parameters():
            param.lerp_(current[name].to(param.dtype), 1.0 - rate)
    buffers = dict(online.named_buffers())
    for name, buffer in target.named_buffers():
        buffer.copy_(buffers[name])


@contextlib.contextmanager
def _full_parameters(module: nn.Module):
    """``{name: full tensor}`` of ``module``'s parameters, gathered where a strategy shards them.

    FSDP2 parameters are DTensors (``full_tensor()`` all-gathers; every rank must call it in the same order);
    DeepSpeed ZeRO-3 parameters are gathered for the duration of the block.
    """
    params = dict(module.named_parameters())
    zero3 = [p for p in params.values() if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield {n: p.detach() for n, p in params.items()}
        return
    from torch.distributed.tensor import DTensor

    yield {n: p.full_tensor().detach() if isinstance(p, DTensor) else p.detach() for n, p in params.items()}

