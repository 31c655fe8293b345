"""Stage 2: joint image-video training (VGen / ModelScope T2V, I2VGen-XL, TF-T2V).

Images arrive in the same batch stream as 1-frame videos and go through the same UNet3D (temporal layers run on
F=1). On top of the shared base this stage adds:

* **I2VGen-XL conditions** (for a first-frame-conditioned UNet): the CLIP embedding of frame 0, frame 0's VAE
  latent (concat + local tokens) and the clip's fps. Classifier-free dropout: text -> negative prompt with
  ``p_zero``, image embedding -> zeros with ``p_image_zero``, and both at once with ``p_joint_zero`` (the
  released inference's unconditional branch: negative prompt + zero image embedding, first frame kept).
  Stills (F=1) get a zero first-frame latent and a zero image embedding: conditioned on itself an image would
  only teach copying, so images train the text path (as in VGen's T2V joint training).
* **TF-T2V text-free videos** (``text_free.mode``): a text-free sample is trained with the null (empty-prompt)
  text and the CLIP embedding of one of its own frames through the image tokens; captioned samples of the same
  batch get a zero image embedding, batches without a text-free sample get no image tokens (as text-only
  inference). ``empty_caption``: a sample is text-free when the loader flags it (``batch["text_free"]``) or its
  caption is empty; ``all_videos``: every clip with more than one frame is (captions discarded), images keep
  their captions -- TF-T2V's motion and content branches.
* **Temporal coherence loss** (TF-T2V, ``coherence_loss_weight``): the adjacent-frame differences of the
  prediction must match those of the target, ``L = L_diffusion + w * mean((d_out - d_target)^2)``.
* ``init``: initial UNet weights (a VGen release, SD-2.1 for spatial layers, a vgen checkpoint, diffusers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vgen.checkpoint.original import FORMATS, init_unet
from vgen.diffusion import sample_timesteps, training_noise
from vgen.stages.base import DiffusionStage

TEXT_FREE_MODES = ("none", "empty_caption", "all_videos")
IMAGE_FRAMES = ("first", "middle", "random")


def temporal_coherence_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``1/(F-1) sum_j mean(((o_{j+1} - o_j) - (t_{j+1} - t_j))^2)`` of [B, C, F, H, W]; zero for F=1."""
    if output.shape != target.shape or output.ndim != 5:
        raise ValueError(f"output and target must be equal [B, C, F, H, W], got {tuple(output.shape)} and "
                         f"{tuple(target.shape)}")
    if output.shape[2] < 2:
        return output.new_zeros(output.shape[0])
    error = output.diff(dim=2) - target.diff(dim=2)
    return error.pow(2).flatten(1).mean(dim=1)


def _options(name: str, given: Mapping | None, defaults: dict) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) stage.{name}.{unknown[0]}; valid keys: {sorted(defaults)}")
    return {**defaults, **given}


