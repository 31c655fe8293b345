"""Export model (or EMA) weights from a vgen training checkpoint to a single safetensors file.

    python -m vgen.checkpoint export <ckpt> <out.safetensors> [--ema] [--original-keys]

``<ckpt>`` is a ``.ckpt`` file (single process, DDP) or a sharded checkpoint directory (DeepSpeed ZeRO-2/3,
FSDP2), which is consolidated in this one process whatever world size wrote it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vgen.checkpoint.safe_load import CheckpointError, load_weights_only


def load_training_checkpoint(path: str | Path) -> dict:
    """A vgen training checkpoint file, read weights-only (:func:`vgen.checkpoint.safe_load.load_weights_only`).

    Raises :class:`CheckpointError` naming the file when it is unreadable, refused (not weights-only) or not a
    training checkpoint (no ``state_dict``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a vgen training checkpoint (it holds "
                              f"{'no state_dict' if isinstance(ckpt, dict) else 'a ' + type(ckpt).__name__})")
    return ckpt


def unet_weights(ckpt: dict, ema: bool = False) -> dict[str, torch.Tensor]:
    """The UNet state dict of a training checkpoint (its EMA weights with ``ema=True``)."""
    weights = {k[len("unet."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    if ema:
        if "ema" not in ckpt:
            raise KeyError("this checkpoint has no EMA weights (trained with stage.ema.enabled=false)")
        shadow = ckpt["ema"]["shadow"]
        weights = {k: shadow[k].to(v.dtype) if k in shadow else v for k, v in weights.items()}
    return weights


def load_unet_weights(ckpt_path: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """UNet weights (EMA weights with ``ema=True``) and the checkpoint's metadata, from a file or a sharded dir."""
    path = Path(ckpt_path)
    if not path.is_dir():
        ckpt = load_training_checkpoint(path)
        return unet_weights(ckpt, ema), ckpt
    from vgen.checkpoint.sharded import consolidate

    weights, meta = consolidate(path)
    if ema:
        shadow, _ = consolidate(path, ema=True)
        weights = {k: shadow[k].to(v.dtype) if k in shadow else v for k, v in weights.items()}
    return weights, meta


def original_key_names(weights: dict[str, torch.Tensor], unet_config: dict | None) -> dict[str, torch.Tensor]:
    """``weights`` under the original VGen key names of the UNet ``unet_config`` builds (on the meta device: its
    conditions know their original module names)."""
    from hydra.utils import instantiate

    from vgen.compat.vgen import original_key_map

    if unet_config is None:
        raise ValueError("--original-keys needs the checkpoint's model.unet config (vgen_config), which it lacks")
    with torch.device("meta"):
        names = original_key_map(instantiate(unet_config))
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise KeyError(f"checkpoint weights {unknown[:5]} are not parameters of its own model.unet config")
    return {names[k]: v for k, v in weights.items()}


def export(ckpt_path: str | Path, out_path: str | Path, ema: bool = False, original_keys: bool = False) -> Path:
    weights, ckpt = load_unet_weights(ckpt_path, ema)
    if original_keys:
        weights = original_key_names(weights, ckpt.get("vgen_config", {}).get("model", {}).get("unet"))
    metadata = {"format": "vgen-unet", "weights": "ema" if ema else "model", "global_step": str(ckpt.get("global_step")),
                "key_names": "original-vgen" if original_keys else "vgen"}
    unet_cfg = ckpt.get("vgen_config", {}).get("model", {}).get("unet")
    if unet_cfg is not None:
        metadata["unet_config"] = json.dumps(unet_cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
    tmp.replace(out_path)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vgen.checkpoint", description="vgen checkpoint tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write model (or EMA) weights to one safetensors file")
    p.add_argument("checkpoint", help="training checkpoint (.ckpt file, or a DeepSpeed/FSDP2 checkpoint directory)")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw model")
    p.add_argument("--original-keys", action="store_true", help="use the original VGen key names")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, ema=args.ema, original_keys=args.original_keys)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"vgen.checkpoint: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
