"""Condition maps in the data stream: each clip's VideoComposer conditions, read from its shard members or extracted
from the decoded clip (``data.conditions``).

``data.conditions`` maps a batch member name (the UNet condition of the same name reads it) to
``{kind, member, extract, weights}``:

* ``kind``: one of :data:`KINDS` (what the map is; see :mod:`vgen.data.conditions` for each one's values);
* ``member``: the shard member that stores it (default ``<kind>.safetensors.gz`` as ``data_pipelines/conditions.py``
  writes it, or an uncompressed ``<kind>.safetensors``): tensors ``maps`` [C, N, H, W] (uint8 = values x 255, or
  float16) and ``indices`` [N], the source frame index of each stored map (gzip members expand to at most
  :data:`MAX_MEMBER_BYTES`). The clip's window picks its frames by index, and the maps are resized and
  centre-cropped like the frames (motion vectors scaled with them);
* ``extract``: when the member is missing, compute the map from the decoded, resized clip (default true; a sample
  whose map can be neither read nor extracted is skipped and counted as ``missing_condition``);
* ``weights``: the network a kind extracts with: a DPT depth model (file or folder, required to extract
  ``depthmap``) or a PiDiNet file for ``sketch`` / ``single_sketch`` (default: the weight-free classical sketch).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vgen.data.errors import SampleError

# kind -> channels of its map ([C, F, H, W]; None: the palette histogram, [F, bins])
KINDS: dict[str, int | None] = {"depthmap": 1, "sketch": 1, "single_sketch": 1, "motion": 2, "mask": 4,
                                "local_image": 3, "canny": 1, "palette": None}
UNIT_KINDS = frozenset({"sketch", "single_sketch", "canny", "local_image"})  # maps in [0, 1]: stored as uint8
CONFIG_PREFIX = "data.conditions"
MAX_MEMBER_BYTES = 1 << 30  # a gzip condition member may expand to 1 GiB at most (a hostile one is refused)


@dataclass(frozen=True)
class ConditionMap:
    """One entry of ``data.conditions`` (see the module docstring)."""

    name: str
    kind: str
    member: str | None = None
    extract: bool = True
    weights: str | None = None

    def __post_init__(self):
        key = f"{CONFIG_PREFIX}.{self.name}"
        if self.kind not in KINDS:
            raise ValueError(f"{key}.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.extract, bool):
            raise ValueError(f"{key}.extract must be true or false, got {self.extract!r}")  # noqa: TRY004
        if self.weights is not None and self.kind not in ("depthmap", "sketch", "single_sketch"):
            raise ValueError(f"{key}.weights: kind {self.kind} extracts without a network")
        if self.extract and self.kind == "depthmap" and self.weights is None:
            raise ValueError(f"{key}: extracting depth maps needs the DPT model ({key}.weights), or extract: false "
                             "to read stored maps only")
        if self.extract and self.weights is not None and not Path(self.weights).exists():
            raise ValueError(f"{key}.weights={self.weights}: no such file or folder")

    @property
    def member_names(self) -> tuple[str, ...]:
        return (self.member,) if self.member else (f"{self.kind}.safetensors.gz", f"{self.kind}.safetensors")

    def __call__(self, sample: Mapping, frames: np.ndarray, indices: Sequence[int] | None,
                 rng: random.Random) -> torch.Tensor:
        """This clip's map: from its member when stored, else extracted from ``frames`` (uint8 [F, H, W, 3], the
        decoded window after resize and crop; ``indices`` its source frame numbers, None for a still)."""
        member = next((m for m in self.member_names if m in sample), None)
        if member is not None:
            return self._stored(member, sample[member], frames.shape[0], frames.shape[1:3], indices)
        if not self.extract:
            raise SampleError(f"no condition member .{self.member_names[0]} ({CONFIG_PREFIX}.{self.name}.extract is "
                              "false)", reason="missing_condition")
        return extract(self.kind, frames, rng, self.weights)

    def _stored(self, member: str, data: bytes, num_frames: int, size: tuple[int, int],
                indices: Sequence[int] | None):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(_gunzip(data, member) if data[:2] == b"\x1f\x8b" else data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise SampleError(f"undecodable condition member .{member}: {exc}") from exc
        maps, stored = tensors.get("maps"), tensors.get("indices")
        channels = KINDS[self.kind]
        if maps is None or stored is None or maps.ndim != (3 if channels is None else 4) or (
                channels is not None and maps.shape[0] != channels):
            raise SampleError(f"condition member .{member} needs 'maps' [{channels or ''}, N, ...] and "
                              f"'indices' [N] (got {sorted(tensors)})", reason="bad_metadata")
        position = {int(i): n for n, i in enumerate(stored.tolist())}
        wanted = list(indices) if indices is not None else [int(stored[0])]
        missing = [i for i in wanted if i not in position]
        if missing:
            raise SampleError(f"condition member .{member} has no map of source frame(s) {missing[:4]}",
                              reason="missing_condition")
        picks = torch.tensor([position[i] for i in wanted])
        values = maps.float() / 255.0 if maps.dtype == torch.uint8 else maps.float()
        if channels is None:  # [N, bins]
            return values[picks]
        return resize_maps(values[:, picks], *size, displacement=self.kind == "motion")


def _gunzip(data: bytes, member: str) -> bytes:
    """Decompress a gzip member, refusing one that expands past :data:`MAX_MEMBER_BYTES` (or is corrupt)."""
    import zlib

    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, MAX_MEMBER_BYTES)
    except zlib.error as exc:
        raise SampleError(f"undecodable condition member .{member}: {exc}") from exc
    if inflater.unconsumed_tail:
        raise SampleError(f"condition member .{member} expands past {MAX_MEMBER_BYTES} bytes: refused")
    return out


def resize_maps(maps: torch.Tensor, height: int, width: int, displacement: bool = False) -> torch.Tensor:
    """[C, F, h, w] -> [C, F, height, width]: scaled to cover (bilinear, antialiased) and centre-cropped like the
    frames; a ``displacement`` field (motion vectors, in pixels) is scaled with the image."""
    if displacement:
        from vgen.data.conditions.motion import resize_field

        return resize_field(maps, height, width)
    source_height, source_width = maps.shape[-2:]
    scale = max(width / source_width, height / source_height)
    resized = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
    if resized != (source_height, source_width):
        maps = F.interpolate(maps.permute(1, 0, 2, 3), size=resized, mode="bilinear", antialias=True,
                             align_corners=False).permute(1, 0, 2, 3)
    top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
    return maps[:, :, top:top + height, left:left + width].contiguous()


@lru_cache(maxsize=4)
def _network(kind: str, weights: str):
    """The extraction network of ``kind`` from ``weights``, loaded once per process (each loader worker)."""
    from vgen.data import conditions

    if kind == "depthmap":
        return conditions.load_depth_estimator(weights).eval()
    return conditions.load_pidinet(weights).eval()


def extract(kind: str, frames: np.ndarray, rng: random.Random, weights: str | None = None) -> torch.Tensor:
    """The ``kind`` map of uint8 ``frames`` [F, H, W, 3]: [C, F, H, W] float32 ([F, bins] for the palette)."""
    from vgen.data import conditions

    if kind in ("sketch", "single_sketch"):
        drawn = (conditions.sketch(frames) if weights is None
                 else conditions.pidinet_sketch(frames, _network("sketch", weights)))
        return drawn if kind == "sketch" else conditions.single_sketch(drawn)
    if kind == "depthmap":
        return conditions.depth_map(frames, _network("depthmap", weights))
    if kind == "motion":
        return conditions.motion_vectors_from_frames(frames)
    if kind == "mask":
        mask = conditions.random_mask(frames.shape[1], frames.shape[2], generator=rng.getrandbits(63))
        return conditions.masked_video(frames, mask)
    if kind == "local_image":
        return conditions.first_frame_map(frames)
    if kind == "canny":
        return conditions.canny_edges(frames)
    return conditions.palette_histogram(frames)


def parse_conditions(config: Mapping | None) -> tuple[ConditionMap, ...]:
    """``data.conditions`` -> :class:`ConditionMap` entries (errors name the key)."""
    if not config:
        return ()
    if not isinstance(config, Mapping):
        raise ValueError(f"{CONFIG_PREFIX} must be a mapping name -> {{kind, member, extract, weights}}, got "  # noqa: TRY004
                         f"{config!r}")
    out = []
    for name, entry in config.items():
        if not isinstance(entry, Mapping) or "kind" not in entry:
            raise ValueError(f"{CONFIG_PREFIX}.{name} must be a mapping with a kind ({', '.join(KINDS)})")
        unknown = sorted(set(entry) - {"kind", "member", "extract", "weights"})
        if unknown:
            raise ValueError(f"unknown key {CONFIG_PREFIX}.{name}.{unknown[0]}; valid keys: kind, member, extract, "
                             "weights")
        out.append(ConditionMap(name=str(name), **{k: v for k, v in entry.items()}))
    # Import the extractors now, not inside the training loop: DeepSpeed ZeRO-3 patches module classes while it
    # runs, and classes defined then (kornia's, transformers') break.
    import vgen.data.conditions

    if any(c.kind == "depthmap" and c.extract for c in out):
        import vgen.data.conditions.depth  # noqa: F401
    return tuple(out)


def encode_maps(maps: torch.Tensor, indices: Sequence[int], kind: str) -> bytes:
    """A map [C, N, H, W] (or [N, bins]) of the source frames ``indices`` -> the bytes of its shard member
    (uint8 = value x 255 for the kinds in [0, 1], float16 for depth, motion and masked video, float32 palettes)."""
    from safetensors.torch import save

    if kind in UNIT_KINDS:
        stored = (maps.clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        stored = maps.float() if kind == "palette" else maps.to(torch.float16)
    return save({"maps": stored.contiguous(), "indices": torch.tensor(list(indices), dtype=torch.int64)})
