"""VideoComposer's trained sketch: PiDiNet edges, then the sketch-simplification network.

**PiDiNet** (Su et al., "Pixel Difference Networks for Efficient Edge Detection", ICCV 2021) convolves pixel
*differences* instead of pixel values. Each 3x3 "pixel-difference convolution" is a plain convolution with a kernel
derived from the learned weights, so the network here holds plain convolutions and converts weights stored in the
pixel-difference form when loading them:

* ``cv`` (vanilla): the kernel as it is.
* ``cd`` (central difference, sum of ``w_i * (x_i - x_centre)``): the centre tap minus the sum of all taps.
* ``ad`` (angular difference, sum of ``w_i * (x_i - x_next)`` around the 3x3 ring, clockwise): each ring tap
  minus the tap of its clockwise predecessor; the centre tap cancels.
* ``rd`` (radial difference, a 5x5 kernel: ``w_k * (x_outer_k - x_inner_k)`` for the 8 directions): the 8 outer
  taps of the 5x5 ring get the weights, the 8 taps of the inner 3x3 ring their negatives. The stored 3x3 weight's
  taps 1..8 (raster order, i.e. without the top-left one and *including* the centre one) are the 8 directions'
  weights in raster order of the 5x5 ring positions, as in the released checkpoints.

VideoComposer uses the BSDS model "table5_pidinet": 60 base channels, the ``carv4`` layout (per block, repeated 4
times: ``cd``, ``ad``, ``rd``, ``cv``, the first of them the initial 3 -> 60 convolution), compact dilation modules
with 24 channels and compact spatial attention before each of the 4 side outputs, which are upsampled, fused by a
1x1 convolution and squashed by a sigmoid: an edge probability per pixel (edges ~1). Its input is an RGB frame in
[0, 1] normalised with the ImageNet mean and std.

**Sketch simplification** (Simo-Serra et al., "Mastering Sketching", 2018; VideoComposer's
``sketch_simplification_gan``): a 23-convolution encoder-decoder (3 stride-2 convolutions down, 3 transposed ones up)
that cleans a dark-on-light line drawing; its input is normalised by fixed statistics and its output is a sigmoid.
VideoComposer's sketch is ``1 - simplifier(1 - pidinet(frame))``: lines ~1 on 0.

Weights come from files only (no download): :func:`load_pidinet` and :func:`load_sketch_simplifier` read
safetensors or weights-only torch files (pickles that would run code are refused, naming the file), in the released
key layout (optionally under ``state_dict`` and with a ``module.`` prefix), and load them strictly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vgen.data.conditions.frames import to_unit
from vgen.data.conditions.weights import load_strict, read_state_dict

CARV4 = ("cd", "ad", "rd", "cv") * 4
"""Pixel-difference type of the 16 convolutions (initial block, then blocks 1_1 .. 4_4) of table5_pidinet."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Blocks in order, (name, stage); the first block of stages 2-4 halves the resolution.
BLOCKS = tuple((f"block{stage}_{index}", stage) for stage, count in ((1, 3), (2, 4), (3, 4), (4, 4))
               for index in range(1, count + 1))

PDC_WEIGHTS = ("init_block.weight", *(f"{name}.conv1.weight" for name, _ in BLOCKS))
"""The 16 pixel-difference convolutions' weights, in :data:`CARV4` order."""

# 3x3 ring positions (raster indices) in clockwise order from the top-left, and for each position the clockwise
# predecessor whose value the angular difference subtracts.
_RING = (0, 1, 2, 5, 8, 7, 6, 3)
_PREDECESSOR = {position: _RING[index - 1] for index, position in enumerate(_RING)} | {4: 4}
# 5x5 raster indices of the 8 directions' outer (distance 2) and inner (distance 1) taps, in raster order.
_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
_INNER = (6, 7, 8, 11, 13, 16, 17, 18)


