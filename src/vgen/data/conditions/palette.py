"""A per-frame colour palette histogram (VideoComposer's optional ``histogram`` condition, 156 bins).

VideoComposer feeds a 156-bin palette histogram per frame to ``hist_context_embedding``; its extractor is not in
the released code, so the binning here is this project's own, documented, with the same number of bins. Colours
are binned perceptually in CIE LCh (CIELab, D65, in polar form):

* 12 **grey** bins: chroma C < 10, by lightness L in 12 equal steps of [0, 100];
* 144 **colour** bins: 12 hue sectors of 30 degrees (the first centred on h = 0, the +a* axis: red-magenta)
  x 3 chroma rings (C in [10, 30), [30, 60), [60, inf)) x 4 lightness steps (L in [0, 25), [25, 50), [50, 75),
  [75, 100]); index ``12 + (hue * 3 + ring) * 4 + step``.

Each frame's histogram is the fraction of its pixels in each bin (it sums to 1).
"""

from __future__ import annotations

import torch

from vgen.data.conditions.frames import to_unit

GREYS, HUES, RINGS, STEPS = 12, 12, 3, 4
PALETTE_BINS = GREYS + HUES * RINGS * STEPS  # 156
GREY_CHROMA = 10.0
RING_EDGES = (30.0, 60.0)

_D65 = (0.95047, 1.0, 1.08883)
_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], channels on dim -3 -> CIELab (D65): L in [0, 100], a and b about [-128, 127]."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,...jhw->...ihw", _RGB_TO_XYZ.to(rgb), linear)
    xyz = xyz / torch.tensor(_D65, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def palette_bins(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB [..., 3, H, W] in [0, 1] -> the palette bin of every pixel, int64 [..., H, W] in [0, 156)."""
    lightness, a, b = rgb_to_lab(rgb).unbind(-3)
    lightness = lightness.clamp(0.0, 100.0)
    chroma = torch.hypot(a, b)
    grey = (lightness / (100.0 / GREYS)).long().clamp_(max=GREYS - 1)
    hue = (torch.rad2deg(torch.atan2(b, a)) % 360.0 + 15.0) % 360.0  # sector 0 is centred on 0 degrees
    sector = (hue / (360.0 / HUES)).long().clamp_(max=HUES - 1)
    ring = torch.bucketize(chroma, torch.tensor(RING_EDGES, dtype=chroma.dtype, device=chroma.device), right=True)
    step = (lightness / (100.0 / STEPS)).long().clamp_(max=STEPS - 1)
    colour = GREYS + (sector * RINGS + ring) * STEPS + step
    return torch.where(chroma < GREY_CHROMA, grey, colour)


def palette_histogram(frames, bins: int = PALETTE_BINS) -> torch.Tensor:
    """The colour palette of each frame -> float32 [F, 156], each row summing to 1 (see the module notes).

    ``frames`` uint8 [F, H, W, 3]; ``bins`` must be 156 (the layout above; VideoComposer's ``hist_dim``). The
    output is what :class:`vgen.models.conditions.PaletteTokens` takes, one [F, bins] row per sample.
    """
    if bins != PALETTE_BINS:
        raise ValueError(f"bins must be {PALETTE_BINS} (12 greys + 12 hues x 3 chroma rings x 4 lightness steps), "
                         f"got {bins!r}")
    video = to_unit(frames)  # [F, 3, H, W]
    index = palette_bins(video).flatten(1)  # [F, H*W]
    counts = torch.zeros(video.shape[0], PALETTE_BINS).scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts / index.shape[1]
