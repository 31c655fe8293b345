"""Depth maps with a DPT (MiDaS v3) model from Hugging Face ``transformers`` (VideoComposer's ``depthmap``).

VideoComposer runs MiDaS v3 DPT-Large (its own re-implementation, weights ``midas_v3_dpt_large.pth``) on frames
in [-1, 1] and uses ``(prediction / depth_std).clamp(0, depth_clamp)`` with ``depth_std = 20``,
``depth_clamp = 10``: relative inverse depth (near is large), **not** rescaled to [0, 1] -- the maps that the
released STC encoders saw are in [0, 10]. :class:`DepthEstimator` does the same with
``transformers.DPTForDepthEstimation`` (the same DPT-Large MiDaS v3 network, e.g. the ``Intel/dpt-large`` weights,
downloaded beforehand into a folder); ``normalize=True`` divides by ``depth_clamp`` for maps in [0, 1].

Differences from the original: the ViT-DPT of ``transformers`` takes square inputs only, so frames are resized to
a square of ``input_size`` (the model's ``image_size``, 384 for DPT-Large) and the prediction is resized back
(bilinear), where the original fed the frames at their own size; and the model runs in the dtype it is given
(the original ran it in fp16 on the GPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vgen.data.conditions.frames import to_unit
from vgen.data.conditions.weights import load_strict, read_state_dict

DEPTH_STD = 20.0
DEPTH_CLAMP = 10.0


class DepthEstimator(nn.Module):
    """A DPT depth model with VideoComposer's normalisation.

    Args:
        model: a ``transformers.DPTForDepthEstimation``.
        depth_std, depth_clamp: the prediction is divided by ``depth_std`` and clamped to [0, ``depth_clamp``].
        normalize: also divide by ``depth_clamp`` (maps in [0, 1] instead of the original's [0, 10]).
        input_size: the square side the frames are resized to (default: the model config's ``image_size``).

    ``forward``: RGB [N, 3, H, W] in [0, 1] -> depth [N, 1, H, W] in [0, depth_clamp] (or [0, 1]); larger is
    nearer.
    """

    def __init__(self, model: nn.Module, depth_std: float = DEPTH_STD, depth_clamp: float = DEPTH_CLAMP,
                 normalize: bool = False, input_size: int | None = None):
        super().__init__()
        if not depth_std > 0 or not depth_clamp > 0:
            raise ValueError(f"depth_std and depth_clamp must be > 0, got {depth_std} and {depth_clamp}")
        self.model = model
        self.depth_std, self.depth_clamp, self.normalize = float(depth_std), float(depth_clamp), normalize
        config = getattr(model, "config", None)
        self.input_size = int(input_size or getattr(config, "image_size", 384))
        patch = int(getattr(config, "patch_size", 16) or 16)
        if self.input_size % patch:
            raise ValueError(f"input_size must be a multiple of the patch size {patch}, got {self.input_size}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = x.clamp(0, 1) * 2.0 - 1.0  # MiDaS / DPT input: [-1, 1] (mean 0.5, std 0.5)
        depth = self.model(pixel_values=x).predicted_depth
        if depth.ndim == 3:
            depth = depth[:, None]
        depth = F.interpolate(depth.float(), size=(height, width), mode="bilinear", align_corners=False)
        depth = (depth / self.depth_std).clamp(0.0, self.depth_clamp)
        return depth / self.depth_clamp if self.normalize else depth


def load_depth_estimator(path: str | Path, **kwargs) -> DepthEstimator:
    """A :class:`DepthEstimator` from local weights, in eval mode; ``kwargs`` go to :class:`DepthEstimator`.

    ``path`` is a ``transformers`` model folder (``config.json`` with ``model.safetensors``, or a
    ``pytorch_model.bin`` that transformers reads weights-only), or a weights file (``.safetensors``, or a torch
    file read weights-only) with the model's ``config.json`` beside it. Nothing is downloaded. Missing, unexpected
    or wrongly shaped weights raise, naming the path.
    """
    from transformers import DPTConfig, DPTForDepthEstimation

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"depth model weights not found: {path}")
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json beside the depth model weights ({config_file})")
    try:
        config = DPTConfig.from_json_file(str(config_file))
    except (ValueError, OSError) as exc:
        raise ValueError(f"{config_file}: not a DPT config: {exc}") from None
    if path.is_dir():
        if not any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in the depth model folder")
        try:
            model, info = DPTForDepthEstimation.from_pretrained(str(path), local_files_only=True,
                                                                output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path}: cannot load the DPT depth model: {' '.join(str(exc).split())[:300]}") from None
        problems = [f"{label}: {', '.join(map(str, keys[:5]))}" for label, keys in (
            ("missing", sorted(info.get("missing_keys", ()))),
            ("unexpected", sorted(info.get("unexpected_keys", ()))),
            ("wrong shape", sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                   for k in info.get("mismatched_keys", ())))) if keys]
        if problems:
            raise ValueError(f"{path}: does not match its DPT config ({'; '.join(problems)})")
    else:
        model = DPTForDepthEstimation(config)
        load_strict(model, read_state_dict(path, "depth model"), path, f"DPT depth model of {config_file}")
    return DepthEstimator(model.eval().requires_grad_(False), **kwargs).eval()


@torch.no_grad()
def depth_map(frames, estimator: DepthEstimator, batch_size: int = 8) -> torch.Tensor:
    """Depth of each frame -> float32 [1, F, H, W] in [0, depth_clamp] (or [0, 1] if the estimator normalises),
    larger = nearer, on CPU. ``frames`` uint8 [F, H, W, 3]; runs on the model's device and dtype."""
    parameter = next(estimator.parameters())
    out = []
    for chunk in to_unit(frames).split(batch_size):
        out.append(estimator(chunk.to(device=parameter.device, dtype=parameter.dtype)).float().cpu())
    return torch.cat(out).permute(1, 0, 2, 3).contiguous()
