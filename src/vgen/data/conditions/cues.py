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
"""

from __future__ import annotations

import torch

from vgen.data.conditions.frames import to_unit

MOTION_SCALE = 10_000  # motion intensity units per unit of mean absolute grey change between adjacent frames
MAX_FRAMES = 32  # width of HiGen's appearance cue


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
