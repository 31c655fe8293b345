"""Image bytes (jpg, png, webp) -> uint8 RGB frames with PIL."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from vgen.data.errors import SampleError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def decode_image(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] RGB, upright per the EXIF orientation; :class:`SampleError` if undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SampleError(f"undecodable image ({len(data)} bytes): {exc}") from exc
