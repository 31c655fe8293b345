"""Video and image data: PyAV/PIL decoding, transforms, WebDataset streams, the datamodule, folder inputs
(DreamVideo), demo data.

The torch/Lightning parts (:class:`VideoDataModule`, the streams, the transforms) load on first use, so
tools that only render or decode (``data_pipelines/synthetic.py``) start in a fraction of a second.
"""

import importlib

from vgen.data.errors import SampleError
from vgen.data.image import IMAGE_EXTENSIONS, decode_image
from vgen.data.video import VIDEO_EXTENSIONS, Clip, decode_video, encode_video, frame_stride

_LAZY = {
    "VideoDataModule": "vgen.data.datamodule",
    "FolderDataModule": "vgen.data.folder",
    "FolderDataset": "vgen.data.folder",
    "SourceConfig": "vgen.data.datamodule",
    "resolve_shards": "vgen.data.datamodule",
    "BatchStream": "vgen.data.stream",
    "SampleDecoder": "vgen.data.stream",
    "SKIP_REASONS": "vgen.data.stream",
    "Bucket": "vgen.data.buckets",
    "resize_center_crop": "vgen.data.transforms",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "VIDEO_EXTENSIONS",
    "BatchStream",
    "Bucket",
    "Clip",
    "FolderDataModule",
    "FolderDataset",
    "SampleDecoder",
    "SampleError",
    "SourceConfig",
    "VideoDataModule",
    "decode_image",
    "decode_video",
    "encode_video",
    "frame_stride",
    "resize_center_crop",
    "resolve_shards",
]
