"""vgen UNet3D <-> diffusers ``I2VGenXLUNet`` (I2VGen-XL) and ``UNet3DConditionModel`` (ModelScope / VGen T2V).

The key mapping is the one of diffusers' conversion scripts for the VGen / ModelScope UNets: ``input_blocks.0.0``
is ``conv_in``, ``input_blocks.0.1`` is ``transformer_in``; in each level the ResBlock is ``resnets.j`` (with
``in_layers.0 -> norm1``, ``in_layers.2 -> conv1``, ``emb_layers.1 -> time_emb_proj``, ``out_layers.0 -> norm2``,
``out_layers.3 -> conv2``, ``skip_connection -> conv_shortcut``), its temporal conv is ``temp_convs.j``, the spatial
and temporal transformers are ``attentions.j`` and ``temp_attentions.j``, resamplers are ``downsamplers.0.conv`` /
``upsamplers.0.conv``; the I2VGen-XL condition modules are ``context_embedding``, ``fps_embedding``,
``image_latents_proj_in``, ``image_latents_temporal_encoder`` and ``image_latents_context_embedding``.

Three tensor-level differences, all exact in both directions:

* temporal transformers project with 1x1 ``Conv1d`` here (``[out, in, 1]``) and ``Linear`` there (``[out, in]``);
* the first-frame temporal encoder fuses q, k, v into one ``to_qkv`` here; diffusers has ``to_q/to_k/to_v``;
* the original I2VGen-XL adds its first-frame concat features twice (vgen keeps that x2), diffusers' UNet adds
  them once: the export doubles ``conv_in``'s weights on those input channels (and the import halves them), so
  both networks compute the same function. Powers of two do not round.

Networks diffusers cannot express (SR600 resampling/FreeU, TF-T2V image tokens without the I2VGen-XL pathways,
frame-index encodings, other temporal-head counts) are refused with the config key that prevents it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from vgen.models.conditions.base import architecture_spec
from vgen.models.unet3d import TEXT_CONDITION, UNet3D, UNet3DConfig, legacy_conditions

I2VGEN_CLASS = "I2VGenXLUNet"
T2V_CLASS = "UNet3DConditionModel"
DIFFUSERS_TEMPORAL_IN_HEADS = 8  # diffusers hard-codes 8 heads in transformer_in
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

_RESNET_RENAMES = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                   ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_QKV = "conditions.first_frame.temporal_encoder.layers.0.0.fn.to_qkv.weight"
_QKV_PARTS = tuple(f"image_latents_temporal_encoder.attn1.to_{p}.weight" for p in "qkv")


# ---------------------------------------------------------------------------------------------- configs
def diffusers_config(cfg: UNet3DConfig) -> tuple[str, dict]:
    """``(class name, constructor kwargs)`` of the diffusers UNet equal to a vgen UNet3D of config ``cfg``."""
    problems = []
    if cfg.resample != "standard" or cfg.skip_filters:
        problems.append("resample/skip_filters (SR600 pyramid and FreeU are not in diffusers' 3D UNets)")
    if cfg.temporal_position != "none":
        problems.append("temporal_position (diffusers' temporal attention has no frame-index encoding)")
    if not cfg.temporal_attention:
        problems.append("temporal_attention=false")
    if cfg.init_temporal_heads != DIFFUSERS_TEMPORAL_IN_HEADS:
        problems.append(f"init_temporal_heads={cfg.init_temporal_heads} (diffusers uses {DIFFUSERS_TEMPORAL_IN_HEADS})")
    if cfg.decoder_context_dim != cfg.context_dim:
        problems.append("decoder_context_dim != context_dim (diffusers uses one cross_attention_dim)")
    if cfg.concat_channels:
        problems.append("concat_channels (TF-T2V condition channels)")
    if cfg.text_embedding or cfg.frame_embedding or cfg.scale_shift_norm:
        problems.append("text_embedding/frame_embedding/scale_shift_norm (vgen's small-model options)")
    conditions = cfg.architecture()["conditions"]
    i2vgen = conditions == i2vgen_conditions(cfg)
    if i2vgen and cfg.in_channels != 4:
        problems.append("in_channels != 4 (diffusers' I2VGenXLUNet reads 4-channel image latents)")
    if i2vgen and cfg.image_dim != cfg.context_dim:
        problems.append("image_dim != context_dim (I2VGenXLUNet's image embedding is context_dim wide)")
    if not i2vgen and conditions != {"text": architecture_spec(TEXT_CONDITION)}:
        problems.append(f"conditions {sorted(conditions)} (diffusers has text only, or I2VGen-XL's exact set: "
                        "text, first_frame, image with in_channels context_dim-wide tokens, fps)")
    if problems:
        raise ValueError("this UNet3D has no diffusers equivalent: " + "; ".join(problems))
    levels = len(cfg.channel_mult)
    attention = [_has_attention(cfg, level) for level in range(levels)]
    kwargs = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": tuple("CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(attention)),
        "block_out_channels": tuple(cfg.model_channels * m for m in cfg.channel_mult),
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": 32,
        "cross_attention_dim": cfg.context_dim,
        # diffusers' historical naming: this value is the head *width* of the 3D blocks (heads = channels // it)
        "attention_head_dim": cfg.head_dim,
    }
    return (I2VGEN_CLASS if i2vgen else T2V_CLASS), kwargs


def unet_config_from_diffusers(class_name: str, config: Mapping) -> UNet3DConfig:
    """The :class:`UNet3DConfig` of a diffusers ``I2VGenXLUNet`` / ``UNet3DConditionModel`` config."""
    if class_name not in (I2VGEN_CLASS, T2V_CLASS):
        raise ValueError(f"unsupported diffusers class {class_name!r}; supported: {[I2VGEN_CLASS, T2V_CLASS]}")
    channels = list(config["block_out_channels"])
    head_dim = config.get("attention_head_dim", 64)
    if not isinstance(head_dim, int) or config.get("num_attention_heads") is not None:
        raise ValueError("only an integer attention_head_dim (and no num_attention_heads) maps to UNet3D")
    if any(c % channels[0] for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first one")
    down = list(config["down_block_types"])
    if list(config["up_block_types"]) != [t.replace("Down", "Up") for t in reversed(down)]:
        raise ValueError("up_block_types must mirror down_block_types")
    i2vgen = class_name == I2VGEN_CLASS
    return UNet3DConfig(
        in_channels=config["in_channels"], out_channels=config["out_channels"], model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels), num_res_blocks=config["layers_per_block"],
        attention_scales=tuple(0.5 ** i for i, t in enumerate(down) if t.startswith("CrossAttn")),
        head_dim=head_dim, init_temporal_heads=DIFFUSERS_TEMPORAL_IN_HEADS, context_dim=config["cross_attention_dim"],
        decoder_context_dim=config["cross_attention_dim"], image_dim=config["cross_attention_dim"],
        conditions=legacy_conditions({"first_frame_condition": i2vgen, "fps_condition": i2vgen,
                                      "image_tokens": config["in_channels"] if i2vgen else 0}),
    )


def i2vgen_conditions(cfg: UNet3DConfig) -> dict:
    """The architecture of I2VGen-XL's conditions as diffusers' I2VGenXLUNet has them, for a UNet like ``cfg``."""
    conditions = legacy_conditions({"first_frame_condition": True, "fps_condition": True,
                                    "image_tokens": cfg.in_channels})
    return {name: architecture_spec(spec) for name, spec in conditions.items()}


def _i2vgen(cfg: UNet3DConfig) -> bool:
    return "first_frame" in cfg.conditions and cfg.architecture()["conditions"] == i2vgen_conditions(cfg)


def _has_attention(cfg: UNet3DConfig, level: int) -> bool:
    return 0.5 ** level in cfg.attention_scales


# ---------------------------------------------------------------------------------------------- key mapping
def _module_pairs(cfg: UNet3DConfig) -> list[tuple[str, str]]:
    """``(vgen module prefix, diffusers module prefix)`` for every module of the network."""
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("input_blocks.0.1.", "transformer_in."),
             ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    if _i2vgen(cfg):
        encoder = "conditions.first_frame.temporal_encoder.layers.0."
        pairs += [("conditions.fps.mlp.", "fps_embedding."), ("conditions.image.mlp.", "context_embedding."),
                  ("conditions.first_frame.concat_encoder.", "image_latents_proj_in."),
                  ("conditions.first_frame.token_encoder.", "image_latents_context_embedding."),
                  (encoder + "0.norm.", "image_latents_temporal_encoder.norm1."),
                  (encoder + "0.fn.to_out.0.", "image_latents_temporal_encoder.attn1.to_out.0."),
                  (encoder + "1.net.0.0.", "image_latents_temporal_encoder.ff.net.0.proj."),
                  (encoder + "1.net.2.", "image_latents_temporal_encoder.ff.net.2.")]

    def resblock(ours: str, resnet: str, temp_conv: str) -> None:
        pairs.extend((ours + a, resnet + b) for a, b in _RESNET_RENAMES)
        pairs.append((ours + "temporal_conv.", temp_conv))

    def transformers(ours: str, theirs: str, j: int, first: int) -> None:
        pairs.extend([(f"{ours}{first}.", f"{theirs}attentions.{j}."),
                      (f"{ours}{first + 1}.", f"{theirs}temp_attentions.{j}.")])

    levels = len(cfg.channel_mult)
    index = 1
    for level in range(levels):
        down = f"down_blocks.{level}."
        for j in range(cfg.num_res_blocks):
            block = f"input_blocks.{index}."
            resblock(block + "0.", f"{down}resnets.{j}.", f"{down}temp_convs.{j}.")
            if _has_attention(cfg, level):
                transformers(block, down, j, 1)
            index += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{index}.op.", f"{down}downsamplers.0.conv."))
            index += 1
    resblock("middle_block.0.", "mid_block.resnets.0.", "mid_block.temp_convs.0.")
    transformers("middle_block.", "mid_block.", 0, 1)
    resblock("middle_block.3.", "mid_block.resnets.1.", "mid_block.temp_convs.1.")
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        prefix = f"up_blocks.{up}."
        for j in range(cfg.num_res_blocks + 1):
            block = f"output_blocks.{index}."
            resblock(block + "0.", f"{prefix}resnets.{j}.", f"{prefix}temp_convs.{j}.")
            position = 1
            if _has_attention(cfg, level):
                transformers(block, prefix, j, 1)
                position = 3
            if level != 0 and j == cfg.num_res_blocks:
                pairs.append((f"{block}{position}.conv.", f"{prefix}upsamplers.0.conv."))
            index += 1
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]], reverse: bool) -> str:
    best = None
    for ours, theirs in pairs:
        source, target = (theirs, ours) if reverse else (ours, theirs)
        if key.startswith(source) and (best is None or len(source) > len(best[0])):
            best = (source, target)
    if best is None:
        raise KeyError(f"no {'vgen' if reverse else 'diffusers'} name for {key!r}")
    return best[1] + key[len(best[0]):]


def _is_temporal_projection(diffusers_key: str) -> bool:
    temporal = diffusers_key.startswith("transformer_in.") or ".temp_attentions." in diffusers_key
    return temporal and diffusers_key.endswith(("proj_in.weight", "proj_out.weight"))


def _concat_channels(cfg: UNet3DConfig) -> slice:
    return slice(cfg.in_channels, 2 * cfg.in_channels)


def to_diffusers_state_dict(state: Mapping[str, torch.Tensor], cfg: UNet3DConfig) -> dict[str, torch.Tensor]:
    """A vgen UNet3D state dict (vgen key names) -> the diffusers model's state dict."""
    diffusers_config(cfg)  # refuses networks diffusers cannot express
    pairs = _module_pairs(cfg)
    out = {}
    for key, value in state.items():
        if key == _QKV:
            out.update(zip(_QKV_PARTS, value.chunk(3, dim=0)))
            continue
        name = _rename(key, pairs, reverse=False)
        if _is_temporal_projection(name):
            value = value[..., 0]
        elif name == "conv_in.weight" and _i2vgen(cfg):
            value = value.clone()
            value[:, _concat_channels(cfg)] *= 2
        out[name] = value
    return out


