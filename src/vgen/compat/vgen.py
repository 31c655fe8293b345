"""Compatibility with the original VGen code (github.com/ali-vilab/VGen).

Users bring VGen checkpoints and configs; this module builds the equivalent vgen model from the original class
name and constructor kwargs, converts state dicts both ways (original key names and shapes, exactly), and calls
the model with the original forward argument names.

    model = build_unet("UNetSD_I2VGen", kwargs)          # kwargs as in VGen's cfg.UNet
    load_state_dict(model, torch.load(path, weights_only=True)["state_dict"])
    out = forward(model, x, t, y=y, image=image, local_image=local_image, fps=fps)

``UNetSD_LoRA`` (InstructVideo) is the T2V network with :mod:`vgen.models.lora` adapters on q, k, v and out of
every attention; its adapter keys are spelled ``to_q_lora.down_linear.weight`` in the original and listed after
the attention's own weights. ``UNetSD_DreamVideo`` is the T2V network with :mod:`vgen.models.dreamvideo` adapters
(identity adapters on the spatial transformers, motion adapters on the temporal ones; their keys are the original's)
and the appearance embedding ``y_image`` and its strength ``ag_strength`` as the conditions the motion adapters read.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from vgen.models.conditions import original_names
from vgen.models.dreamvideo import IdentityAdapter, MotionAdapter
from vgen.models.lora import ATTENTION_TARGETS, apply_lora
from vgen.models.unet3d import UNet3D, UNet3DConfig

log = logging.getLogger(__name__)

# Top-level modules of the original classes, in the order they register them (every class's order is a subsequence).
_ORIGINAL_ORDER = (
    "time_embed", "pre_image_condition", "context_embedding", "asim_embedding", "msim_embedding", "img_embedding",
    "fps_embedding", "depth_embedding", "depth_embedding_after", "motion_embedding", "motion_embedding_after",
    "canny_embedding", "canny_embedding_after", "masked_embedding", "mask_embedding_after", "sketch_embedding",
    "sketch_embedding_after", "single_sketch_embedding", "single_sketch_embedding_after", "local_image_concat",
    "local_temporal_encoder", "local_image_embedding", "local_image_embedding_after", "hist_context_embedding",
    "input_blocks", "middle_block", "output_blocks", "out",
)
# Inner renames (the original's spelling is kept in its checkpoints).
_INNER_RULES: tuple[tuple[str, str], ...] = (
    (".temporal_conv.", ".temopral_conv."),
    *((f".{proj}.lora_{side}.", f".{proj.removesuffix('.0')}_lora.{side}_linear.")
      for proj in ATTENTION_TARGETS for side in ("down", "up")),
)
_ORIGINAL_LORA_KEY = re.compile(r"^(.*)\.to_(q|k|v|out)_lora\.(down|up)_linear\.weight$")

# Constructor arguments of the original classes that have no effect on the network built by the released code
# (dead branches, training-time flags, bookkeeping). They are accepted and ignored, as the original does.
_INERT_KWARGS = frozenset({
    "context_embedding_depth", "black_image_feature",
    "config", "hist_dim", "dim_condition", "temporal_attn_times", "use_sim_mask", "training",
    "inpainting", "p_all_zero", "p_all_keep", "zero_y", "adapter_transformer_layers_unused", "upper_len",
    "default_fps", "misc_dropout", "use_scale_shift_norm", "concat_dim", "y_dim_unused",
})

SUPPORTED_CLASSES = ("UNetSD_T2VBase", "UNetSD_I2VGen", "UNetSD_SR600", "UNetSD_LoRA", "UNetSD_TFT2V",
                     "UNetSD_VideoLCM", "UNetSD_HiGen", "UNetSD_DreamVideo")
_COMPOSER_CLASSES = ("UNetSD_TFT2V", "UNetSD_VideoLCM")
# TF-T2V / VideoLCM compositions -> (condition name, forward argument); summed in the original's forward order.
_STC_ORDER = (("depthmap", "depth", "depth"), ("local_image", "local_image", "local_image"),
              ("motion", "motion", "motion"), ("canny", "canny", "canny"), ("sketch", "sketch", "sketch"),
              ("single_sketch", "single_sketch", "single_sketch"), ("mask", "mask", "masked"))
_COMPOSER_DEFAULTS = {"concat_dim": 8, "hist_dim": 156, "misc_dropout": 0.5, "p_all_zero": 0.1, "p_all_keep": 0.1,
                      "inpainting": True}
# UNetSD_LoRA's own constructor arguments (InstructVideo: use_lora true, rank 4, alpha null).
_LORA_DEFAULTS = {"use_lora": True, "lora_rank": 4, "lora_alpha": None}
# UNetSD_DreamVideo's own constructor arguments; a position list is indexed by sub-layer (self, cross, ff).
_DREAMVIDEO_DEFAULTS = {"spatial_adapter_list": [], "spatial_adapter_position_list": ["", "parallel", ""],
                        "spatial_adapter_hidden_dim": None, "temporal_adapter_list": [],
                        "temporal_adapter_position_list": ["parallel", "parallel", "parallel"],
                        "temporal_adapter_condition_dim": None, "temporal_adapter_hidden_dim": None}
_OWN_DEFAULTS = {"UNetSD_LoRA": _LORA_DEFAULTS, "UNetSD_DreamVideo": _DREAMVIDEO_DEFAULTS}

# Defaults of the original constructors (used when a kwarg is absent).
_ORIGINAL_DEFAULTS = {
    "in_dim": 4, "dim": 512, "y_dim": 512, "context_dim": 512, "out_dim": 6, "num_tokens": 4, "dim_mult": [1, 2, 3, 4], "num_heads": None,
    "head_dim": 64, "num_res_blocks": 3, "attn_scales": [1 / 2, 1 / 4, 1 / 8], "dropout": 0.1, "temporal_attention": True,
    "use_image_dataset": False, "use_fps_condition": False, "adapter_transformer_layers": 1, "use_checkpoint": False,
}
_CLASS_DEFAULTS = {"UNetSD_I2VGen": {"in_dim": 7}, "UNetSD_SR600": {"in_dim": 7},
                   "UNetSD_HiGen": {"num_tokens": 16, "context_embedding_depth": 4}}

_FORWARD_ARGS = {
    "UNetSD_HiGen": ("y", "spat_prior", "motion_cond", "appearance_cond", "fps"),
    "UNetSD_TFT2V": ("y", "image", "histogram", "fps", *(argument for _, _, argument in _STC_ORDER)),
    "UNetSD_VideoLCM": ("y", "image", "histogram", "fps", *(argument for _, _, argument in _STC_ORDER)),
    "UNetSD_T2VBase": ("y", "fps"),
    "UNetSD_LoRA": ("y", "fps"),
    "UNetSD_DreamVideo": ("y", "y_image", "ag_strength", "fps"),
    "UNetSD_I2VGen": ("y", "image", "local_image", "fps"),
    "UNetSD_SR600": ("y",),
}
# Forward arguments the originals accept but ignore with released configs (checked against the goldens).
_INERT_FORWARD_ARGS = {
    "UNetSD_HiGen": ("masked", "video_mask", "focus_present_mask", "prob_focus_present", "mask_last_frame_num"),
    "UNetSD_TFT2V": ("video_mask", "focus_present_mask", "prob_focus_present", "mask_last_frame_num"),
    "UNetSD_VideoLCM": ("t_w", "video_mask", "focus_present_mask", "prob_focus_present", "mask_last_frame_num"),
    "UNetSD_T2VBase": ("masked", "video_mask", "focus_present_mask", "prob_focus_present", "mask_last_frame_num"),
    "UNetSD_LoRA": ("masked", "video_mask", "focus_present_mask", "prob_focus_present", "mask_last_frame_num"),
    "UNetSD_DreamVideo": ("masked", "video_mask", "focus_present_mask", "prob_focus_present", "mask_last_frame_num"),
    "UNetSD_I2VGen": ("masked", "video_mask", "focus_present_mask", "prob_focus_present", "mask_last_frame_num"),
    "UNetSD_SR600": ("x_lr", "fps", "video_mask", "focus_present_mask", "prob_focus_present", "mask_last_frame_num"),
}


_T2V_CLASSES = ("UNetSD_T2VBase", "UNetSD_LoRA", "UNetSD_DreamVideo")
# Original forward argument -> the condition it feeds (the VideoComposer classes: their compositions' names).
_ARGUMENT_CONDITIONS = {"y": "text", "image": "image", "local_image": "first_frame", "fps": "fps",
                        "spat_prior": "prior", "motion_cond": "motion", "appearance_cond": "appearance",
                        "y_image": "appearance", "ag_strength": "appearance_strength"}
_COMPOSER_ARGUMENTS = {"y": "text", "image": "image", "histogram": "histogram", "fps": "fps",
                       **{argument: name for _, name, argument in _STC_ORDER}}


_TEXT = {"_target_": "vgen.models.conditions.TextTokens"}


def _conditions(class_name: str, kw: Mapping) -> dict:
    """The ``conditions`` of the vgen UNet equivalent to ``class_name`` built with ``kw``."""
    conditions = {"text": dict(_TEXT)}
    if class_name == "UNetSD_I2VGen":  # context order: text, 64 local tokens, image tokens; fps always used
        conditions["first_frame"] = {"_target_": "vgen.models.conditions.FirstFrame",
                                     "encoder_depth": kw["adapter_transformer_layers"]}
        conditions["image"] = {"_target_": "vgen.models.conditions.ImageTokens", "num_tokens": kw["num_tokens"],
                               "stills": "zeros"}
        conditions["fps"] = {"_target_": "vgen.models.conditions.ScalarEmbedding", "required": True,
                             "original_names": {"mlp.": "fps_embedding."}}
    elif class_name in _COMPOSER_CLASSES:
        conditions.update(_composer_conditions(class_name, kw))
    elif class_name == "UNetSD_HiGen":  # the resampled text is the whole context; cues in every frame's embedding
        conditions["text"] = {"_target_": "vgen.models.conditions.higen.TextResampler", "text_dim": kw["y_dim"],
                              "num_tokens": kw["num_tokens"], "depth": kw["context_embedding_depth"]}
        conditions["motion"] = {"_target_": "vgen.models.conditions.higen.MotionCue", "required": True}
        conditions["appearance"] = {"_target_": "vgen.models.conditions.higen.AppearanceCue", "required": True}
        conditions["prior"] = {"_target_": "vgen.models.conditions.higen.SpatialPrior", "required": True}
    elif class_name == "UNetSD_DreamVideo" and (width := _motion_condition_dim(kw)):  # the motion adapters read them
        conditions["appearance"] = {"_target_": "vgen.models.conditions.dreamvideo.AppearanceImage",
                                    "image_dim": 0 if width == kw["y_dim"] else width}  # 0: the UNet's image_dim
        conditions["appearance_strength"] = {"_target_": "vgen.models.conditions.dreamvideo.AdapterStrength"}
    if class_name in (*_T2V_CLASSES, *_COMPOSER_CLASSES, "UNetSD_HiGen") and kw["use_fps_condition"]:
        conditions["fps"] = {"_target_": "vgen.models.conditions.ScalarEmbedding",
                             "original_names": {"mlp.": "fps_embedding."}}
    return conditions


def _composer_conditions(class_name: str, kw: Mapping) -> dict:
    """TF-T2V / VideoLCM: ``config.video_compositions`` -> conditions (style image tokens after the text, one STC
    encoder per spatial/temporal composition, an optional per-frame palette token), with the class's training-time
    dropout (``misc_dropout`` per condition, text zeroed too in TF-T2V but not in VideoLCM)."""
    config = kw.get("config")
    compositions = _attribute(config, "video_compositions")
    resolution = _attribute(config, "resolution")
    if compositions is None:
        raise ValueError(f"{class_name} needs config.video_compositions, as the original reads it from its config "
                         "object")
    if resolution is not None and (len(resolution) != 2 or any(int(v) % 8 for v in resolution)):
        raise ValueError(f"{class_name}: config.resolution must be [W, H] pixels divisible by 8 (the condition "
                         f"encoders pool to H/2 x W/2 of 8x-downsampled latents), got {resolution}")
    unknown = sorted(set(compositions) - {c for c, _, _ in _STC_ORDER} - {"text", "image", "histogram"})
    if unknown:
        raise ValueError(f"{class_name}: unknown video_compositions {unknown}")
    if "mask" in compositions and not kw["inpainting"]:
        raise ValueError(f"{class_name} with inpainting=False and the mask composition is not supported (the original "
                         "builds the mask's temporal encoder without its conv encoder)")
    drop = {"dropout": kw["misc_dropout"], "drop_to": "drop"}
    conditions = {}
    if class_name == "UNetSD_TFT2V":
        conditions["text"] = {**_TEXT, **drop, "guide_to": "negative_prompt"}  # misc_dropout zeroes y as well
    if "image" in compositions:  # pre_image_condition: Linear(context, context) SiLU Linear(context, tokens x context)
        conditions["image"] = {"_target_": "vgen.models.conditions.ImageTokens", "num_tokens": kw["num_tokens"],
                               "hidden_dim": kw["context_dim"], **drop,
                               "guide_to": "zeros", "original_names": {"mlp.": "pre_image_condition."}}
    for composition, name, _ in _STC_ORDER:
        if composition in compositions:
            conditions[name] = {"_target_": "vgen.models.conditions.composer.SpatioTemporalCondition",
                                "composition": composition, "encoder_depth": kw["adapter_transformer_layers"],
                                **drop}
    if "histogram" in compositions:
        conditions["histogram"] = {"_target_": "vgen.models.conditions.composer.PaletteTokens",
                                   "bins": kw["hist_dim"], **drop}
    return conditions


def _attribute(config, name: str):
    if config is None:
        return None
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def unet_config_from_original(class_name: str, constructor_kwargs: Mapping) -> UNet3DConfig:
    """Translate an original ``cfg.UNet`` kwargs dict for ``class_name`` into a :class:`UNet3DConfig`."""
    if class_name not in SUPPORTED_CLASSES:
        raise ValueError(f"unsupported VGen UNet class {class_name!r}; supported: {list(SUPPORTED_CLASSES)}")
    own = _OWN_DEFAULTS.get(class_name, {})
    known = set(_ORIGINAL_DEFAULTS) | _INERT_KWARGS | set(own)
    unknown = sorted(set(constructor_kwargs) - known)
    if unknown:
        log.warning("ignoring constructor kwargs unknown to %s (the original accepts **kwargs): %s", class_name, unknown)
    kw = {**_ORIGINAL_DEFAULTS, **_CLASS_DEFAULTS.get(class_name, {}),
          **(_COMPOSER_DEFAULTS if class_name in _COMPOSER_CLASSES else {}), **own,
          **{k: v for k, v in constructor_kwargs.items() if k not in _LORA_DEFAULTS}}
    if kw["use_image_dataset"]:
        raise ValueError("use_image_dataset=True (temporal branches multiplied by zero) is not supported: no "
                         "released VGen config uses it")
    dim = kw["dim"]
    return UNet3DConfig(
        in_channels=kw["in_dim"],
        out_channels=kw["out_dim"],
        model_channels=dim,
        channel_mult=tuple(kw["dim_mult"]),
        num_res_blocks=kw["num_res_blocks"],
        attention_scales=tuple(kw["attn_scales"]),
        head_dim=kw["head_dim"],
        init_temporal_heads=kw["num_heads"] or dim // 32,
        context_dim=kw["context_dim"],
        temporal_attention=kw["temporal_attention"],
        dropout=kw["dropout"],
        image_dim=kw["context_dim"] if class_name in _COMPOSER_CLASSES else kw["y_dim"],
        conditions=_conditions(class_name, kw),
        concat_channels=kw["concat_dim"] if class_name in _COMPOSER_CLASSES else 0,
        temporal_identity_for_stills=class_name == "UNetSD_HiGen",
        resample="sr600" if class_name == "UNetSD_SR600" else "standard",
        skip_filters=((1.1, 0.6), (1.2, 0.4)) if class_name == "UNetSD_SR600" else (),
        # the original wraps each ResBlock / SpatialTransformer / TemporalTransformer in checkpoint_wrapper
        gradient_checkpointing=bool(kw["use_checkpoint"]),
    )


def build_unet(class_name: str, constructor_kwargs: Mapping) -> UNet3D:
    """Build the vgen equivalent of VGen's ``class_name(**constructor_kwargs)``."""
    lora = {**_LORA_DEFAULTS, **{k: v for k, v in constructor_kwargs.items() if k in _LORA_DEFAULTS}}
    if class_name == "UNetSD_LoRA" and lora["lora_alpha"] is not None:
        raise ValueError(f"UNetSD_LoRA with lora_alpha={lora['lora_alpha']!r} is not supported: the original "
                         "LoRA.forward fails with alpha set (it reads an unassigned self.rank); use null")
    model = UNet3D(unet_config_from_original(class_name, constructor_kwargs))
    if class_name == "UNetSD_LoRA" and lora["use_lora"]:  # use_lora false: the plain T2V network (VGen's merge base)
        apply_lora(model, lora["lora_rank"], None, ATTENTION_TARGETS)
    if class_name == "UNetSD_DreamVideo":
        model.vgen_adapters = dreamvideo_adapters(constructor_kwargs)
        for adapter in model.vgen_adapters.values():
            adapter.apply(model)
    model.vgen_original_class = class_name
    return model


