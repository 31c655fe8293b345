"""Stage 1: image pretraining of the video UNet (ModelScope T2V / I2VGen-XL recipes).

Image-text pairs are 1-frame videos through the same UNet3D, with the stage-2 objective and text conditioning
(an I2VGen-XL UNet gets zero first-frame and image conditions here, as stills do in stage 2: an image cannot be
its own condition). Clips that reach this stage contribute one random frame each.
The spatial layers usually start from Stable Diffusion 2.1 (``init: {path: v2-1_512-ema-pruned.ckpt, format:
sd21}``); the temporal layers, which an image cannot teach, are

* ``bypass``: skipped (identity) and frozen -- the network is exactly the SD-2.1 UNet on images;
* ``freeze``: run but not trained (they start as identities: their output projections are zero-initialised);
* ``train``: trained like everything else.
"""

from __future__ import annotations

import torch
from torch import nn

from vgen.stages.joint import JointImageVideoStage

TEMPORAL_MODES = ("bypass", "freeze", "train")


class ImagePretrainStage(JointImageVideoStage):
    def __init__(self, unet: nn.Module, *args, temporal: str = "bypass", **kwargs):
        if temporal not in TEMPORAL_MODES:
            raise ValueError(f"stage.temporal must be one of {list(TEMPORAL_MODES)}, got {temporal!r}")
        self.temporal = temporal
        super().__init__(unet, *args, **kwargs)

    def configure_trainable(self, unet: nn.Module) -> None:
        super().configure_trainable(unet)
        if self.temporal == "train":
            return
        temporal = set(unet.temporal_parameter_names())
        for name, param in unet.named_parameters():
            if name in temporal:
                param.requires_grad_(False)
        unet.set_temporal_bypass(self.temporal == "bypass")

    @staticmethod
    def single_frames(batch: dict) -> dict:
        """The batch with one uniformly drawn frame per clip ([B, C, 1, H, W]; of ``latent`` in latent-cache
        batches, whose VAE encodes frames independently); images pass unchanged."""
        name = "latent" if "latent" in batch else "video"
        video = batch[name]
        if video.shape[2] == 1:
            return batch
        index = torch.randint(video.shape[2], (video.shape[0],), device=video.device)
        frames = video[torch.arange(video.shape[0], device=video.device), :, index][:, :, None]
        return {**batch, name: frames, "kind": "image"}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return super().training_step(self.single_frames(batch), batch_idx)
