"""What every VGen training stage shares: frozen encoders, latent encoding, conditioning with classifier-free
dropout, the diffusion loss, EMA, the optimizer/LR schedule, SD-2.1 spatial gradient scaling, logging, and
sampling. Stages subclass :class:`DiffusionStage` and override only what their algorithm changes."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

from vgen.diffusion import Diffusion
from vgen.training.ema import EMA
from vgen.training.optim import build_optimizer, warmup_decay_lambda

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
        self._negative: torch.Tensor | None = None
        self._last_ema_step = -1
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
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        if self.run_config is not None:
            checkpoint["vgen_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise KeyError("checkpoint has no EMA state but ema.enabled is true")
            self.ema.load_state_dict(checkpoint["ema"])

    # ------------------------------------------------------------------ encoders and conditions
    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder(list(captions))

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
        text = self.encode_text(batch["caption"])
        cond = {"text": self._drop(text, self.negative_embedding(text.shape[0]), self.conditioning["p_zero"])}
        if self.image_conditioned:
            image = self.image_encoder(batch["video"][:, :, 0])
            cond["image"] = self._drop(image, torch.zeros_like(image), self.conditioning["p_image_zero"])
            cond["first_frame"] = latents[:, :, :1]
            cond["fps"] = batch["fps"].to(self.device)
        return cond

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict) -> torch.Tensor:
        latents = self.encode_video(batch["video"])
        per_sample = self.diffusion.loss(self.unet, latents, self.training_conditions(batch, latents))
        return per_sample.mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["video"].shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        scale = self.conditioning["spatial_grad_scale"]
        if self._spatial and scale != 1.0:
            grads = [p.grad for n, p in self.unet.named_parameters() if n in self._spatial and p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        grads = [p.grad for p in self.unet.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None and self.global_step != self._last_ema_step:
            self._last_ema_step = self.global_step
            self.ema.update(self.unet, self.global_step)

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
        noise = torch.randn(shape, generator=generator, device=self.device)
        was_training = self.unet.training
        self.unet.eval()
        try:
            latents = self.diffusion.sample(self.unet, noise, cond=cond, uncond=uncond,
                                            guidance_scale=self.diffusion.guidance_scale if guidance is None else guidance,
                                            steps=steps or self.diffusion.ddim_steps)
        finally:
            self.unet.train(was_training)
        return self.vae.decode(latents).clamp(-1, 1)
