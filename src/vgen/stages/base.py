"""What every VGen training stage shares: frozen encoders, latent encoding, conditioning with classifier-free
dropout, the diffusion loss, EMA (sharded like the model), the optimizer/LR schedule, SD-2.1 spatial gradient
scaling, the non-finite-loss guard, per-rank RNG state in checkpoints, parallelism hooks (FSDP2 sharding,
``torch.compile``), logging, and sampling. Stages subclass :class:`DiffusionStage` and override only what their
algorithm changes."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

from vgen.diffusion import Diffusion
from vgen.diffusion.loss import sample_timesteps, training_noise
from vgen.training import rng
from vgen.training.ema import EMA
from vgen.training.optim import build_optimizer, warmup_decay_lambda
from vgen.training.parallelize import compile_blocks, is_sharded, shard_unet

log = logging.getLogger(__name__)

NEGATIVE_PROMPT = ("Distorted, discontinuous, Ugly, blurry, low resolution, motionless, static, disfigured, "
                   "disconnected limbs, Ugly faces, incomplete arms")


def _frozen(module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        module.requires_grad_(False).eval()
    return module


class DiffusionStage(L.LightningModule):
    """Base LightningModule: trains ``unet`` as the denoiser of ``diffusion`` on VAE latents.

    Args:
        unet: the trainable network (``vgen.models.UNet3D``).
        diffusion: schedule + parameterisation + loss/sampler defaults (``vgen.diffusion.Diffusion``).
        vae, text_encoder, image_encoder: frozen encoders (image encoder only for image-conditioned models).
        optim: ``lr, betas, eps, weight_decay, warmup_steps, decay, min_lr_ratio, total_steps``.
        ema: ``enabled, decay, start_step``.
        conditioning: ``negative_prompt, p_zero`` (text -> negative prompt), ``p_image_zero`` (CLIP image ->
            zeros), ``spatial_grad_scale`` (gradient scale on the SD-2.1 spatial parameters).
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

    def __init__(
        self,
        unet: nn.Module,
        diffusion: Diffusion,
        vae: nn.Module,
        text_encoder: nn.Module,
        image_encoder: nn.Module | None = None,
        optim: dict | None = None,
        ema: dict | None = None,
        conditioning: dict | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        max_nonfinite_steps: int = 3,
    ):
        super().__init__()
        self.unet = unet
        self.diffusion = diffusion
        self.vae = _frozen(vae)
        self.text_encoder = _frozen(text_encoder)
        self.image_encoder = _frozen(image_encoder)
        self.optim_cfg = {"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 10,
                          "decay": "constant", "min_lr_ratio": 0.0, "total_steps": 1_000_000, **(optim or {})}
        ema_cfg = {"enabled": True, "decay": 0.9999, "start_step": 0, **(ema or {})}
        self.ema = EMA(unet, ema_cfg["decay"], ema_cfg["start_step"]) if ema_cfg["enabled"] else None
        cond = {"negative_prompt": NEGATIVE_PROMPT, "p_zero": 0.1, "p_image_zero": 0.0, "spatial_grad_scale": 1.0,
                **(conditioning or {})}
        for key in ("p_zero", "p_image_zero"):
            if not 0.0 <= cond[key] <= 1.0:
                raise ValueError(f"stage.conditioning.{key} must be in [0, 1], got {cond[key]}")
        self.conditioning = cond
        self.image_conditioned = bool(getattr(unet.config, "first_frame_condition", False))
        if self.image_conditioned and image_encoder is None:
            raise ValueError("model.unet is image-conditioned (first_frame_condition) but model.image_encoder is null")
        self._check_widths(unet, vae, text_encoder, image_encoder)
        if gradient_checkpointing:
            unet.set_gradient_checkpointing(True)
        self._spatial = set(unet.spatial_parameter_names()) if cond["spatial_grad_scale"] != 1.0 else set()
        self._grad_scale_hooks: list = []
        self._negative: torch.Tensor | None = None
        self.compile = compile
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(f"stage.max_nonfinite_steps must be an integer >= 1, got {max_nonfinite_steps!r}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0  # skipped steps so far (saved in checkpoints)
        self._nonfinite_in_a_row = 0
        self._skip_step = False  # set by a non-finite loss, cleared after the optimizer step
        self._rng_to_restore: dict | None = None
        self.run_config: dict | None = None  # resolved Hydra config, stored in checkpoints for vgen.sample

    @staticmethod
    def _check_widths(unet, vae, text_encoder, image_encoder) -> None:
        cfg = unet.config
        pairs = [("model.unet.context_dim", cfg.context_dim, "model.text_encoder", getattr(text_encoder, "dim", None)),
                 ("model.unet.in_channels", cfg.in_channels, "model.vae latent channels",
                  getattr(vae, "latent_channels", None))]
        if cfg.image_tokens:
            pairs.append(("model.unet.image_dim", cfg.image_dim, "model.image_encoder",
                          getattr(image_encoder, "dim", None)))
        for key, want, other, have in pairs:
            if have is not None and want != have:
                raise ValueError(f"{key}={want} does not match {other} ({have})")

    # ------------------------------------------------------------------ persistence: only what is trained
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Checkpoints hold the UNet only; frozen encoders are rebuilt from their own weights files."""
        return {f"unet.{k}": v for k, v in self.unet.state_dict(keep_vars=keep_vars).items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        foreign = [k for k in state_dict if not k.startswith("unet.")]
        if foreign:
            raise KeyError(f"checkpoint has keys outside the trained UNet: {foreign[:10]}")
        return self.unet.load_state_dict({k[len("unet."):]: v for k, v in state_dict.items()}, strict=True,
                                         assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the EMA (in the model's sharding), every rank's RNG state, and the non-finite step count.

        Runs on every rank (it gathers the RNG states), before the strategy writes the checkpoint.
        """
        if self.ema is not None:
            self.ema.follow(self.unet)
            checkpoint["ema"] = self.ema.state_dict()
        if self.run_config is not None:
            checkpoint["vgen_config"] = self.run_config
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
            scale = self.conditioning["spatial_grad_scale"]
            self._grad_scale_hooks = [p.register_hook(lambda g, s=scale: g * s)
                                      for n, p in self.unet.named_parameters() if n in self._spatial]

    # ------------------------------------------------------------------ encoders and conditions
    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder(list(captions))

    @staticmethod
    def batch_samples(batch: dict) -> torch.Tensor:
        """The batch's clips: ``latent`` [B, C, F, h, w] for latent-cache batches, else ``video`` [B, 3, F, H, W]."""
        return batch["latent"] if "latent" in batch else batch["video"]

    @torch.no_grad()
    def batch_latents(self, batch: dict) -> torch.Tensor:
        """Training latents: the cached ``latent`` when the batch has it (no VAE call), else the VAE's."""
        if "latent" not in batch:
            return self.encode_video(batch["video"])
        latents = batch["latent"]
        channels = getattr(self.vae, "latent_channels", None)
        if latents.ndim != 5 or (channels is not None and latents.shape[1] != channels):
            raise ValueError(f"batch latent {tuple(latents.shape)} is not [B, {channels}, F, h, w] (model.vae's "
                             "latent channels): encode the shards with this run's VAE (data_pipelines/encode.py --vae)")
        return latents

    @torch.no_grad()
    def batch_text(self, batch: dict) -> torch.Tensor:
        """Caption embeddings [B, L, D]: the cached ``text_embedding`` when the batch has it, else the encoder's."""
        if "text_embedding" not in batch:
            return self.encode_text(batch["caption"])
        text = batch["text_embedding"]
        expected = self.negative_embedding(1).shape[1:]
        if text.shape[1:] != expected:
            raise ValueError(f"batch text_embedding {tuple(text.shape)} does not match model.text_encoder's "
                             f"[B, {expected[0]}, {expected[1]}]: encode the shards with this run's text encoder "
                             "(data_pipelines/encode.py --text-encoder)")
        return text

    @torch.no_grad()
    def batch_first_frame_embedding(self, batch: dict) -> torch.Tensor:
        """Image-encoder embedding [B, 1, D] of each clip's first frame (cached ``image_embedding`` if present)."""
        if "video" in batch:
            return self.image_encoder(batch["video"][:, :, 0])
        if "image_embedding" not in batch:
            raise ValueError("this model needs the first frame's image embedding, but the latent batch has no "
                             "image_embedding: encode the shards with data_pipelines/encode.py --image-encoder")
        image = batch["image_embedding"]
        return image[:, None] if image.ndim == 2 else image

    @torch.no_grad()
    def negative_embedding(self, batch_size: int) -> torch.Tensor:
        if self._negative is None or self._negative.device != self.device:
            self._negative = self.encode_text([self.conditioning["negative_prompt"]])
        return self._negative.expand(batch_size, -1, -1)

    def _drop(self, values: torch.Tensor, replacement: torch.Tensor, p: float) -> torch.Tensor:
        if p <= 0:
            return values
        drop = torch.rand(values.shape[0], device=values.device) < p
        return torch.where(drop.view(-1, *[1] * (values.ndim - 1)), replacement.to(values.dtype), values)

    @torch.no_grad()
    def training_conditions(self, batch: dict, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """UNet keyword inputs for a training batch, with classifier-free-guidance dropout applied."""
        text = self.batch_text(batch)
        cond = {"text": self._drop(text, self.negative_embedding(text.shape[0]), self.conditioning["p_zero"])}
        if self.image_conditioned:
            image = self.batch_first_frame_embedding(batch)
            cond["image"] = self._drop(image, torch.zeros_like(image), self.conditioning["p_image_zero"])
            cond["first_frame"] = latents[:, :, :1]
            cond["fps"] = batch["fps"].to(self.device)
        return cond

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
        scale = self.conditioning["spatial_grad_scale"]
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
        optimizer = build_optimizer(params, cfg["lr"], cfg["betas"], cfg["eps"], cfg["weight_decay"])
        factor = warmup_decay_lambda(cfg["warmup_steps"], cfg["total_steps"], cfg["decay"], cfg["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        num_frames: int,
        height: int,
        width: int,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        negative_prompt: str | None = None,
        images: torch.Tensor | None = None,
        fps: int = 8,
    ) -> torch.Tensor:
        """DDIM with classifier-free guidance against the negative prompt -> videos [B, 3, F, H, W] in [-1, 1].

        ``images`` ([B, 3, H, W] in [-1, 1]) are required for image-conditioned models (the first frame).
        """
        b = len(prompts)
        ds = getattr(self.vae, "downsample", 1)
        if height % ds or width % ds:
            raise ValueError(f"height/width must be multiples of the VAE downsampling factor {ds}")
        text = self.encode_text(prompts)
        if negative_prompt is None:
            negative = self.negative_embedding(b)
        else:
            negative = self.encode_text([negative_prompt]).expand(b, -1, -1)
        cond, uncond = {"text": text}, {"text": negative}
        if self.image_conditioned:
            if images is None or images.shape[0] != b:
                raise ValueError(f"this model is image-to-video: pass one first-frame image per prompt ({b})")
            images = images.to(self.device, torch.float32)
            if images.shape[-2:] != (height, width):
                images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear",
                                                         antialias=True, align_corners=False)
            first = self.vae.encode(images[:, :, None])
            clip = self.image_encoder(images)
            fps_t = torch.full((b,), fps, device=self.device, dtype=torch.long)
            cond.update(image=clip, first_frame=first, fps=fps_t)
            uncond.update(image=torch.zeros_like(clip), first_frame=first, fps=fps_t)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        shape = (b, self.vae.latent_channels, num_frames, height // ds, width // ds)
        noise = self.diffusion.noise(shape, generator=generator, device=self.device)
        was_training = self.unet.training
        self.unet.eval()
        try:
            latents = self.diffusion.sample(self.unet, noise, cond=cond, uncond=uncond,
                                            guidance_scale=self.diffusion.guidance_scale if guidance is None else guidance,
                                            steps=steps or self.diffusion.ddim_steps)
        finally:
            self.unet.train(was_training)
        return self.vae.decode(latents).clamp(-1, 1)
