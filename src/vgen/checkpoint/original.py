"""Weights from the original releases into a vgen UNet3D, strictly: VGen/ModelScope checkpoints and SD-2.1.

* VGen checkpoints (``i2vgen_xl_00854500.pth``, ModelScope/VGen T2V ``non_ema_*.pth``, TF-T2V
  ``tft2v_t2v_non_ema_*.pth``, SR600 ``sr_step_110000_ema.pth``): original key names, ``{'state_dict': ...}`` or a
  bare state dict, a DDP ``module.`` prefix tolerated. Every key must match (:mod:`vgen.compat.vgen` names them);
  TF-T2V's image MLP is called ``pre_image_condition`` where I2VGen-XL says ``context_embedding``.
* Stable Diffusion 2.1 (``v2-1_512-ema-pruned.ckpt``, LDM format, ``model.diffusion_model.*``): the 686 UNet keys
  initialise the 682 spatial (SD-derived) parameters of the UNet3D plus its timestep MLP. The layouts differ only
  in block positions: SD has no temporal transformer, so its middle ResBlock 2 is our ``middle_block.3``, its
  upsampler sits at index 2 (1 without attention) where ours is at 3, and its downsamplers are wrapped once more
  (``input_blocks.3.0.op`` vs ``input_blocks.3.op``). Input channels the SD conv lacks (I2VGen-XL's first-frame
  concat, TF-T2V's condition channels) start at zero, so the initial network ignores them.
* vgen training checkpoints (``unet.*`` keys) and diffusers folders (:mod:`vgen.checkpoint.diffusers`).

Files are read with ``torch.load(weights_only=True)`` or safetensors (:func:`vgen.models.frozen.read_state_dict`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from vgen.checkpoint.export import load_training_checkpoint, unet_weights
from vgen.compat import vgen as compat
from vgen.models.frozen import read_state_dict
from vgen.models.unet3d import UNet3D, UNet3DConfig

log = logging.getLogger(__name__)
LDM_UNET_PREFIX = "model.diffusion_model."
FORMATS = ("auto", "vgen", "sd21", "vgen_ckpt", "vgen_unet", "diffusers")
_LDM_RESBLOCK_LAYERS = ("in_layers.", "emb_layers.", "out_layers.", "skip_connection.")


# ---------------------------------------------------------------------------------------------- VGen checkpoints
def _class_name(cfg: UNet3DConfig) -> str:
    """The original class a UNet of config ``cfg`` corresponds to (for messages)."""
    if any(spec.get("_target_", "").endswith(".FirstFrame") for spec in cfg.conditions.values()):
        return "UNetSD_I2VGen"
    if cfg.resample == "sr600":
        return "UNetSD_SR600"
    return "UNetSD_TFT2V" if cfg.concat_channels else "UNetSD_T2VBase"


def to_vgen_state_dict(model: UNet3D) -> dict[str, torch.Tensor]:
    """``model``'s weights under the original VGen key names (each condition's own original names)."""
    return dict(compat.state_dict(model))


def load_vgen_state_dict(model: UNet3D, state: Mapping[str, torch.Tensor], source: str = "state dict",
                         allow_missing: Sequence[str] = ()) -> list[str]:
    """Load an original VGen state dict into ``model`` strictly (cast to the model's dtypes; a model built on the
    meta device takes the tensors). Nothing is loaded unless every key and shape matches; the error names
    ``source`` and every bad key. ``allow_missing``: prefixes of ``model``'s own keys (e.g. ``conditions.motion.``)
    the file may lack; those keep their initial values and are returned."""
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"{source}: state dict values must be tensors; not tensors: {not_tensors[:10]}")
    given = {k.removeprefix("module."): v for k, v in state.items()}
    names = compat.original_key_map(model)
    fresh = [ours for ours, theirs in names.items() if ours.startswith(tuple(allow_missing)) and theirs not in given]
    expected = {k: v.shape for k, v in to_vgen_state_dict(model).items() if k not in {names[f] for f in fresh}}
    _check_strict(expected, {k: v.shape for k, v in given.items()}, f"{source} does not match {_class_name(model.config)}")
    current = model.state_dict()
    _assign(model, {ours: current[ours] if ours in fresh else given[theirs] for ours, theirs in names.items()})
    return fresh


def _check_strict(expected: Mapping[str, torch.Size], given: Mapping[str, torch.Size], title: str,
                  allow: Callable[[str], bool] = lambda key: False) -> None:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k}: file {tuple(given[k])} vs model {tuple(expected[k])}" for k in expected
                  if k in given and tuple(given[k]) != tuple(expected[k]) and not allow(k)]
    if missing or unexpected or mismatched:
        lines = [f"{title}:"]
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {name} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise KeyError("\n".join(lines))


def _assign(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)``, cast to the model's dtypes; on the meta device the tensors are taken."""
    current = model.state_dict()
    meta = any(v.is_meta for v in current.values())
    model.load_state_dict({k: weights[k].to(current[k].dtype) for k in current}, strict=True, assign=meta)


