"""Network definitions: the UNet3D trunk, its blocks and condition pathways. No training logic lives here."""

from vgen.models.attention import get_attention_backend, set_attention_backend
from vgen.models.unet3d import UNet3D, UNet3DConfig

__all__ = ["UNet3D", "UNet3DConfig", "get_attention_backend", "set_attention_backend"]
