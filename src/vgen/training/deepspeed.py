"""DeepSpeed ZeRO-2/3 through Lightning, with vgen's checkpoint rules.

:class:`VGenDeepSpeedStrategy` is Lightning's ``DeepSpeedStrategy`` plus:

* atomic checkpoint directories (written as ``<name>.tmp``, marked complete, renamed);
* the ZeRO-3 EMA shards: each rank writes its EMA partition to ``ema/rank-RRRRR-of-WWWWW.safetensors`` next
  to DeepSpeed's files (DeepSpeed itself keeps only rank 0's client state);
* loading through ``torch.load(weights_only=True)`` (DeepSpeed's own engine loads with ``weights_only=False``);
* a skipped step when the stage skips a non-finite loss (Lightning's DeepSpeed precision refuses that).

:class:`CPUDeepSpeedStrategy` adds the three overrides that let DeepSpeed run on CPU processes over gloo (tests
and ``benchmarks/memory.py``); on GPUs the ordinary Lightning path is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from safetensors.torch import load_file, save_file

from vgen.checkpoint.safe_load import load_weights_only as safe_load
from vgen.training.checkpointing import commit_directory, staging_path

EMA_DIR = "ema"


def deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into its checkpoint files, allowed for ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_weights_only(path, map_location="cpu") -> Any:
    """A DeepSpeed checkpoint file, weights only (:mod:`vgen.checkpoint.safe_load`), DeepSpeed's classes allowed."""
    return safe_load(path, map_location=map_location, allowed_globals=deepspeed_safe_globals())


def _weights_only_checkpoint_engine(engine) -> None:
    """Make DeepSpeed's engine read checkpoints with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            return load_weights_only(path, map_location=map_location)

    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:
        current.__class__ = WeightsOnlyCheckpointEngine


def ema_shard_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


class SkippableDeepSpeedPrecision(DeepSpeedPrecision):
    """Lightning's DeepSpeed precision, except that a step the stage marked skipped (a non-finite loss on some
    rank, ``stage._skip_step``) runs no backward and no update on any rank.

    With gradient accumulation the engine still counts the skipped micro-batch, so its accumulation boundary
    stays where Lightning expects it; the other micro-batches of that window are applied.
    """

    def backward(self, tensor, model, optimizer, *args, **kwargs) -> None:
        if not getattr(model, "_skip_step", False):
            model.trainer.model.backward(tensor, *args, **kwargs)

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        closure()
        self._after_closure(model, optimizer)
        engine = model.trainer.model
        if getattr(model, "_skip_step", False) and engine.gradient_accumulation_steps() == 1:
            return None
        return engine.step(**kwargs)


class VGenDeepSpeedStrategy(DeepSpeedStrategy):
    @property
    def precision_plugin(self):
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if type(plugin) is DeepSpeedPrecision:
            plugin = SkippableDeepSpeedPrecision(plugin.precision)
        self._precision_plugin = plugin

    def init_deepspeed(self) -> None:
        super().init_deepspeed()
        _weights_only_checkpoint_engine(self.deepspeed_engine)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        staging = staging_path(path)
        checkpoint = dict(checkpoint)
        ema_shards = None
        ema = checkpoint.get("ema")
        if ema is not None and ema.get("layout") == "zero3":
            ema_shards = ema["shadow"]
            checkpoint["ema"] = {k: v for k, v in ema.items() if k != "shadow"}
        if self.is_global_zero and staging.exists():
            import shutil

            shutil.rmtree(staging)
        self.barrier("vgen_deepspeed_save_start")
        super().save_checkpoint(checkpoint, staging, storage_options)
        if ema_shards is not None:
            directory = staging / EMA_DIR
            directory.mkdir(parents=True, exist_ok=True)
            shapes = {name: list(p.shape) for name, p in self._ema_params().items()}
            save_file({k: v.contiguous() for k, v in ema_shards.items()},
                      str(directory / ema_shard_name(self.global_rank, self.world_size)),
                      metadata={"layout": "zero3", "shapes": json.dumps(shapes)})
        self.barrier("vgen_deepspeed_save_written")
        if self.is_global_zero:
            commit_directory(staging, path, {"format": "deepspeed", "zero_stage": self.config["zero_optimization"][
                "stage"], "world_size": self.world_size, "global_step": checkpoint.get("global_step")})
        self.barrier("vgen_deepspeed_save_done")

    def _ema_params(self) -> dict[str, torch.Tensor]:
        """Full (unpartitioned) shapes of the EMA-tracked parameters, by name."""
        module = self.lightning_module
        shadow_names = set(module.ema.shadow)
        return {n: torch.empty(p.ds_shape if hasattr(p, "ds_shape") else p.shape, device="meta")
                for n, p in module.unet.named_parameters() if n in shadow_names}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        client_state = super().load_checkpoint(checkpoint_path, weights_only)
        ema = client_state.get("ema")
        if ema is not None and ema.get("layout") == "zero3":
            shard = Path(checkpoint_path) / EMA_DIR / ema_shard_name(self.global_rank, self.world_size)
            if not shard.is_file():
                raise FileNotFoundError(f"{checkpoint_path}: no EMA shard {shard.name} for rank {self.global_rank} "
                                        f"of {self.world_size} (ZeRO-3 checkpoints resume with the same world size)")
            client_state["ema"] = {**ema, "shadow": load_file(str(shard))}
        return client_state


class CPUDeepSpeedStrategy(VGenDeepSpeedStrategy):
    """DeepSpeed on CPU processes over gloo (Lightning's strategy insists on CUDA)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skip the CUDA-only guard

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed needs an integer device rank

    def setup_distributed(self) -> None:  # no device-index validation (CPU devices have no index)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
