"""Weight-free edge conditions (kornia filters): Canny edges (VideoComposer's ``canny``) and the default ``sketch``.

The trained sketch of VideoComposer is PiDiNet followed by a sketch-simplification network
(:mod:`vgen.data.conditions.pidinet`, weights from files). :func:`sketch` is the classical stand-in that needs no
weights: a soft edge-strength map, high on the lines of the frame and 0 on flat areas, in the same range and
polarity as PiDiNet's (lines ~1, background 0).
"""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F

from vgen.data.conditions.frames import to_unit


def canny_edges(frames, low_threshold: float = 0.1, high_threshold: float = 0.2, sigma: float = 1.0,
                batch_size: int = 32) -> torch.Tensor:
    """Canny edges of each frame -> float32 [1, F, H, W] in {0, 1}, 1 on edge pixels (lines 1 px wide).

    ``frames`` uint8 [F, H, W, 3] in [0, 1] -> Gaussian blur ``sigma`` -> Sobel gradients of each colour channel,
    keeping per pixel the channel with the largest magnitude (so boundaries between colours of equal brightness
    count, as with OpenCV on colour images) -> non-maximum suppression across the gradient -> hysteresis: pixels
    above ``high_threshold`` and those above ``low_threshold`` connected to them. The thresholds apply to kornia's
    normalised Sobel magnitude (a clean step of height 1 gives about 0.4 after the blur). VGen's detector draws
    its thresholds from the median intensity at random per frame; fixed ones keep stored conditions reproducible.
    """
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"need 0 <= low_threshold <= high_threshold, got {low_threshold} and {high_threshold}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    video = to_unit(frames)
    return torch.cat([_canny(chunk, low_threshold, high_threshold, sigma) for chunk in video.split(batch_size)]
                     ).permute(1, 0, 2, 3).contiguous()


def _colour_gradient(video: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, C, H, W] -> (gx, gy, magnitude), each [N, 1, H, W], from the channel with the strongest gradient."""
    if sigma > 0:
        kernel = 2 * max(1, round(2 * sigma)) + 1
        video = kornia.filters.gaussian_blur2d(video, (kernel, kernel), (sigma, sigma))
    gradient = kornia.filters.spatial_gradient(video, mode="sobel", normalized=True)  # [N, C, 2, H, W]
    magnitude = gradient.pow(2).sum(2).sqrt()
    channel = magnitude.argmax(1, keepdim=True)  # [N, 1, H, W]
    gx = gradient[:, :, 0].gather(1, channel)
    gy = gradient[:, :, 1].gather(1, channel)
    return gx, gy, magnitude.gather(1, channel)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[y, x] = x[y + dy, x + dx], zero outside."""
    padded = F.pad(x, (1, 1, 1, 1))
    height, width = x.shape[-2:]
    return padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def _canny(video: torch.Tensor, low: float, high: float, sigma: float) -> torch.Tensor:
    gx, gy, magnitude = _colour_gradient(video, sigma)
    # Gradient direction quantised to 0, 45, 90 or 135 degrees (image y points down); the neighbours across the
    # edge are the pixels one step along and against it.
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    sector = (((angle + 22.5) // 45) % 4).long()
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead, behind = _shift(magnitude, dy, dx), _shift(magnitude, -dy, -dx)
        keep |= (sector == index) & (magnitude > ahead) & (magnitude >= behind)
    thin = magnitude * keep
    strong, weak = thin >= max(high, 1e-6), thin >= max(low, 1e-6)
    edges = strong
    for _ in range(edges.shape[-1] * edges.shape[-2]):  # grow along weak pixels until nothing changes
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.float()


def sketch(frames, gain: float = 2.0, floor: float = 0.05, sigma: float = 0.0, batch_size: int = 32) -> torch.Tensor:
    """The weight-free default sketch: edge strength of each frame -> float32 [1, F, H, W] in [0, 1].

    ``frames`` uint8 [F, H, W, 3] in [0, 1] -> optional Gaussian blur ``sigma`` (0: none) -> normalised Sobel
    magnitude ``m`` of the colour channel with the strongest gradient (a clean 0 -> 1 step gives 0.5 on the two
    pixels beside it) -> ``clamp((gain * m - floor) / (1 - floor), 0, 1)``: full-contrast outlines are ~1, fainter
    ones proportionally weaker, and gradients below ``floor / gain`` (compression noise) 0. Without blur the lines
    are 2 px wide (the pixels on both sides of a boundary).
    """
    if not gain > 0 or not 0 <= floor < 1 or sigma < 0:
        raise ValueError(f"need gain > 0, 0 <= floor < 1 and sigma >= 0, got {gain}, {floor} and {sigma}")
    video = to_unit(frames)
    out = []
    for chunk in video.split(batch_size):
        _, _, magnitude = _colour_gradient(chunk, sigma)
        out.append(((gain * magnitude - floor) / (1 - floor)).clamp_(0, 1))
    return torch.cat(out).permute(1, 0, 2, 3).contiguous()
