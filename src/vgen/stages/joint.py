"""Stage 2: joint image-video pretraining (the VGen / ModelScope T2V and I2VGen-XL recipe).

Images arrive in the same batch stream as 1-frame videos and go through the same UNet3D (temporal layers run on
F=1). What this stage adds to the shared base is the per-modality loss bookkeeping.
"""

from __future__ import annotations

import torch

from vgen.stages.base import DiffusionStage


class JointImageVideoStage(DiffusionStage):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        kind = batch.get("kind", "video" if batch["video"].shape[2] > 1 else "image")
        self.log(f"train/loss_{kind}", loss, batch_size=batch["video"].shape[0])
        return loss
