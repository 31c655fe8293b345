"""Stage 2: joint image-video training (VGen / ModelScope T2V, I2VGen-XL, TF-T2V).

Images arrive in the same batch stream as 1-frame videos and go through the same UNet3D (temporal layers run on
F=1). The conditions are the UNet's own (``model.unet.conditions``: text, and for I2VGen-XL the first frame, CLIP
image tokens and fps; each with its classifier-free dropout; ``stage.conditioning.p_joint_zero`` drops text and
image together as I2VGen-XL's unconditional branch does). On top of the shared base this stage adds:

* **TF-T2V text-free videos** (``text_free.mode``): a text-free sample is trained with the null (empty-prompt)
  text and the CLIP embedding of one of its own frames through the image-token condition ``text_free.condition``
  (its ``frame`` setting picks the frame); captioned samples of the same batch get a zero image embedding,
  batches without a text-free sample get no image tokens (as text-only inference). ``empty_caption``: a sample is
  text-free when the loader flags it (``batch["text_free"]``) or its caption is empty; ``all_videos``: every clip
  with more than one frame is (captions discarded), images keep their captions -- TF-T2V's motion and content
  branches.
* **Temporal coherence loss** (TF-T2V, ``coherence_loss_weight``): the adjacent-frame differences of the
  prediction must match those of the target, ``L = L_diffusion + w * mean((d_out - d_target)^2)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vgen.diffusion import sample_timesteps, training_noise
from vgen.stages.base import DiffusionStage
from vgen.stages.options import TextFreeOptions, parse


def temporal_coherence_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``1/(F-1) sum_j mean(((o_{j+1} - o_j) - (t_{j+1} - t_j))^2)`` of [B, C, F, H, W]; zero for F=1."""
    if output.shape != target.shape or output.ndim != 5:
        raise ValueError(f"output and target must be equal [B, C, F, H, W], got {tuple(output.shape)} and "
                         f"{tuple(target.shape)}")
    if output.shape[2] < 2:
        return output.new_zeros(output.shape[0])
    error = output.diff(dim=2) - target.diff(dim=2)
    return error.pow(2).flatten(1).mean(dim=1)


class JointImageVideoStage(DiffusionStage):
    """Args (besides the base's): ``text_free: {mode, condition}`` and ``coherence_loss_weight``."""

    def __init__(self, unet: nn.Module, *args, text_free: Mapping | None = None, coherence_loss_weight: float = 0.0,
                 **kwargs):
        self.text_free_cfg = parse(TextFreeOptions, "text_free", text_free)
        if isinstance(coherence_loss_weight, bool) or not isinstance(coherence_loss_weight, (int, float)) \
                or coherence_loss_weight < 0:
            raise ValueError(f"stage.coherence_loss_weight must be a number >= 0, got {coherence_loss_weight!r}")
        super().__init__(unet, *args, **kwargs)
        self.coherence_loss_weight = float(coherence_loss_weight)
        if self.text_free:
            name = self.text_free_cfg.condition
            cond = unet.conditions[name] if name in unet.conditions else None  # noqa: SIM401 (a ModuleDict)
            if cond is None or not cond.needs_image_encoder or self.image_encoder is None:
                raise ValueError(f"stage.text_free.mode={self.text_free_cfg.mode} needs an image-token condition "
                                 f"model.unet.conditions.{name} (stage.text_free.condition) and a model.image_encoder")
        if self.image_encoder is not None and not self.text_free and not any(
                c.needs_image_encoder and c.from_batch for c in unet.conditions.values()):
            self.image_encoder = None  # never used: do not keep (or move to the device) a frozen CLIP tower

    @property
    def text_free(self) -> bool:
        return self.text_free_cfg.mode != "none"

    # ------------------------------------------------------------------ conditions
    def text_free_mask(self, batch: dict) -> torch.Tensor:
        """[B] bool: which samples are trained without text."""
        b, frames = self.batch_samples(batch).shape[0], self.batch_samples(batch).shape[2]
        mode = self.text_free_cfg.mode
        if mode == "none":
            return torch.zeros(b, dtype=torch.bool, device=self.device)
        if mode == "all_videos" and frames > 1:
            return torch.ones(b, dtype=torch.bool, device=self.device)
        flag = batch.get("text_free")
        if flag is not None:
            return torch.as_tensor(flag, dtype=torch.bool, device=self.device).reshape(b)
        return torch.tensor([not str(c).strip() for c in batch["caption"]], dtype=torch.bool, device=self.device)

    @torch.no_grad()
    def training_conditions(self, batch: dict, latents: torch.Tensor) -> dict:
        """The base's conditions and dropout; with text-free samples, their text is the null prompt and only they
        see the image embedding."""
        if not self.text_free:
            return super().training_conditions(batch, latents)
        free = self.text_free_mask(batch)
        inputs = self.condition_inputs(batch, latents, latents.shape[2])
        values = self.condition_values(inputs)
        image = self.text_free_cfg.condition
        if free.any():  # a batch without text-free samples is trained as text-only inference runs
            values[image] = self.unet.conditions[image].value(inputs, requested=True)
        out = self.drop_conditions(values)
        if free.any():
            rows = free.view(-1, 1, 1)
            out["text"] = torch.where(rows, self.null_embedding(free.shape[0]).to(out["text"].dtype), out["text"])
            out[image] = torch.where(rows, out[image], torch.zeros_like(out[image]))
        return out

    # ------------------------------------------------------------------ loss
    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        """Training timesteps [B] (uniform over the schedule, or shifted by ``diffusion.timestep_shift``; subclasses
        narrow the range)."""
        return sample_timesteps(batch_size, self.diffusion.param.num_timesteps, self.device,
                                shift=self.diffusion.timestep_shift)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        latents = self.batch_latents(batch)
        conditions = self.training_conditions(batch, latents)
        seeded = self._seeded_noise(batch, latents)  # per-sample seeds (empty without batch["noise_seed"])
        t = seeded["t"] if "t" in seeded else self.sample_timesteps(latents.shape[0])
        noise = seeded["noise"] if "noise" in seeded else training_noise(
            latents, self.diffusion.offset_noise_strength, frame_correlation=self.diffusion.frame_noise_correlation)
        outputs = []

        def denoiser(x_t, timesteps, **kwargs):
            outputs.append(self.unet(x_t, timesteps, **kwargs))
            return outputs[-1]

        loss = self.diffusion.loss(denoiser, latents, conditions, t=t, noise=noise).mean()
        if self.coherence_loss_weight and latents.shape[2] > 1:
            target = self.diffusion.param.target(latents, noise, t)
            coherence = temporal_coherence_loss(outputs[-1], target).mean()
            if self._trainer is not None:
                self.log("train/coherence_loss", coherence, batch_size=latents.shape[0])
            loss = loss + self.coherence_loss_weight * coherence
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.step_skipped:  # a non-finite loss: the base skips this step on every rank; nothing to log
            return loss
        samples = self.batch_samples(batch)
        kind = batch.get("kind", "video" if samples.shape[2] > 1 else "image")
        self.log(f"train/loss_{kind}", loss, batch_size=samples.shape[0])
        return loss
