"""InstructVideo's segmental video reward (SegVR) with temporally attenuated weights (TAR).

A clip of F frames is cut into S segments of ``span = F // S`` frames (a remainder of ``F mod S`` frames at the
end is never scored, as in the original); one frame is drawn uniformly inside each segment (TSN sampling),
scored by an image reward, and the scores are averaged with weights ``exp(-lambda * |g - F // 2|)``:

    R = (1 / S) * sum_i exp(-lambda * |g_i - F // 2|) * r(frame_{g_i}, caption)

Clips shorter than S frames (stills, F = 1) get one segment per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def num_segments(num_frames: int, segments: int) -> int:
    """Segments actually used for a clip of ``num_frames`` frames: ``min(segments, num_frames)``."""
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be an integer >= 1, got {segments!r}")
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")
    return min(segments, num_frames)


def segment_frame_indices(batch_size: int, num_frames: int, segments: int,
                          generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """[B, S] int64 frame indices: one uniform draw inside each segment ``[i * span, (i + 1) * span)``."""
    s = num_segments(num_frames, segments)
    span = num_frames // s
    local = torch.randint(span, (batch_size, s), generator=generator, device=generator.device if generator else None)
    return (local + torch.arange(s, device=local.device) * span).to(device)


def attenuation_weights(indices: torch.Tensor, num_frames: int, lambda_tar: float) -> torch.Tensor:
    """TAR weights ``exp(-lambda * |g - F // 2|)`` of frame indices ``g`` (float32, shape of ``indices``)."""
    if lambda_tar < 0:
        raise ValueError(f"lambda_tar must be >= 0, got {lambda_tar}")
    return torch.exp(-(indices - num_frames // 2).abs().float() * lambda_tar)


def segmental_reward(frames: torch.Tensor, indices: torch.Tensor, num_frames: int, captions: Sequence[str],
                     reward: Callable[[torch.Tensor, list[str]], torch.Tensor],
                     lambda_tar: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip reward R [B] and the raw per-frame scores [B, S].

    ``frames`` [B, 3, S, H, W] in [0, 1] are the frames at ``indices`` [B, S] of clips of ``num_frames`` frames
    (decode only those: the VAE works frame by frame), ``captions`` one per clip.
    """
    b, _, s = frames.shape[:3]
    if indices.shape != (b, s):
        raise ValueError(f"indices must be [B={b}, S={s}], got {tuple(indices.shape)}")
    if len(captions) != b:
        raise ValueError(f"need one caption per clip ({b}), got {len(captions)}")
    flat = frames.transpose(1, 2).flatten(0, 1)  # [(B S), 3, H, W]
    scores = reward(flat, [c for c in captions for _ in range(s)]).view(b, s)
    weights = attenuation_weights(indices, num_frames, lambda_tar).to(scores.device, scores.dtype)
    return (weights * scores).mean(dim=1), scores
