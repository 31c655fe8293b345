"""Checkpoint files: atomic writes, and finding the newest complete checkpoint for ``resume=auto``."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

_STEP = re.compile(r"step[=_-]?(\d+)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.tmp`` and rename: a crash during a save leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def checkpoint_step(path: Path) -> int:
    match = _STEP.search(path.stem)
    return int(match.group(1)) if match else -1


def is_complete(path: Path) -> bool:
    """A checkpoint is complete if it loads (weights only) and has the trainer state we resume from."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many different errors
        log.warning("skipping unreadable checkpoint %s: %s", path, err)
        return False
    return "state_dict" in ckpt and "global_step" in ckpt


def find_resume_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """Newest complete ``*.ckpt`` in ``checkpoint_dir`` (by global step, then modification time)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return None
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: (checkpoint_step(p), p.stat().st_mtime),
                        reverse=True)
    return next((p for p in candidates if is_complete(p)), None)


def resolve_resume(resume: str | None, checkpoint_dir: str | Path) -> str | None:
    """``None`` -> fresh start; ``"auto"`` -> newest complete checkpoint or fresh; a path -> that file."""
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        found = find_resume_checkpoint(checkpoint_dir)
        log.info("resume=auto: %s", f"resuming from {found}" if found else f"no checkpoint in {checkpoint_dir}, "
                                                                             "starting fresh")
        return str(found) if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint file")
    return str(path)
