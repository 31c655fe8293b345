"""Convert UNet weights between VGen releases, vgen checkpoints and diffusers model folders.

    python -m vgen.checkpoint.convert to-diffusers SRC OUT_DIR [--model NAME] [--set KEY=VALUE ...]
    python -m vgen.checkpoint.convert from-diffusers MODEL_DIR OUT.pth|OUT.safetensors

``to-diffusers``: SRC is a vgen training checkpoint (its config names the UNet; its EMA weights are used when it
has them) or a VGen release such as ``i2vgen_xl_00854500.pth`` / a ModelScope ``non_ema_*.pth``, whose
architecture is the ``conf/model/unet`` option ``--model`` (``i2vgen_xl`` -> ``I2VGenXLUNet``, ``t2v`` ->
``UNet3DConditionModel``), optionally with UNet config overrides (``--set``). ``from-diffusers``: a ``.pth`` output holds the
original VGen key names (``{'state_dict': ...}``, loadable by VGen), a ``.safetensors`` one vgen's names. Full-size
networks are built on the meta device, so no memory or time goes into a random initialisation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vgen.checkpoint.diffusers import load_diffusers, save_diffusers
from vgen.checkpoint.export import load_training_checkpoint
from vgen.checkpoint.original import init_unet, to_vgen_state_dict
from vgen.models.unet3d import UNet3D


def unet_from_config(model: str | None, overrides: list[str], checkpoint: Path) -> UNet3D:
    """The (meta-device) UNet3D a checkpoint's run config or ``conf/model/unet/<model>.yaml`` describes."""
    if model is None:
        if checkpoint.suffix != ".ckpt":
            raise ValueError(f"{checkpoint}: name its architecture with --model (a conf/model/unet option)")
        cfg = load_training_checkpoint(checkpoint).get("vgen_config", {}).get("model", {}).get("unet")
        if cfg is None:
            raise ValueError(f"{checkpoint} has no vgen_config; name its architecture with --model")
    else:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf

        from vgen.config import CONF_DIR

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name="train", overrides=[f"model/unet={model}",
                                                               *(f"model.unet.{o}" for o in overrides)])
        cfg = OmegaConf.to_container(composed.model.unet, resolve=True)
    with torch.device("meta"):
        return UNet3D(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def _atomic_write(out: Path, write) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    write(tmp)
    tmp.replace(out)
    return out


def to_diffusers(src: str, out_dir: str, model: str | None = None, overrides: list[str] | None = None) -> Path:
    src_path = Path(src)
    if not src_path.exists():
        raise FileNotFoundError(f"{src}: no such file")
    unet = unet_from_config(model, overrides or [], src_path)
    init_unet(unet, src_path)
    return save_diffusers(unet, out_dir)


def from_diffusers(model_dir: str, out: str) -> Path:
    unet = load_diffusers(model_dir)
    out_path = Path(out)
    if out_path.suffix == ".safetensors":
        weights = {k: v.contiguous() for k, v in unet.state_dict().items()}
        return _atomic_write(out_path, lambda p: save_file(weights, str(p), metadata={"format": "vgen-unet"}))
    if out_path.suffix != ".pth":
        raise ValueError(f"{out}: the output must be .pth (VGen key names) or .safetensors (vgen key names)")
    state = {k: v.contiguous() for k, v in to_vgen_state_dict(unet).items()}
    return _atomic_write(out_path, lambda p: torch.save({"state_dict": state}, p))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vgen.checkpoint.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-diffusers", help="VGen release or vgen checkpoint -> diffusers model folder")
    p.add_argument("src", help="VGen .pth release or vgen training .ckpt")
    p.add_argument("out_dir", help="diffusers model folder to write (config.json + safetensors)")
    p.add_argument("--model", help="conf/model/unet option describing SRC (required for VGen releases)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="UNet config overrides, e.g. --set in_channels=4 dropout=0.0")
    p = sub.add_parser("from-diffusers", help="diffusers model folder -> VGen .pth or vgen .safetensors")
    p.add_argument("model_dir", help="diffusers I2VGenXLUNet / UNet3DConditionModel folder")
    p.add_argument("out", help="output .pth (VGen key names) or .safetensors (vgen key names)")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-diffusers":
            path = to_diffusers(args.src, args.out_dir, args.model, args.overrides)
        else:
            path = from_diffusers(args.model_dir, args.out)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as err:
        message = str(err.args[0]) if err.args else type(err).__name__
        print(f"vgen.checkpoint.convert: error: {message.splitlines()[0]}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