def pdc_kernel(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """A pixel-difference convolution's stored weight [O, I, 3, 3] -> the equivalent plain kernel ([O, I, 3, 3],
    or [O, I, 5, 5] for ``rd``), see the module notes."""
    if weight.ndim != 4 or tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"a pixel-difference weight is [O, I, 3, 3], got {tuple(weight.shape)}")
    flat = weight.flatten(2)
    if kind == "cv":
        return weight.clone()
    if kind == "cd":
        out = flat.clone()
        out[:, :, 4] -= flat.sum(2)
        return out.view_as(weight)
    if kind == "ad":
        predecessor = [_PREDECESSOR[i] for i in range(9)]
        return (flat - flat[:, :, predecessor]).view_as(weight)
    if kind == "rd":
        out = flat.new_zeros(*flat.shape[:2], 25)
        out[:, :, list(_OUTER)] = flat[:, :, 1:]
        out[:, :, list(_INNER)] = -flat[:, :, 1:]
        return out.view(*flat.shape[:2], 5, 5)
    raise ValueError(f"unknown pixel-difference type {kind!r}; choose from cv, cd, ad, rd")


class PDCBlock(nn.Module):
    """Depthwise (pixel-difference) conv -> ReLU -> 1x1 conv, plus the input; a strided block max-pools first and
    projects the shortcut with a 1x1 conv."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, downsample: bool = False):
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        size = 5 if kind == "rd" else 3
        self.conv1 = nn.Conv2d(in_channels, in_channels, size, padding=size // 2, groups=in_channels, bias=False)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = self.pool(x)
        y = self.conv2(self.relu2(self.conv1(x)))
        return y + (self.shortcut(x) if self.downsample else x)


class CDCM(nn.Module):
    """Compact dilation convolution module: ReLU, 1x1 conv, then the sum of four 3x3 convs dilated 5, 7, 9, 11."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        for index, rate in enumerate((5, 7, 9, 11), start=1):
            setattr(self, f"conv2_{index}",
                    nn.Conv2d(out_channels, out_channels, 3, dilation=rate, padding=rate, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.relu1(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class CSAM(nn.Module):
    """Compact spatial attention: the input times sigmoid(3x3 conv(1x1 conv to 4 channels(ReLU(input))))."""

    def __init__(self, channels: int, hidden: int = 4):
        super().__init__()
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size=3, padding=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.conv2(self.conv1(self.relu1(x))))


class MapReduce(nn.Module):
    """1x1 conv to one side-output map."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """PiDiNet with plain convolutions (weights in the pixel-difference form are converted by :func:`load_pidinet`).

    Args:
        channels: base width (table5_pidinet: 60; the 4 stages have 1, 2, 4, 4 times it).
        dilation: channels of the compact dilation modules (24), or ``None`` for none.
        attention: compact spatial attention before each side output (True).
        layout: the pixel-difference type of the 16 convolutions (:data:`CARV4`); it decides which depthwise
            convolutions are 5x5 (``rd``) and how stored weights are converted.

    ``forward``: ImageNet-normalised RGB [N, 3, H, W] -> edge probability [N, 1, H, W] in (0, 1).
    """

    def __init__(self, channels: int = 60, dilation: int | None = 24, attention: bool = True,
                 layout: Sequence[str] = CARV4):
        super().__init__()
        layout = tuple(layout)
        if len(layout) != 16 or any(kind not in ("cv", "cd", "ad", "rd") for kind in layout):
            raise ValueError(f"layout must name 16 pixel-difference types (cv, cd, ad, rd), got {layout}")
        self.layout, self.channels, self.dilation, self.attention = layout, channels, dilation, attention
        size = 5 if layout[0] == "rd" else 3
        self.init_block = nn.Conv2d(3, channels, size, padding=size // 2, bias=False)
        widths = {1: channels, 2: 2 * channels, 3: 4 * channels, 4: 4 * channels}
        previous = channels
        for (name, stage), kind in zip(BLOCKS, layout[1:]):
            first = name.endswith("_1") and stage > 1
            setattr(self, name, PDCBlock(kind, previous, widths[stage], downsample=first))
            previous = widths[stage]
        side = [widths[stage] for stage in (1, 2, 3, 4)]
        if dilation is not None:
            self.dilations = nn.ModuleList(CDCM(width, dilation) for width in side)
            side = [dilation] * 4
        if attention:
            self.attentions = nn.ModuleList(CSAM(width) for width in side)
        self.conv_reduces = nn.ModuleList(MapReduce(width) for width in side)
        self.classifier = nn.Conv2d(4, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = self.init_block(x)
        stages = []
        for name, stage in BLOCKS:
            if name.endswith("_1") and stage > 1:
                stages.append(x)
            x = getattr(self, name)(x)
        stages.append(x)
        sides = []
        for index, feature in enumerate(stages):
            if self.dilation is not None:
                feature = self.dilations[index](feature)
            if self.attention:
                feature = self.attentions[index](feature)
            side = self.conv_reduces[index](feature)
            sides.append(F.interpolate(side, (height, width), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.classifier(torch.cat(sides, dim=1)))


# The simplifier's layers: (kind, out channels at full width, kernel, stride, padding); "up" = transposed conv.
_SIMPLIFIER = (
    ("conv", 48, 5, 2, 2), ("conv", 128, 3, 1, 1), ("conv", 128, 3, 1, 1), ("conv", 128, 3, 2, 1),
    ("conv", 256, 3, 1, 1), ("conv", 256, 3, 1, 1), ("conv", 256, 3, 2, 1), ("conv", 512, 3, 1, 1),
    ("conv", 1024, 3, 1, 1), ("conv", 1024, 3, 1, 1), ("conv", 1024, 3, 1, 1), ("conv", 1024, 3, 1, 1),
    ("conv", 512, 3, 1, 1), ("conv", 256, 3, 1, 1), ("up", 256, 4, 2, 1), ("conv", 256, 3, 1, 1),
    ("conv", 128, 3, 1, 1), ("up", 128, 4, 2, 1), ("conv", 128, 3, 1, 1), ("conv", 48, 3, 1, 1),
    ("up", 48, 4, 2, 1), ("conv", 24, 3, 1, 1), ("conv", 1, 3, 1, 1),
)
SIMPLIFIER_MEAN, SIMPLIFIER_STD = 0.9664114577640158, 0.0858381272736797  # the GAN model's input statistics


class SketchSimplifier(nn.Module):
    """The sketch-simplification network: grey [N, 1, H, W] in [0, 1], dark lines on light, H and W multiples of 8
    -> cleaned drawing [N, 1, H, W] in (0, 1), same polarity.

    ``divisor`` divides every hidden width (1 = the released network, ~44M parameters; larger for tests).
    Submodules are ``layers.<i>`` with convolutions at even indices and ReLUs between them, as in the released
    weights.
    """

    def __init__(self, divisor: int = 1, mean: float = SIMPLIFIER_MEAN, std: float = SIMPLIFIER_STD):
        super().__init__()
        if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1 or 24 % divisor:
            raise ValueError(f"divisor must be an integer dividing 24, got {divisor!r}")
        self.divisor, self.mean, self.std = divisor, float(mean), float(std)
        layers: list[nn.Module] = []
        previous = 1
        for index, (kind, width, kernel, stride, padding) in enumerate(_SIMPLIFIER):
            width = width if index == len(_SIMPLIFIER) - 1 else width // divisor
            conv = nn.ConvTranspose2d if kind == "up" else nn.Conv2d
            layers += [conv(previous, width, kernel, stride, padding), nn.ReLU(inplace=True)]
            previous = width
        layers[-1] = nn.Sigmoid()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std)


def convert_pidinet_state(state: Mapping[str, torch.Tensor], layout: Sequence[str] = CARV4) -> dict[str, torch.Tensor]:
    """A PiDiNet state dict in the pixel-difference form (as trained and released) -> plain-convolution weights.

    Only the 16 (pixel-difference) convolutions change: ``init_block.weight`` and ``block*_*.conv1.weight``.
    """
    out = dict(state)
    for name, kind in zip(PDC_WEIGHTS, layout):
        if name in out:
            out[name] = pdc_kernel(kind, out[name].float())
    return out


def load_pidinet(path: str | Path, layout: Sequence[str] = CARV4) -> PiDiNet:
    """Load a PiDiNet weights file (e.g. VideoComposer's ``table5_pidinet.pth``) strictly -> an eval-mode model.

    The architecture (base width, dilation channels, attention) is read off the weights. Weights in the
    pixel-difference form (``rd`` convolutions stored 3x3, as released) are converted; weights already converted
    to plain convolutions (``rd`` 5x5) are taken as they are. Raises naming the file for anything else.
    """
    state = read_state_dict(path, "PiDiNet")
    try:
        channels = state["init_block.weight"].shape[0]
        dilation = state["dilations.0.conv1.weight"].shape[0] if "dilations.0.conv1.weight" in state else None
    except KeyError:
        raise ValueError(f"{path}: not a PiDiNet state dict (no init_block.weight)") from None
    attention = "attentions.0.conv1.weight" in state
    rd = [name for name, kind in zip(PDC_WEIGHTS, layout) if kind == "rd"]
    if rd and rd[0] in state and tuple(state[rd[0]].shape[-2:]) == (3, 3):
        state = convert_pidinet_state(state, layout)
    model = PiDiNet(channels, dilation, attention, layout)
    load_strict(model, state, path, f"PiDiNet (channels {channels}, dilation {dilation}, attention {attention})")
    return model.eval().requires_grad_(False)


def load_sketch_simplifier(path: str | Path) -> SketchSimplifier:
    """Load sketch-simplification weights (``layers.<i>.weight/bias``, e.g. ``sketch_simplification_gan.pth``)
    strictly -> an eval-mode :class:`SketchSimplifier` (its width is read off the weights)."""
    state = read_state_dict(path, "sketch simplifier")
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 4 or 48 % first.shape[0]:
        raise ValueError(f"{path}: not a sketch-simplifier state dict (layers.0.weight must be [48/d, 1, 5, 5])")
    divisor = 48 // first.shape[0]
    if 24 % divisor:
        raise ValueError(f"{path}: unsupported sketch-simplifier width (layers.0.weight {tuple(first.shape)})")
    model = SketchSimplifier(divisor)
    load_strict(model, state, path, f"sketch simplifier (width 1/{divisor})")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def pidinet_sketch(frames, pidinet: PiDiNet, simplifier: SketchSimplifier | None = None,
                   batch_size: int = 8) -> torch.Tensor:
    """VideoComposer's sketch of each frame -> float32 [1, F, H, W] in [0, 1] (lines ~1, background ~0), on CPU.

    ``frames`` uint8 [F, H, W, 3] -> [0, 1] -> ImageNet mean/std -> ``pidinet`` -> with a ``simplifier``,
    ``1 - simplifier(1 - edges)`` (the input padded with white to multiples of 8, cropped back). Runs on the
    networks' device and dtype, ``batch_size`` frames at a time.
    """
    parameter = next(pidinet.parameters())
    mean = torch.tensor(IMAGENET_MEAN, device=parameter.device, dtype=parameter.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=parameter.device, dtype=parameter.dtype).view(1, 3, 1, 1)
    out = []
    for chunk in to_unit(frames).split(batch_size):
        chunk = chunk.to(device=parameter.device, dtype=parameter.dtype)
        edges = pidinet((chunk - mean) / std)
        if simplifier is not None:
            height, width = edges.shape[-2:]
            pad = (0, -width % 8, 0, -height % 8)
            drawing = F.pad(1.0 - edges, pad, value=1.0)
            edges = 1.0 - simplifier(drawing.to(next(simplifier.parameters())))[..., :height, :width]
        out.append(edges.float().cpu())
    return torch.cat(out).clamp_(0, 1).permute(1, 0, 2, 3).contiguous()
