"""HiGen's content cues of a clip: motion intensity between adjacent frames and frame-to-frame appearance similarity.

* :func:`motion_intensity` -- ``round(MOTION_SCALE x mean |grey_t - grey_(t-1)|)`` per adjacent-frame pair, the
  frames' grey values in [0, 1]: 0 for a still clip; the released HiGen samples with ``motion_factor`` 500, the
  value of a clip whose pixels change by 5% of the full range per frame pair on average (moderate camera or
  object motion at 8 fps). int64 [F - 1].
* :func:`appearance_similarity` -- the cosine similarity of every pair of frames' image-encoder (CLIP)
  embeddings, each row padded with zeros to ``max_frames`` (32, the released network's width). float32
  [F, max_frames]; 1 on the diagonal, close to 1 everywhere for a static clip.
* :func:`appearance_schedule` -- HiGen's inference cue ``1 - factor |k - j| / (F - 1)`` (``appearance_factor``);
  all ones for a single frame (the key-frame pass), as training's single frames get.
* :func:`window_cues` -- both cues of a training window in the data stream (``data.cues``): motion from the
  window's decoded frames, appearance from the image-encoder embeddings of its source frames stored in the clip's
  ``cues.safetensors`` member (:func:`encode_cues`, written by ``data_pipelines/cues.py``); without the member the
  stage measures appearance itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vgen.data.conditions.frames import to_unit
from vgen.data.errors import SampleError

MOTION_SCALE = 10_000  # motion intensity units per unit of mean absolute grey change between adjacent frames
MAX_FRAMES = 32  # width of HiGen's appearance cue
CUES_MEMBER = "cues.safetensors"  # a clip's stored cue inputs (data_pipelines/cues.py)


def motion_intensity(frames) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> int64 [F - 1] motion intensity of each adjacent pair (see the module doc)."""
    grey = to_unit(frames).mean(dim=1)  # [F, H, W]
    change = (grey[1:] - grey[:-1]).abs().flatten(1).mean(dim=1)
    return (change * MOTION_SCALE).round().long()


def appearance_similarity(embeddings: torch.Tensor, max_frames: int = MAX_FRAMES) -> torch.Tensor:
    """[F, D] frame embeddings -> [F, max_frames] cosine similarities (row k: frame k against every frame)."""
    if embeddings.ndim != 2 or not 1 <= embeddings.shape[0] <= max_frames:
        raise ValueError(f"embeddings must be [F, D] with 1 <= F <= {max_frames}, got {tuple(embeddings.shape)}")
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity = unit @ unit.T
    return torch.nn.functional.pad(similarity, (0, max_frames - similarity.shape[1]))


def appearance_schedule(num_frames: int, factor: float = 1.0, max_frames: int = MAX_FRAMES) -> torch.Tensor:
    """HiGen's inference appearance cue: ``1 - factor |k - j| / (F - 1)`` for k, j < F, padded -> [F, max_frames]."""
    if not 1 <= num_frames <= max_frames:
        raise ValueError(f"num_frames must be in [1, {max_frames}], got {num_frames}")
    if num_frames == 1:  # the key-frame (spatial) pass: HiGen's neutral cue, all ones
        return torch.ones(1, max_frames)
    index = torch.arange(num_frames, dtype=torch.float32)
    cue = 1 - factor * (index[:, None] - index[None, :]).abs() / (num_frames - 1)
    return torch.nn.functional.pad(cue, (0, max_frames - num_frames))


def encode_cues(embeddings: torch.Tensor, indices: Sequence[int]) -> bytes:
    """Image-encoder embeddings [N, D] of the source frames ``indices`` -> the bytes of a clip's
    :data:`CUES_MEMBER`: ``embeddings`` float16 [N, D] and ``indices`` int64 [N]."""
    from safetensors.torch import save

    return save({"embeddings": embeddings.reshape(len(indices), -1).to(torch.float16).contiguous(),
                 "indices": torch.tensor(list(indices), dtype=torch.int64)})


def window_cues(sample: Mapping, frames, indices: Sequence[int], max_frames: int = MAX_FRAMES) -> dict:
    """HiGen's cues of a training window: ``motion`` [F - 1] of its uint8 ``frames`` [F, H, W, 3] (what the stage
    would measure), and ``appearance`` [F, max_frames] from the stored embeddings of its source frames ``indices``
    when the raw ``sample`` has a :data:`CUES_MEMBER` (absent otherwise: the stage measures it)."""
    cues = {"motion": motion_intensity(frames)}
    data = sample.get(CUES_MEMBER)
    if data is None:
        return cues
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SampleError(f"undecodable cue member .{CUES_MEMBER}: {exc}") from exc
    embeddings, stored = tensors.get("embeddings"), tensors.get("indices")
    if embeddings is None or stored is None or embeddings.ndim != 2 or stored.shape != embeddings.shape[:1]:
        shapes = {name: tuple(value.shape) for name, value in tensors.items()}
        raise SampleError(f"cue member .{CUES_MEMBER} needs 'embeddings' [N, D] and 'indices' [N] (got {shapes})",
                          reason="bad_metadata")
    position = {int(i): n for n, i in enumerate(stored.tolist())}
    missing = [i for i in indices if i not in position]
    if missing:
        raise SampleError(f"cue member .{CUES_MEMBER} has no embedding of source frame(s) {missing[:4]}",
                          reason="missing_condition")
    cues["appearance"] = appearance_similarity(embeddings[[position[i] for i in indices]], max_frames)
    return cues