# ---------------------------------------------------------------------------------------------- Stable Diffusion 2.1
def _sd21_pairs(cfg: UNet3DConfig) -> list[tuple[str, str]]:
    """``(vgen module prefix, LDM module prefix)`` of every SD-2.1-derived module of a UNet3D."""
    has_attention = [0.5 ** level in cfg.attention_scales for level in range(len(cfg.channel_mult))]
    pairs = [("time_embed.", "time_embed."), ("input_blocks.0.0.", "input_blocks.0.0."), ("out.", "out.")]

    def resblock(ours: str, theirs: str) -> None:
        pairs.extend((ours + layer, theirs + layer) for layer in _LDM_RESBLOCK_LAYERS)

    levels = len(cfg.channel_mult)
    index = 1
    for level in range(levels):
        for _ in range(cfg.num_res_blocks):
            resblock(f"input_blocks.{index}.0.", f"input_blocks.{index}.0.")
            if has_attention[level]:
                pairs.append((f"input_blocks.{index}.1.", f"input_blocks.{index}.1."))
            index += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{index}.op.", f"input_blocks.{index}.0.op."))
            index += 1
    resblock("middle_block.0.", "middle_block.0.")
    pairs.append(("middle_block.1.", "middle_block.1."))
    resblock("middle_block.3.", "middle_block.2.")
    index = 0
    for level in reversed(range(levels)):
        for j in range(cfg.num_res_blocks + 1):
            resblock(f"output_blocks.{index}.0.", f"output_blocks.{index}.0.")
            if has_attention[level]:
                pairs.append((f"output_blocks.{index}.1.", f"output_blocks.{index}.1."))
            if level != 0 and j == cfg.num_res_blocks:
                ours, theirs = (3, 2) if has_attention[level] else (1, 1)
                pairs.append((f"output_blocks.{index}.{ours}.conv.", f"output_blocks.{index}.{theirs}.conv."))
            index += 1
    return pairs


def sd21_key_map(model: UNet3D) -> dict[str, str]:
    """vgen parameter name -> SD-2.1 LDM UNet key (without ``model.diffusion_model.``) for every SD-derived one."""
    pairs = _sd21_pairs(model.config)
    mapping = {}
    for name in ("time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias",
                 *model.spatial_parameter_names()):
        matches = [(ours, theirs) for ours, theirs in pairs if name.startswith(ours)]
        if len(matches) != 1:
            raise KeyError(f"{name}: {len(matches)} SD-2.1 counterparts")
        ours, theirs = matches[0]
        mapping[name] = theirs + name[len(ours):]
    return mapping


def to_sd21_state_dict(model: UNet3D) -> dict[str, torch.Tensor]:
    """The SD-derived part of ``model`` as an LDM-format SD-2.1 UNet state dict (input conv: first C channels)."""
    state = model.state_dict()
    out = {}
    for name, key in sd21_key_map(model).items():
        value = state[name]
        if name == "input_blocks.0.0.weight":
            value = value[:, : model.config.in_channels]
        out[LDM_UNET_PREFIX + key] = value
    return out