def from_diffusers_state_dict(state: Mapping[str, torch.Tensor], cfg: UNet3DConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_diffusers_state_dict`."""
    pairs = _module_pairs(cfg)
    out = {}
    for name, value in state.items():
        if name in _QKV_PARTS:
            if name == _QKV_PARTS[0]:
                missing = [p for p in _QKV_PARTS if p not in state]
                if missing:
                    raise KeyError(f"diffusers state dict lacks {missing}")
                out[_QKV] = torch.cat([state[p] for p in _QKV_PARTS], dim=0)
            continue
        key = _rename(name, pairs, reverse=True)
        if _is_temporal_projection(name):
            value = value[..., None]
        elif name == "conv_in.weight" and _i2vgen(cfg):
            value = value.clone()
            value[:, _concat_channels(cfg)] /= 2
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- models
def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _strict_load(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise KeyError(f"{what}: missing {missing[:8]} ({len(missing)}), unexpected {unexpected[:8]} "
                       f"({len(unexpected)}), shape mismatch {mismatched[:8]} ({len(mismatched)})")
    module.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items()}, strict=True, assign=True)


def to_diffusers(model: UNet3D) -> torch.nn.Module:
    """A diffusers UNet (built on the meta device, then given ``model``'s tensors) computing what ``model`` does."""
    class_name, kwargs = diffusers_config(model.config)
    with torch.device("meta"):
        target = _diffusers_class(class_name)(**kwargs)
    _strict_load(target, to_diffusers_state_dict(model.state_dict(), model.config), f"diffusers {class_name}")
    return target.eval()


def from_diffusers(module: torch.nn.Module) -> UNet3D:
    """The vgen UNet3D of a diffusers ``I2VGenXLUNet`` / ``UNet3DConditionModel`` (built on meta, loaded strictly)."""
    cfg = unet_config_from_diffusers(type(module).__name__, dict(module.config))
    with torch.device("meta"):
        model = UNet3D(cfg)
    _strict_load(model, from_diffusers_state_dict(module.state_dict(), cfg), "vgen UNet3D")
    return model


def save_diffusers(model: UNet3D, out_dir: str | Path) -> Path:
    """Write ``model`` as a diffusers model folder (``config.json`` + safetensors), atomically (temp dir + rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        to_diffusers(model).save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def load_diffusers(model_dir: str | Path) -> UNet3D:
    """Read a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``; no pickle)."""
    model_dir = Path(model_dir)
    config_path, weights = model_dir / "config.json", model_dir / WEIGHTS_NAME
    for path in (config_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a diffusers model folder holds config.json and {WEIGHTS_NAME})")
    config = json.loads(config_path.read_text())
    class_name = config.get("_class_name")
    cfg = unet_config_from_diffusers(class_name, config)
    with torch.device("meta"):
        model = UNet3D(cfg)
    _strict_load(model, from_diffusers_state_dict(load_file(str(weights)), cfg), f"{model_dir} as vgen UNet3D")
    return model


__all__ = ["diffusers_config", "from_diffusers", "from_diffusers_state_dict", "load_diffusers", "save_diffusers",
           "to_diffusers", "to_diffusers_state_dict", "unet_config_from_diffusers"]
