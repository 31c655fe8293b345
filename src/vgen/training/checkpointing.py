"""Checkpoint files: atomic writes, and finding the newest complete checkpoint for ``resume=auto``.

Unsharded runs write one file ``stepNNNNNNN.ckpt``; sharded strategies (DeepSpeed, FSDP2) write a directory of
that name. Both are written under a ``.tmp`` name and renamed when whole, so a kill during a save leaves the
previous checkpoint valid; a directory also gets a ``vgen_checkpoint.json`` marker (format, world size, step)
as the last thing before its rename.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vgen.checkpoint.safe_load import CheckpointError, load_weights_only

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
        return load_weights_only(path, map_location=map_location or "cpu")


MARKER = "vgen_checkpoint.json"


def staging_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def commit_directory(staging: Path, path: Path, info: dict[str, Any]) -> None:
    """Mark a fully written checkpoint directory complete and move it into place (rank 0 only)."""
    marker = staging / MARKER
    with open(marker, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.replace(staging, path)


def read_marker(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint (no {MARKER})")
    return json.loads(marker.read_text())


def checkpoint_step(path: Path) -> int:
    match = _STEP.search(path.stem)
    return int(match.group(1)) if match else -1


def is_complete(path: Path) -> bool:
    """A checkpoint is complete if it loads (weights only) and has the trainer state we resume from.

    A sharded checkpoint directory is complete once it has its marker (written after every rank finished).
    """
    return resume_problem(path) is None


def resume_problem(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from (one line naming it), or None if it can."""
    if path.is_dir():
        return None if (path / MARKER).is_file() else f"{path}: incomplete sharded checkpoint (no {MARKER})"
    try:
        ckpt = load_weights_only(path, mmap=True)
    except (CheckpointError, OSError) as err:
        return str(err)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return f"{path}: not a vgen training checkpoint (no state_dict and global_step to resume from)"
    return None


def find_resume_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """Newest complete ``*.ckpt`` in ``checkpoint_dir`` (by global step, then modification time)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return None
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: (checkpoint_step(p), p.stat().st_mtime),
                        reverse=True)
    for path in candidates:
        problem = resume_problem(path)
        if problem is None:
            return path
        log.warning("resume=auto: skipping %s", problem)
    return None


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
    if not path.exists():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint file or directory")
    if path.is_dir() and not is_complete(path):
        raise FileNotFoundError(f"resume={resume}: incomplete sharded checkpoint (no {MARKER}); "
                                "use resume=auto to pick the newest complete one")
    problem = resume_problem(path)
    if problem is not None:
        raise CheckpointError(f"resume={resume}: {problem}")
    return str(path)


def stored_config(path: str | Path) -> dict | None:
    """The run config (``vgen_config``) stored in a checkpoint file or sharded directory, or None if it has none."""
    path = Path(path)
    if path.is_dir():
        from vgen.checkpoint.sharded import dcp_meta, deepspeed_metadata

        meta = deepspeed_metadata(path) if read_marker(path)["format"] == "deepspeed" else dcp_meta(path)
    else:
        meta = load_weights_only(path, mmap=True)
    config = meta.get("vgen_config") if isinstance(meta, dict) else None
    return config if isinstance(config, dict) else None