def load_sd21_spatial(model: UNet3D, state: Mapping[str, torch.Tensor], source: str = "SD-2.1 checkpoint") -> int:
    """Initialise ``model``'s spatial layers and timestep MLP from an LDM-format SD-2.1 state dict, strictly.

    Every ``model.diffusion_model.*`` key must have a counterpart of the same shape and vice versa (extra input
    channels of ``model``'s first conv are zeroed). Keys of the autoencoder and text encoder are ignored. Returns
    the number of tensors copied.
    """
    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    if not unet:
        raise KeyError(f"{source} has no '{LDM_UNET_PREFIX}*' keys (not an LDM-format Stable Diffusion checkpoint)")
    mapping = sd21_key_map(model)
    ours = model.state_dict()
    by_key = {key: name for name, key in mapping.items()}

    def wider_input_conv(key: str) -> bool:  # SD's 4-channel input conv into a wider one
        have, want = unet[key].shape, ours[by_key[key]].shape
        return key == "input_blocks.0.0.weight" and have[0] == want[0] and have[1] <= want[1] and have[2:] == want[2:]

    _check_strict({key: ours[name].shape for name, key in mapping.items()}, {k: v.shape for k, v in unet.items()},
                  f"{source} does not match the UNet3D's SD-2.1 layers", allow=wider_input_conv)
    with torch.no_grad():
        for name, key in mapping.items():
            target = ours[name]
            value = unet[key].to(target.dtype)
            if name == "input_blocks.0.0.weight" and value.shape != target.shape:
                target.zero_()
                target[:, : value.shape[1]] = value
            else:
                target.copy_(value)
    return len(mapping)


# ---------------------------------------------------------------------------------------------- one entry point
def detect_format(path: str | Path, state: Mapping[str, torch.Tensor] | None = None) -> str:
    if Path(path).is_dir():
        return "diffusers"
    if Path(path).suffix == ".safetensors" and _exported_with_vgen_names(path):
        return "vgen_unet"
    keys = list(state or {})
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return "sd21"
    if keys and all(k.startswith("unet.") for k in keys):
        return "vgen_ckpt"
    return "vgen"


def _exported_with_vgen_names(path: str | Path) -> bool:
    """Whether ``path`` is a ``python -m vgen.checkpoint export`` file with vgen (not original VGen) key names."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            meta = file.metadata() or {}
    except (safetensors.SafetensorError, OSError, ValueError):
        return False
    return meta.get("format") == "vgen-unet" and meta.get("key_names") == "vgen"


def init_unet(model: UNet3D, path: str | Path, fmt: str = "auto", allow_missing: Sequence[str] = ()) -> str:
    """Give ``model`` the weights of ``path`` (see the module doc for formats); returns the format used.

    ``fmt``: ``auto`` (from the file's keys), ``vgen`` (original VGen release), ``sd21`` (spatial init from a
    Stable Diffusion 2.1 LDM checkpoint), ``vgen_ckpt`` (a vgen training checkpoint's UNet: its EMA weights when
    it has them), ``vgen_unet`` (a ``python -m vgen.checkpoint export`` file with vgen key names; detected from
    its metadata), ``diffusers``. ``allow_missing`` (VGen releases and vgen checkpoints): prefixes of the model's
    keys the file may lack, e.g. HiGen's new zero-initialised paths over a T2V release; they keep their init.
    """
    if fmt not in FORMATS:
        raise ValueError(f"weights format {fmt!r} is not one of {FORMATS}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"UNet init weights not found: {path}")
    if fmt == "diffusers" or (fmt == "auto" and path.is_dir()):
        from vgen.checkpoint.diffusers import load_diffusers

        loaded = load_diffusers(path)
        if loaded.config.architecture() != model.config.architecture():
            raise ValueError(f"{path}: the diffusers model's config differs from model.unet ({loaded.config})")
        _assign(model, loaded.state_dict())
        return "diffusers"
    state = read_state_dict(path)
    fmt = detect_format(path, state) if fmt == "auto" else fmt
    if fmt == "sd21":
        load_sd21_spatial(model, state, str(path))
    elif fmt in ("vgen_ckpt", "vgen_unet"):
        if fmt == "vgen_ckpt":
            ckpt = load_training_checkpoint(path)
            weights = unet_weights(ckpt, ema="ema" in ckpt)
        else:
            weights = dict(state)
        current = model.state_dict()
        fresh = [k for k in current if k.startswith(tuple(allow_missing)) and k not in weights]
        _check_strict({k: v.shape for k, v in current.items() if k not in fresh},
                      {k: v.shape for k, v in weights.items()}, f"{path} does not match model.unet")
        _assign(model, {**{k: current[k] for k in fresh}, **weights})
    else:
        fresh = load_vgen_state_dict(model, state, str(path), allow_missing)
    if fmt in ("vgen", "vgen_ckpt", "vgen_unet") and fresh:
        log.info("%s: %d parameters it does not hold keep their initialisation (allowed by allow_missing): %s",
                 path, len(fresh), ", ".join(fresh))
    return fmt


__all__ = ["FORMATS", "detect_format", "init_unet", "load_sd21_spatial", "load_vgen_state_dict", "sd21_key_map",
           "to_sd21_state_dict", "to_vgen_state_dict"]
