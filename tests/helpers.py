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


def run_training(overrides: list[str], output_dir: Path, config_dir: Path | None = None, edit=None):
    """Compose ``conf/train.yaml`` with ``overrides`` and train in this process, as ``python -m vgen.train`` does
    (the run directory is ``output_dir``; ``edit(cfg)`` may change the composed config first); returns the
    Trainer."""
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
        if edit is not None:
            edit(cfg)
    return train(cfg)


def write_demo_shards(out: Path, videos: int = 16, images: int = 8) -> Path:
    """Small synthetic demo shards (8 samples each: ``videos-00000{0,1}.tar``, ``images-000000.tar`` by default) in
    ``out``; returns ``out``."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "data_pipelines" / "synthetic.py"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--videos", str(videos), "--images", str(images),
                    "--shard-size", "8", "--size", "16"], check=True, capture_output=True)
    return out


def demo_shard_overrides(shards: Path) -> list[str]:
    """``data.sources`` of ``conf/data/demo.yaml`` pointed at :func:`write_demo_shards` output."""
    return [f"data.sources.0.urls='{shards}/videos-{{000000..000001}}.tar'",
            f"data.sources.1.urls='{shards}/images-000000.tar'"]


def evaluation_overrides(shards: Path, *, every: int = 1, metrics: str = "[direction,shape_found,color]"
                         ) -> list[str]:
    """The in-training evaluation at tiny size: 3 held-out clips at 2 timesteps, 2 prompts sampled in 2 steps."""
    return ["callbacks.evaluation.enabled=true", f"callbacks.evaluation.every_n_steps={every}",
            f"callbacks.evaluation.shards=[{{urls: '{shards}/videos-000001.tar', type: video}}]",
            "callbacks.evaluation.samples_per_source=3", "callbacks.evaluation.batch_size=2",
            "callbacks.evaluation.timesteps=2", "callbacks.evaluation.steps=2",
            "callbacks.evaluation.prompts=[a red circle moving left,a blue square moving up]",
            f"callbacks.evaluation.metrics={metrics}"]


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows (``run.log`` calls) of the offline W&B run under ``run_dir`` (``<run_dir>/wandb/``), read
    from its ``.wandb`` file: ``{key: value}`` with media as nested keys (``eval/videos/_type``...).

    The file is W&B's LevelDB-style log (the ``:W&B`` header, 32 KiB blocks of records ``<crc32, length, type>``
    carrying ``wandb_internal_pb2.Record`` protobufs); offline runs write no ``wandb-summary.json``.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run in {run_dir}/wandb, found {files}"
    data = files[0].read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{files[0]} is not a W&B run file"
    block, header, pos, pending, rows = 32768, 7, 7, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header]) if left >= header else (0, 0, 0)
        if kind == 0 and length == 0:  # the rest of the block is padding
            pos += left
            continue
        pending += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