def _motion_condition_dim(kw: Mapping) -> int | None:
    return (kw.get("temporal_adapter_condition_dim") or None) if kw.get("temporal_adapter_list") else None


def _sublayers(names, positions, kind: str) -> dict[str, str]:
    """The original's adapter list and per-sub-layer position list -> ``{sub-layer: position}``."""
    order = ("self_attention", "cross_attention", "feedforward")
    unknown = sorted(set(names) - set(order))
    if unknown:
        raise ValueError(f"UNetSD_DreamVideo: unknown {kind}_adapter_list entries {unknown}; valid: {list(order)}")
    chosen = {}
    for index, name in enumerate(order):
        if name in names:
            position = positions[index] if index < len(positions) else ""
            if position not in ("parallel", "serial"):
                log.warning("UNetSD_DreamVideo: the %s %s adapter has position %r: built (its weights load) but not "
                            "applied", kind, name, position)
                position = "none"
            chosen[name] = position
    return chosen


def dreamvideo_adapters(constructor_kwargs: Mapping) -> dict:
    """The :mod:`vgen.models.dreamvideo` adapters of ``UNetSD_DreamVideo(**constructor_kwargs)``: ``identity``
    (spatial) and ``motion`` (temporal), those its adapter lists ask for."""
    kw = {**_DREAMVIDEO_DEFAULTS, **constructor_kwargs}
    adapters = {}
    if kw["spatial_adapter_list"]:
        adapters["identity"] = IdentityAdapter(
            _sublayers(kw["spatial_adapter_list"], kw["spatial_adapter_position_list"], "spatial"),
            hidden_dim=kw["spatial_adapter_hidden_dim"])
    if kw["temporal_adapter_list"] and kw.get("temporal_attention", True):
        conditioned = _motion_condition_dim(kw) is not None
        adapters["motion"] = MotionAdapter(
            _sublayers(kw["temporal_adapter_list"], kw["temporal_adapter_position_list"], "temporal"),
            hidden_dim=kw["temporal_adapter_hidden_dim"], condition="appearance" if conditioned else None,
            strength="appearance_strength" if conditioned else None)
    return adapters


