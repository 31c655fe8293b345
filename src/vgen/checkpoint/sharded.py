"""Consolidate sharded training checkpoints (DeepSpeed ZeRO-2/3, FSDP2 DCP) into full UNet state dicts.

One process reads every rank's shard; the training world size is read from the files, never needed as an input.
Everything is loaded without running pickled code: DeepSpeed files through ``torch.load(weights_only=True)``
(with DeepSpeed's few checkpoint classes allowed), DCP through its tensor files and a restricted index reader,
the ZeRO-3 EMA shards from safetensors.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from vgen.checkpoint.safe_load import load_weights_only
from vgen.training.checkpointing import read_marker

PREFIX = "unet."


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)", path.name)
    return int(match.group(1)) if match else 0


def _strip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}


# ---------------------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_metadata(path: Path) -> dict:
    """Rank 0's model-states file: parameter shapes, buffers and Lightning's client state (step, config, EMA)."""
    from vgen.training.deepspeed import load_weights_only

    files = sorted((path / "checkpoint").glob("*model_states.pt"), key=_rank_of)
    if not files:
        raise FileNotFoundError(f"{path}: no DeepSpeed model states file under checkpoint/")
    return load_weights_only(files[0])


def deepspeed_model(path: Path, states: dict) -> dict[str, torch.Tensor]:
    """fp32 master weights from the ZeRO optimizer partitions of every rank."""
    from vgen.training.deepspeed import load_weights_only

    files = sorted((path / "checkpoint").glob("*optim_states.pt"), key=_rank_of)
    if not files:
        raise FileNotFoundError(f"{path}: no DeepSpeed optimizer states files under checkpoint/")
    optim = [load_weights_only(f)["optimizer_state_dict"] for f in files]
    stage = int(optim[0]["zero_stage"])
    world = optim[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(files):
        raise ValueError(f"{path}: written by {world} ranks but {len(files)} optimizer shard files are present")
    shapes = states["param_shapes"]
    weights: dict[str, torch.Tensor] = {}
    if stage <= 2:
        for group, group_shapes in enumerate(shapes):
            flat = torch.cat([o["single_partition_of_fp32_groups"][group] for o in optim])
            offset = 0
            for name, shape in group_shapes.items():
                numel = math.prod(shape)
                weights[name] = flat[offset:offset + numel].view(shape).clone()
                offset += numel
    else:
        flats = [torch.cat(list(o["fp32_flat_groups"])) for o in optim]
        offset = 0
        for name, shape in ((n, s) for group in shapes for n, s in group.items()):
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            full = torch.cat([flat[offset:offset + part] for flat in flats])[:numel]
            weights[name] = full.view(shape).clone()
            offset += part
    buffers = {k: v for k, v in (states.get("module") or {}).items() if k in set(states.get("buffer_names", []))}
    return {**weights, **buffers}


def deepspeed_ema(path: Path, states: dict) -> dict[str, torch.Tensor]:
    ema = states.get("ema")
    if ema is None:
        raise KeyError(f"{path} has no EMA weights (trained with stage.ema.enabled=false)")
    if ema.get("layout", "full") == "full":
        return dict(ema["shadow"])
    shards = sorted((path / "ema").glob("rank-*-of-*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: ZeRO-3 EMA shards (ema/rank-*.safetensors) are missing")
    world = int(shards[0].name.split("-of-")[1].split(".")[0])
    if len(shards) != world:
        raise ValueError(f"{path}: {len(shards)} EMA shard files for a world size of {world}")
    parts: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            shapes = json.loads(f.metadata()["shapes"])
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                parts.setdefault(key, []).append(f.get_tensor(key))
    return {k: torch.cat(parts[k])[:math.prod(shapes[k])].view(shapes[k]) for k in parts}


# ---------------------------------------------------------------------------------------------------- FSDP2 (DCP)
def dcp_weights(path: Path, ema: bool) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    from vgen.training.fsdp import SafeFileSystemReader

    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    section = "ema" if ema else "state_dict"
    wanted: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(section + ".") and hasattr(item, "size"):
            wanted[key[len(section) + 1:]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not wanted:
        raise KeyError(f"{path} has no {'EMA weights' if ema else 'model weights'}"
                       + (" (trained with stage.ema.enabled=false)" if ema else ""))
    dcp.load({section: wanted}, storage_reader=reader, no_dist=True)
    return wanted


def dcp_meta(path: Path) -> dict:
    return load_weights_only(path / "meta.pt")


# ---------------------------------------------------------------------------------------------------- entry point
def consolidate(path: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """UNet weights (keys without ``unet.``; the EMA with ``ema=True``) and the checkpoint's loop metadata."""
    path = Path(path)
    info = read_marker(path)
    if info["format"] == "deepspeed":
        states = deepspeed_metadata(path)
        weights = deepspeed_ema(path, states) if ema else _strip(deepspeed_model(path, states))
        meta = {k: states[k] for k in ("global_step", "vgen_config", "adapters", "base_weights", "placeholder")
                if k in states}
    elif info["format"] == "dcp":
        weights = dcp_weights(path, ema)
        weights = weights if ema else _strip(weights)
        meta = dcp_meta(path)
    else:
        raise ValueError(f"{path}: unknown sharded checkpoint format {info['format']!r}")
    return weights, meta
