"""FSDP2 through Lightning's ``ModelParallelStrategy``, with vgen's checkpoint rules.

The stage shards the UNet block by block in ``configure_model`` (:func:`vgen.training.parallelize.shard_unet`).
Checkpoints are PyTorch distributed-checkpoint (DCP) directories: model, optimizer and EMA shards (the EMA is a
``DTensor`` dict laid out like the parameters), plus ``meta.pt`` with the loop state. On top of Lightning:

* atomic directories (written as ``<name>.tmp``, marked complete, renamed);
* the EMA goes into the sharded part (Lightning would pickle it whole into rank 0's metadata);
* DCP's ``.metadata`` index is read with a restricted unpickler (only DCP's own metadata classes), and
  ``meta.pt`` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemReader

from vgen.checkpoint.safe_load import load_weights_only
from vgen.training.checkpointing import commit_directory, staging_path

META = "meta.pt"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata index only: its dataclasses, torch sizes/dtypes/layouts, paths, plain containers."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
    ALLOWED = frozenset({("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
               ("builtins", "set"), ("builtins", "frozenset")})

    def find_class(self, module: str, name: str):
        if module in self.ALLOWED_MODULES or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint index")


class SafeFileSystemReader(FileSystemReader):
    """DCP reader whose metadata index cannot run code."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over every rank; ``reshard_after_forward=False`` is ZeRO-2-like."""

    def __init__(self, timeout_s: int = 1800, process_group_backend: str | None = None,
                 reshard_after_forward: bool = True):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, timeout=timedelta(seconds=timeout_s))
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # one FSDP group of all ranks
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        import torch.distributed.checkpoint as dcp

        if storage_options is not None:
            raise TypeError("FSDP2Strategy.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        staging = staging_path(path)
        if self.is_global_zero and staging.exists():
            shutil.rmtree(staging)
        self.barrier("vgen_fsdp_save_start")
        checkpoint = dict(checkpoint)
        sharded = {"state_dict": checkpoint.pop("state_dict")}
        sharded.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        ema = checkpoint.get("ema")
        if ema is not None and ema.get("layout") == "dtensor":
            sharded["ema"] = ema["shadow"]
            checkpoint["ema"] = {k: v for k, v in ema.items() if k != "shadow"}
        dcp.save(sharded, checkpoint_id=staging)
        if self.is_global_zero:
            torch.save(checkpoint, staging / META)
        self.barrier("vgen_fsdp_save_written")
        if self.is_global_zero:
            commit_directory(staging, path, {"format": "dcp", "world_size": self.world_size,
                                             "global_step": checkpoint.get("global_step")})
        self.barrier("vgen_fsdp_save_done")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / META).is_file():
            raise FileNotFoundError(f"{path} is not an FSDP2 (DCP) checkpoint directory: no {META}")
        module = self.model
        model_state = {"state_dict": get_model_state_dict(module)}
        dcp.load(model_state, storage_reader=SafeFileSystemReader(path))
        module.load_state_dict(model_state["state_dict"], strict=True)
        saved = set(SafeFileSystemReader(path).read_metadata().state_dict_metadata)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            # parameters that never had a gradient had no AdamW state when saved: load the others, leave them bare
            never_stepped = [fqn for fqn in optim_state[key]["state"]
                             if not any(k.startswith(f"{key}.state.{fqn}.") for k in saved)]
            dcp.load(optim_state, storage_reader=SafeFileSystemReader(path),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
            for fqn in never_stepped:
                del optim_state[key]["state"][fqn]
            # strict=False admits exactly those (listed above); every other entry was read from the checkpoint
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True, strict=not never_stepped))
        meta = load_weights_only(path / META)
        ema = meta.get("ema")
        stage_ema = getattr(self.lightning_module, "ema", None)
        if ema is not None and ema.get("layout") == "dtensor":
            if stage_ema is None:
                raise KeyError(f"{path} holds EMA shards but this run has stage.ema.enabled=false")
            stage_ema.follow(self.lightning_module.unet)
            dcp.load({"ema": stage_ema.shadow}, storage_reader=SafeFileSystemReader(path))
            meta["ema"] = {**ema, "shadow": stage_ema.shadow}
        return meta