def _prefix_rules(model: nn.Module) -> list[tuple[str, str]]:
    """(our key prefix, original key prefix) of ``model``'s condition modules (:attr:`Condition.original_names`)."""
    conditions = getattr(model, "conditions", None)
    return list(original_names(conditions).items()) if conditions is not None else []


def to_original_key(key: str, rules: list[tuple[str, str]] = ()) -> str:
    """Our state-dict key -> the original's, given the model's condition prefix ``rules`` (:func:`_prefix_rules`)."""
    for ours, theirs in rules:
        if key.startswith(ours):
            key = theirs + key[len(ours):]
            break
    for ours, theirs in _INNER_RULES:
        key = key.replace(ours, theirs)
    return key


def original_key_map(model: nn.Module) -> dict[str, str]:
    """``{our state-dict key: the original VGen key}`` for every entry of ``model.state_dict()``."""
    rules = _prefix_rules(model)
    return {key: to_original_key(key, rules) for key in model.state_dict()}


def _original_rank(key: str) -> int:
    top = key.split(".", 1)[0]
    return _ORIGINAL_ORDER.index(top) if top in _ORIGINAL_ORDER else len(_ORIGINAL_ORDER)


def _original_order(keys: list[str]) -> list[str]:
    """The original lists an attention's LoRA keys after all of that attention's own weights."""
    adapters: dict[str, list[str]] = {}
    for key in keys:
        match = _ORIGINAL_LORA_KEY.match(key)
        if match:
            adapters.setdefault(match.group(1), []).append(key)
    if not adapters:
        return keys
    base = [k for k in keys if not _ORIGINAL_LORA_KEY.match(k)]
    ordered = []
    for i, key in enumerate(base):
        ordered.append(key)
        owner = key.rsplit(".to_", 1)[0] if ".to_" in key else None
        following = base[i + 1] if i + 1 < len(base) else ""
        if owner in adapters and not following.startswith(owner + ".to_"):
            ordered.extend(adapters.pop(owner))
    return ordered + [k for group in adapters.values() for k in group]


