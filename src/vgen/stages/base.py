"""What every VGen training stage shares: frozen encoders, latent encoding, conditions with generic classifier-free
dropout, the diffusion loss, initial weights and adapters, EMA (sharded like the model), the optimizer/LR schedule,
SD-2.1 spatial gradient scaling, the non-finite-loss guard, per-rank RNG state in checkpoints, parallelism hooks
(FSDP2 sharding, ``torch.compile``) and logging. Stages subclass :class:`DiffusionStage` and override only what
their algorithm changes; what trains is decided in one hook, :meth:`DiffusionStage.configure_trainable`.
Sampling is not a stage's business: :class:`vgen.pipeline.VideoPipeline` does it (also from a stage in memory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from vgen.diffusion import Diffusion
from vgen.diffusion.loss import sample_timesteps, training_noise
from vgen.models.adapters import (
    Adapter,
    adapter_parameter_names,
    file_has_adapter_keys,
    mark_only_adapters_trainable,
)
from vgen.models.conditions.classifier_free import apply_dropout, dropout_masks
from vgen.models.encoding import FrozenEncoding
from vgen.stages.options import ConditioningOptions, EMAOptions, InitOptions, OptimOptions, parse
from vgen.training import rng
from vgen.training.ema import EMA
from vgen.training.optim import build_optimizer, warmup_decay_lambda
from vgen.training.parallelize import compile_blocks, is_sharded, shard_unet

log = logging.getLogger(__name__)


def _frozen(module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        module.requires_grad_(False).eval()
    return module


class DiffusionStage(FrozenEncoding, L.LightningModule):
    """Base LightningModule: trains ``unet`` as the denoiser of ``diffusion`` on VAE latents.

    Args:
        unet: the trainable network (``vgen.models.UNet3D``); its conditions (``model.unet.conditions``) say what
            it is conditioned on, each with its own classifier-free dropout probability.
        diffusion: schedule + parameterisation + loss/sampler defaults (``vgen.diffusion.Diffusion``).
        vae, text_encoder, image_encoder: frozen encoders (image encoder only for image-conditioned models).
        optim, ema, conditioning, init: option groups (:mod:`vgen.stages.options`): optimizer and LR schedule; EMA;
            the dropout scheme across conditions, the negative prompt and the SD-2.1 spatial gradient scale; the
            initial UNet weights (a VGen release, SD-2.1, a vgen checkpoint, diffusers).
        adapters: ``{name: Adapter}`` applied from outside the UNet after ``init`` (e.g. LoRA); only they train,
            and checkpoints hold only them (plus the name of their base weights, ``init.path``).
        gradient_checkpointing: recompute each UNet block in backward (activation memory for compute).
        compile: ``torch.compile`` each UNet block (GPU runs; off by default and on CPU).
        max_nonfinite_steps: a step whose loss is NaN/Inf on any rank is skipped on every rank and counted;
            this many in a row stop training with an error naming the step.

    Batches may carry ``noise_seed`` ([B] int64): each sample's timestep and noise are then drawn from its own
    seed instead of the global generator, which makes the trajectory independent of the world size (the
    synthetic data of ``vgen.training.synthetic`` does this).

    Latent-cache batches (``type: latent`` sources, shards from ``data_pipelines/encode.py``) carry ``latent``
    [B, C, F, h, w] instead of ``video``, and ``text_embedding`` [B, L, D] / ``image_embedding`` when stored: the
    VAE, the text encoder and the image encoder are then skipped for them. The text encoder still gives the
    negative-prompt (and empty-prompt) embeddings, once, that classifier-free dropout swaps in.
    """

    uses_condition_dropout = True  # stages that never train the unconditional branch set False

    def __init__(
        self,
        unet: nn.Module,
        diffusion: Diffusion,
        vae: nn.Module,
        text_encoder: nn.Module,
        image_encoder: nn.Module | None = None,
        optim: Mapping | None = None,
        ema: Mapping | None = None,
        conditioning: Mapping | None = None,
        init: Mapping | None = None,
        adapters: Mapping[str, Adapter] | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        max_nonfinite_steps: int = 3,
    ):
        super().__init__()
        self.optim_cfg = parse(OptimOptions, "optim", optim)
        ema_cfg = parse(EMAOptions, "ema", ema)
        self.conditioning = parse(ConditioningOptions, "conditioning", conditioning)
        self.init_cfg = parse(InitOptions, "init", init)
        self.adapters = dict(adapters or {})
        for name, adapter in self.adapters.items():
            if not isinstance(adapter, Adapter):
                raise TypeError(f"stage.adapters.{name} must be a vgen.models.adapters.Adapter (e.g. "
                                f"_target_: vgen.models.lora.LoRA), got {type(adapter).__name__}")
        self.prepare_unet(unet)  # weights, adapters and what trains: before the EMA and the optimizer see it
        self.unet = unet
        self.diffusion = diffusion
        self.vae = _frozen(vae)
        self.text_encoder = _frozen(text_encoder)
        self.image_encoder = _frozen(image_encoder)
        self.ema = EMA(unet, ema_cfg.decay, ema_cfg.start_step) if ema_cfg.enabled else None
        needing = [n for n, c in unet.conditions.items() if c.needs_image_encoder and c.required]
        if needing and image_encoder is None:
            raise ValueError(f"model.unet's condition(s) {needing} read image-encoder embeddings but "
                             "model.image_encoder is null")
        self._check_widths(unet, vae, text_encoder, image_encoder)
        if gradient_checkpointing:
            unet.set_gradient_checkpointing(True)
        scale = self.conditioning.spatial_grad_scale
        self._spatial = set(unet.spatial_parameter_names()) if scale != 1.0 else set()
        self._grad_scale_hooks: list = []
        self.compile = compile
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(f"stage.max_nonfinite_steps must be an integer >= 1, got {max_nonfinite_steps!r}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0  # skipped steps so far (saved in checkpoints)
        self._nonfinite_in_a_row = 0
        self._skip_step = False  # set by a non-finite loss, cleared after the optimizer step
        self._rng_to_restore: dict | None = None
        self.run_config: dict | None = None  # resolved Hydra config, stored in checkpoints for vgen.sample

    @property
    def negative_prompt(self) -> str:
        return self.conditioning.negative_prompt

    @property
    def image_conditioned(self) -> bool:
        """Whether the UNet needs reference frames (a first-frame image) for every forward (image-to-video)."""
        return any(c.uses_reference and c.required for c in self.unet.conditions.values())

    # ------------------------------------------------------------------ initial weights, adapters, what trains
    def prepare_unet(self, unet: nn.Module) -> None:
        """``init`` weights, then the adapters (a file that already holds adapter weights loads after them), then
        :meth:`configure_trainable`."""
        from vgen.checkpoint.original import init_unet

        path, adapters = self.init_cfg.path, list(self.adapters.values())
        with_adapters = path is not None and file_has_adapter_keys(path, adapters)
        if path is not None and not with_adapters:
            init_unet(unet, path, self.init_cfg.format, self.init_cfg.allow_missing)
        for name, adapter in self.adapters.items():
            try:
                modules = adapter.apply(unet)
            except ValueError as err:
                raise ValueError(f"stage.adapters.{name}: {err}") from None
            log.info("adapter %s (%s) on %d modules", name, type(adapter).__name__, len(modules))
        if with_adapters:
            init_unet(unet, path, self.init_cfg.format)
        if self.adapters and path is None:
            rank_zero_warn("stage.init.path is null: the adapters train on a randomly initialised base UNet (only "
                           "meaningful for smoke tests); checkpoints then hold the whole UNet")
        self.configure_trainable(unet)

    def configure_trainable(self, unet: nn.Module) -> None:
        """The one "what trains" hook (before EMA and optimizer): the adapters alone when there are any, else
        every parameter. Subclasses freeze or bypass parts (image pretraining, HQ fine-tuning)."""
        if self.adapters:
            count = mark_only_adapters_trainable(unet, self.adapters)
            log.info("adapters: %d trainable of %d parameters", count, sum(p.numel() for p in unet.parameters()))

    @property
    def saves_adapters_only(self) -> bool:
        """Adapter-only checkpoints need base weights they can name (``stage.init.path``)."""
        return bool(self.adapters) and self.init_cfg.path is not None

    @staticmethod
    def _check_widths(unet, vae, text_encoder, image_encoder) -> None:
        cfg = unet.config
        pairs = [("model.unet.context_dim", cfg.context_dim, "model.text_encoder", getattr(text_encoder, "dim", None)),
                 ("model.unet.in_channels", cfg.in_channels, "model.vae latent channels",
                  getattr(vae, "latent_channels", None))]
        if image_encoder is not None and any(c.needs_image_encoder for c in unet.conditions.values()):
            pairs.append(("model.unet.image_dim", cfg.image_dim, "model.image_encoder",
                          getattr(image_encoder, "dim", None)))
        for key, want, other, have in pairs:
            if have is not None and want != have:
                raise ValueError(f"{key}={want} does not match {other} ({have})")

    # ------------------------------------------------------------------ persistence: only what is trained
    def _saved_names(self) -> set[str] | None:
        return set(adapter_parameter_names(self.unet, self.adapters)) if self.saves_adapters_only else None

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Checkpoints hold the UNet only (its adapters only, with named base weights); frozen encoders are rebuilt
        from their own weights files."""
        names = self._saved_names()
        return {f"unet.{k}": v for k, v in self.unet.state_dict(keep_vars=keep_vars).items()
                if names is None or k in names}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        foreign = [k for k in state_dict if not k.startswith("unet.")]
        if foreign:
            raise KeyError(f"checkpoint has keys outside the trained UNet: {foreign[:10]}")
        weights = {k[len("unet."):]: v for k, v in state_dict.items()}
        names = self._saved_names()
        if names is not None:
            missing, unexpected = sorted(names - set(weights)), sorted(set(weights) - names)
            if missing or unexpected:
                raise KeyError(f"checkpoint does not hold this run's adapters: missing {[f'unet.{k}' for k in missing[:5]]} "
                               f"({len(missing)}), unexpected {[f'unet.{k}' for k in unexpected[:5]]} ({len(unexpected)})")
            weights = {**self.unet.state_dict(), **weights}
        return self.unet.load_state_dict(weights, strict=True, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the EMA (in the model's sharding), every rank's RNG state, and the non-finite step count.

        Runs on every rank (it gathers the RNG states), before the strategy writes the checkpoint.
        """
        if self.ema is not None:
            self.ema.follow(self.unet)
            checkpoint["ema"] = self.ema.state_dict()
        if self.run_config is not None:
            checkpoint["vgen_config"] = self.run_config
        if self.adapters:
            checkpoint["adapters"] = {name: {"class": f"{type(a).__module__}.{type(a).__qualname__}",
                                             "config": a.config()} for name, a in self.adapters.items()}
            checkpoint["base_weights"] = ({"path": self.init_cfg.path, "format": self.init_cfg.format}
                                          if self.saves_adapters_only else None)
        checkpoint["rng"] = self._gather_rng()
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise KeyError("checkpoint has no EMA state but ema.enabled is true")
            self.ema.follow(self.unet)
            self.ema.load_state_dict(checkpoint["ema"])
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        self._rng_to_restore = checkpoint.get("rng")

    def _gather_rng(self) -> dict[str, torch.Tensor]:
        state = rng.capture()
        if self._trainer is None or self.trainer.world_size == 1:
            return {k: v[None] for k, v in state.items()}
        device = self.trainer.strategy.root_device
        gathered = {k: self.trainer.strategy.all_gather(v.to(device)) for k, v in state.items()}
        return {k: v.cpu() for k, v in gathered.items()}

    def _restore_rng(self) -> None:
        """Put back this rank's RNG state from the checkpoint, right before the first step after a resume."""
        saved, self._rng_to_restore = self._rng_to_restore, None
        world, rank = self.trainer.world_size, self.trainer.global_rank
        saved_world = int(saved["torch"].shape[0])
        if saved_world != world:
            log.warning("checkpoint holds RNG states of %d ranks but this run has %d: random streams are not "
                        "restored, so the resumed run is not bit-exact", saved_world, world)
            return
        rng.restore(rng.select_rank(saved, rank))

    # ------------------------------------------------------------------ parallelism (applied from outside the UNet)
    def configure_model(self) -> None:
        """FSDP2 sharding under ``ModelParallelStrategy``, ``torch.compile`` when asked; idempotent."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None:
            return
        strategy = self.trainer.strategy
        if self.compile:
            compile_blocks(self.unet)
        if isinstance(strategy, ModelParallelStrategy) and not is_sharded(self.unet):
            shard_unet(self.unet, self.device_mesh["data_parallel"], precision=str(self.trainer.precision),
                       reshard_after_forward=getattr(strategy, "reshard_after_forward", True))

    def on_fit_start(self) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        # DeepSpeed takes gradients out of ``p.grad`` during backward: scale them as they are produced instead
        if isinstance(self.trainer.strategy, DeepSpeedStrategy) and self._spatial and not self._grad_scale_hooks:
            scale = self.conditioning.spatial_grad_scale
            self._grad_scale_hooks = [p.register_hook(lambda g, s=scale: g * s)
                                      for n, p in self.unet.named_parameters() if n in self._spatial]

    # ------------------------------------------------------------------ conditions
    @torch.no_grad()
    def training_conditions(self, batch: dict, latents: torch.Tensor) -> dict[str, Any]:
        """UNet keyword inputs for a training batch: every condition's value, then classifier-free dropout."""
        values = self.condition_values(self.condition_inputs(batch, latents, latents.shape[2]))
        return self.drop_conditions(values)

    def drop_conditions(self, values: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Classifier-free dropout of ``values`` (the scheme of ``stage.conditioning``, each condition's own
        probability); unchanged for stages that do not train the unconditional branch."""
        if not self.uses_condition_dropout or not values:
            return dict(values)
        opts = self.conditioning
        batch_size = next(iter(values.values())).shape[0]
        masks = dropout_masks(self.unet.conditions, list(values), batch_size, self.device, scheme=opts.scheme,
                              p_joint_zero=opts.p_joint_zero, p_all_zero=opts.p_all_zero, p_all_keep=opts.p_all_keep)
        return apply_dropout(self.unet.conditions, values, masks, self)

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict) -> torch.Tensor:
        latents = self.batch_latents(batch)
        per_sample = self.diffusion.loss(self.unet, latents, self.training_conditions(batch, latents),
                                         **self._seeded_noise(batch, latents))
        return per_sample.mean()

    def _seeded_noise(self, batch: dict, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample timesteps and (offset) noise from ``batch["noise_seed"]``; empty without it."""
        if "noise_seed" not in batch:
            return {}
        steps, noises = [], []
        for i, seed in enumerate(batch["noise_seed"].tolist()):
            g = torch.Generator().manual_seed(int(seed))
            steps.append(sample_timesteps(1, self.diffusion.param.num_timesteps, generator=g,
                                          shift=self.diffusion.timestep_shift))
            noises.append(training_noise(latents[i:i + 1].detach().cpu().float(), self.diffusion.offset_noise_strength,
                                         generator=g, frame_correlation=self.diffusion.frame_noise_correlation))
        return {"t": torch.cat(steps).to(latents.device),
                "noise": torch.cat(noises).to(device=latents.device, dtype=latents.dtype)}

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            self._restore_rng()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        if not self._finite_on_all_ranks(loss):
            self._skip_nonfinite(loss)
            return loss  # backward() and the optimizer update are skipped (on every rank)
        self._nonfinite_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=self.batch_samples(batch).shape[0])
        return loss

    @property
    def step_skipped(self) -> bool:
        """True from a non-finite ``training_step`` until its (skipped) optimizer step is over."""
        return self._skip_step

    def _finite_on_all_ranks(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_nonfinite(self, loss: torch.Tensor) -> None:
        """Mark this optimizer step skipped on every rank (no backward, no update, no EMA), count it, and stop
        after ``max_nonfinite_steps`` in a row."""
        self._skip_step = True
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        step = self.global_step
        log.warning("non-finite loss (%s on this rank) at step %d: step skipped (%d in a row, %d in total)",
                    loss.item(), step, self._nonfinite_in_a_row, self.nonfinite_steps)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"non-finite loss at step {step}: {self._nonfinite_in_a_row} steps in a row "
                f"(stage.max_nonfinite_steps={self.max_nonfinite_steps}); lower optim.lr, set "
                "trainer.gradient_clip_val, or resume from an earlier checkpoint")

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if not self._skip_step:
            return super().backward(loss, *args, **kwargs)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        if scaler is not None:  # fp16: show the loss scaler an overflow, so it skips the update and backs off
            param = next(p for p in self.unet.parameters() if p.requires_grad)
            param.grad = torch.full_like(param, float("nan"))
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._skip_step:  # a micro-batch of this step was non-finite: the whole step is dropped
            for p in self.unet.parameters():
                p.grad = None
            return
        scale = self.conditioning.spatial_grad_scale
        if self._spatial and scale != 1.0 and not self._grad_scale_hooks:
            grads = [p.grad for n, p in self.unet.named_parameters() if n in self._spatial and p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        grads = [p.grad for p in self.unet.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            self.log("train/grad_norm", norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the EMA update (before any callback can checkpoint this step)."""
        engine = self._deepspeed_engine()
        steps_before = engine.global_steps if engine is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # runs training_step (the closure)
        stepped = engine is None or engine.global_steps != steps_before
        try:
            self.after_optimizer_step(stepped)
        finally:
            self._skip_step = False

    def after_optimizer_step(self, stepped: bool) -> None:
        """Updates that follow the weights: the EMA, when the optimizer ``stepped`` (DeepSpeed steps only at the end
        of gradient accumulation) and the step was not dropped (``self.step_skipped`` still tells, here)."""
        if self.ema is not None and stepped and not self.step_skipped:
            self.ema.update(self.unet, self.global_step)

    def _deepspeed_engine(self):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return None
        return self.trainer.strategy.deepspeed_engine

    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = [p for p in self.unet.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay,
                                    cfg.implementation)
        factor = warmup_decay_lambda(cfg.warmup_steps, cfg.total_steps, cfg.decay, cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
