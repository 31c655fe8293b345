"""Stage 3: high-quality fine-tuning (I2VGen-XL / T2V recipes).

The stage-2 objective and conditions on curated high-quality data (higher resolution, longer clips: set in the
experiment's data config), optionally training only part of the UNet. Fine-tuning everything on a small HQ set
is reported to make motion collapse; ``trainable: temporal`` keeps the spatial (appearance) layers fixed.

``trainable``: ``all``, ``temporal`` (temporal convs and transformers), ``spatial`` (the SD-2.1-derived layers),
or a list of parameter-name prefixes (e.g. ``[input_blocks.0., out.]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from vgen.stages.joint import JointImageVideoStage

TRAINABLE = ("all", "temporal", "spatial")


def select_trainable(unet: nn.Module, trainable: str | Sequence[str]) -> list[str]:
    """Freeze every UNet parameter outside ``trainable``; returns the names left trainable."""
    names = [n for n, _ in unet.named_parameters()]
    if isinstance(trainable, str):
        if trainable not in TRAINABLE:
            raise ValueError(f"stage.trainable must be one of {list(TRAINABLE)} or a list of parameter-name "
                             f"prefixes, got {trainable!r}")
        keep = set(names) if trainable == "all" else set(
            unet.temporal_parameter_names() if trainable == "temporal" else unet.spatial_parameter_names())
    else:
        prefixes = tuple(str(p) for p in trainable)
        keep = {n for n in names if n.startswith(prefixes)}
        unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
        if unmatched:
            raise ValueError(f"stage.trainable prefix {unmatched[0]!r} matches no UNet parameter")
    if not keep:
        raise ValueError(f"stage.trainable={trainable!r} leaves no parameter to train")
    for name, param in unet.named_parameters():
        param.requires_grad_(name in keep)
    return [n for n in names if n in keep]


class HQFinetuneStage(JointImageVideoStage):
    def __init__(self, unet: nn.Module, *args, trainable: str | Sequence[str] = "all", **kwargs):
        self.trainable = trainable if isinstance(trainable, str) else list(trainable)
        super().__init__(unet, *args, **kwargs)

    def configure_trainable(self, unet: nn.Module) -> None:
        super().configure_trainable(unet)
        select_trainable(unet, self.trainable)