def state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's weights under the original key names (same shapes, and the original's order)."""
    names = original_key_map(model)
    renamed = [(names[k], v) for k, v in model.state_dict().items()]
    renamed.sort(key=lambda item: _original_rank(item[0]))  # stable: module order within each top-level module
    renamed = OrderedDict(renamed)
    return OrderedDict((k, renamed[k]) for k in _original_order(list(renamed)))


def load_state_dict(model: nn.Module, original_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an original VGen state dict strictly.

    Accepts the raw dict or a ``{'state_dict': ...}`` checkpoint, and strips a DDP ``module.`` prefix. Raises
    ``KeyError`` listing every missing, unexpected and shape-mismatched key (original names) before touching the
    model. Values are cast to each parameter's dtype (e.g. fp16 checkpoints into an fp32 model).
    """
    if "state_dict" in original_state_dict and isinstance(original_state_dict["state_dict"], Mapping):
        original_state_dict = original_state_dict["state_dict"]
    not_tensors = [k for k, v in original_state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"state dict values must be tensors; not tensors: {not_tensors[:10]}")
    expected = state_dict(model)
    given = OrderedDict(
        (k.removeprefix("module."), v) for k, v in original_state_dict.items()
    )
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"state dict does not match {getattr(model, 'vgen_original_class', type(model).__name__)}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise KeyError("\n".join(lines))
    ours = {theirs: key for key, theirs in original_key_map(model).items()}
    model.load_state_dict(OrderedDict((ours[k], v) for k, v in given.items()), strict=True)


def forward(model: UNet3D, x: torch.Tensor, t: torch.Tensor, **original_inputs) -> torch.Tensor:
    """Call ``model`` with the original forward argument names (``y``, ``image``, ``local_image``, ``fps``...)."""
    class_name = getattr(model, "vgen_original_class", None)
    if class_name is None:
        raise ValueError("model was not built by vgen.compat.vgen.build_unet; call it directly instead")
    used, inert = _FORWARD_ARGS[class_name], _INERT_FORWARD_ARGS[class_name]
    unknown = sorted(set(original_inputs) - set(used) - set(inert))
    if unknown:
        raise TypeError(f"{class_name}.forward got unexpected arguments {unknown}; accepted: {list(used + inert)}")
    conditions = {}
    names = _COMPOSER_ARGUMENTS if class_name in _COMPOSER_CLASSES else _ARGUMENT_CONDITIONS
    for argument, value in original_inputs.items():
        name = names.get(argument)
        if value is not None and name in model.conditions:  # e.g. fps without use_fps_condition is ignored
            conditions[name] = value
    return model(x, t, conditions)