class JointImageVideoStage(DiffusionStage):
    """Args (besides the base's): ``init: {path, format}``, ``text_free: {mode, image_frame}``,
    ``coherence_loss_weight``, and ``conditioning.p_joint_zero``."""

    def __init__(self, unet: nn.Module, *args, init: Mapping | None = None, text_free: Mapping | None = None,
                 coherence_loss_weight: float = 0.0, **kwargs):
        init_cfg = _options("init", init, {"path": None, "format": "auto"})
        if init_cfg["format"] not in FORMATS:
            raise ValueError(f"stage.init.format must be one of {list(FORMATS)}, got {init_cfg['format']!r}")
        self.text_free_cfg = _options("text_free", text_free, {"mode": "none", "image_frame": "middle"})
        if self.text_free_cfg["mode"] not in TEXT_FREE_MODES:
            raise ValueError(f"stage.text_free.mode must be one of {list(TEXT_FREE_MODES)}, "
                             f"got {self.text_free_cfg['mode']!r}")
        if self.text_free_cfg["image_frame"] not in IMAGE_FRAMES:
            raise ValueError(f"stage.text_free.image_frame must be one of {list(IMAGE_FRAMES)}, "
                             f"got {self.text_free_cfg['image_frame']!r}")
        if not isinstance(coherence_loss_weight, (int, float)) or coherence_loss_weight < 0:
            raise ValueError(f"stage.coherence_loss_weight must be a number >= 0, got {coherence_loss_weight!r}")
        if init_cfg["path"] is not None:
            init_unet(unet, init_cfg["path"], init_cfg["format"])
        self.prepare_unet(unet)  # freezing must precede the base's EMA and optimizer set-up
        super().__init__(unet, *args, **kwargs)
        self.coherence_loss_weight = float(coherence_loss_weight)
        p_joint = self.conditioning.setdefault("p_joint_zero", 0.0)
        if not 0.0 <= p_joint <= 1.0:
            raise ValueError(f"stage.conditioning.p_joint_zero must be in [0, 1], got {p_joint}")
        if self.text_free and not (getattr(unet.config, "image_tokens", 0) and self.image_encoder is not None):
            raise ValueError(f"stage.text_free.mode={self.text_free_cfg['mode']} needs image tokens "
                             "(model.unet.image_tokens > 0) and a model.image_encoder")
        if self.image_encoder is not None and not (self.image_conditioned or self.text_free):
            self.image_encoder = None  # never used: do not keep (or move to the device) a frozen CLIP tower
        self._null: torch.Tensor | None = None

    def prepare_unet(self, unet: nn.Module) -> None:
        """Hook for subclasses: freeze or switch parts of the UNet before the base builds EMA and optimizer."""

    @property
    def text_free(self) -> bool:
        return self.text_free_cfg["mode"] != "none"

    # ------------------------------------------------------------------ conditions
    @torch.no_grad()
    def null_embedding(self, batch_size: int) -> torch.Tensor:
        """The empty-prompt embedding (VGen's ``zero_y``): the text of text-free samples."""
        if self._null is None or self._null.device != self.device:
            self._null = self.encode_text([""])
        return self._null.expand(batch_size, -1, -1)

    def text_free_mask(self, batch: dict) -> torch.Tensor:
        """[B] bool: which samples are trained without text."""
        b, frames = self.batch_samples(batch).shape[0], self.batch_samples(batch).shape[2]
        mode = self.text_free_cfg["mode"]
        if mode == "none":
            return torch.zeros(b, dtype=torch.bool, device=self.device)
        if mode == "all_videos" and frames > 1:
            return torch.ones(b, dtype=torch.bool, device=self.device)
        flag = batch.get("text_free")
        if flag is not None:
            return torch.as_tensor(flag, dtype=torch.bool, device=self.device).reshape(b)
        return torch.tensor([not str(c).strip() for c in batch["caption"]], dtype=torch.bool, device=self.device)

    def _text_free_image(self, batch: dict) -> torch.Tensor:
        """Image-encoder embedding [B, 1, D] of the ``text_free.image_frame`` frame of each clip."""
        if "video" in batch:
            return self.image_encoder(self._clip_frame(batch["video"]))
        if self.text_free_cfg["image_frame"] != "first":
            raise ValueError(f"stage.text_free.image_frame={self.text_free_cfg['image_frame']} needs pixels, but latent "
                             "batches store only the first frame's image embedding: set it to first")
        return self.batch_first_frame_embedding(batch)

    def _clip_frame(self, video: torch.Tensor) -> torch.Tensor:
        frames = video.shape[2]
        choice = self.text_free_cfg["image_frame"]
        index = {"first": 0, "middle": frames // 2}.get(choice)
        if index is None:
            index = int(torch.randint(frames, (1,)).item())
        return video[:, :, index]

    def _coin(self, batch_size: int, p: float) -> torch.Tensor:
        """[B] bool, each True with probability ``p`` (no random draw when ``p`` is 0)."""
        if p <= 0:
            return torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        return torch.rand(batch_size, device=self.device) < p

    @torch.no_grad()
    def training_conditions(self, batch: dict, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """UNet keyword inputs for a training batch, with classifier-free-guidance dropout applied."""
        cond = self.conditioning
        b = latents.shape[0]
        text = self.batch_text(batch)
        negative = self.negative_embedding(b)
        text_free = self.text_free_mask(batch)
        if text_free.any():
            text = torch.where(text_free.view(-1, 1, 1), self.null_embedding(b).to(text.dtype), text)
        joint = self._coin(b, cond["p_joint_zero"])
        drop_text = self._coin(b, cond["p_zero"]) | joint
        out = {"text": torch.where((drop_text & ~text_free).view(-1, 1, 1), negative.to(text.dtype), text)}
        image = None
        if self.image_conditioned and latents.shape[2] == 1:
            # an image cannot be its own first frame (that is a copy task): stills train the text path only
            out["image"] = torch.zeros(b, 1, self.image_encoder.dim, device=self.device)
            out["first_frame"] = torch.zeros_like(latents)
            out["fps"] = batch["fps"].to(self.device)
        elif self.image_conditioned:
            image = self.batch_first_frame_embedding(batch)
            out["first_frame"] = latents[:, :, :1]
            out["fps"] = batch["fps"].to(self.device)
        elif text_free.any():
            image = self._text_free_image(batch)
            image = torch.where(text_free.view(-1, 1, 1), image, torch.zeros_like(image))
        if image is not None:
            drop_image = self._coin(b, cond["p_image_zero"]) | joint
            out["image"] = torch.where(drop_image.view(-1, 1, 1), torch.zeros_like(image), image)
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
        seeded = self._seeded_noise(batch, latents) if hasattr(self, "_seeded_noise") else {}  # per-sample seeds
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
