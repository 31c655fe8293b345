"""Helpers shared by several test files (not tests themselves)."""

from __future__ import annotations

import zlib
from pathlib import Path

import lightning as L
import torch


def original_parameter_names(unet: torch.nn.Module) -> dict[str, str]:
    """``{our parameter name: the original VGen key}`` (names without an original keep ours)."""
    from vgen.compat.vgen import original_key_map

    return original_key_map(unet)


@torch.no_grad()
def reinit_by_name(unet: torch.nn.Module) -> None:
    """Overwrite every parameter from a generator seeded by its original VGen key name.

    The values depend on the parameter's name and shape only, not on the order modules are built in, so two
    implementations of the same network get the same weights (1-D weights 1 + 0.1 N, 1-D biases 0.05 N, the rest
    N / sqrt(fan_in): no layer is zero, zero-initialised projections and LoRA included).
    """
    names = original_parameter_names(unet)
    for name, param in unet.named_parameters():
        # TF-T2V's image MLP is seeded by I2VGen-XL's name for it, as when the recorded losses were made
        key = names.get(name, name).replace("pre_image_condition.", "context_embedding.")
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        values = torch.randn(param.shape, generator=g, dtype=torch.float64)
        if param.ndim == 1:
            values = 1 + 0.1 * values if key.endswith("weight") else 0.05 * values
        else:
            values = values / param[0].numel() ** 0.5
        param.copy_(values.to(param.dtype))


class RecordLosses(L.Callback):
    """Re-initialises the UNet by name and re-seeds every generator at ``setup``, then records each step's loss.

    With it a training run's losses depend on the configuration, the data and the seed only (not on the order
    in which a stage happens to build its modules).
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.losses: list[float] = []

    def setup(self, trainer, pl_module, stage):
        reinit_by_name(pl_module.unet)
        L.seed_everything(self.seed, workers=True, verbose=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().double()))


def run_training(overrides: list[str], output_dir: Path, config_dir: Path | None = None):
    """Compose ``conf/train.yaml`` with ``overrides`` and train in this process, as ``python -m vgen.train`` does
    (the run directory is ``output_dir``); returns the Trainer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from vgen.train import train

    config_dir = config_dir or Path(__file__).resolve().parents[1] / "conf"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in @hydra.main, the task sees the config without the hydra node
    return train(cfg)
