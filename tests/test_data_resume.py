"""Exact mid-epoch resume through Lightning: stop at step N, resume from the checkpoint, and the sample keys
of every later step equal those of an uninterrupted run -- for 1 rank and for 2 DDP ranks, with 2 DataLoader
workers each, over 3 shards of unequal size (fewer shards than the 4 readers) that include bad samples.

Run as a script (``python tests/test_data_resume.py DATA OUT``, under ``torchrun`` for several ranks) it
trains a parameter-only LightningModule three times: uninterrupted, stopped at ``STOP``, and resumed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

STEPS, STOP = 7, 3  # STOP is odd: with 2 workers the resumed run must start on worker 1's reader
VIDEO_SHARDS = {"clips-000000.tar": 7, "clips-000001.tar": 2, "clips-000002.tar": 11}  # unequal sizes
IMAGE_SHARDS = {"stills-000000.tar": 5, "stills-000001.tar": 3}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class UnpicklingWouldWriteAFile:
    """Unpickling this creates ``path``: a test that finds no file proves the loader never unpickles."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny_clip(index: int, frames: int = 6, size: int = 16) -> bytes:
    from vgen.data import encode_video

    clip = np.full((frames, size, size, 3), (index * 37) % 200, np.uint8)
    clip[:, :, :, 1] = np.arange(frames)[:, None, None] * 20
    return encode_video(clip, fps=8)


def tiny_jpeg(index: int, size: int = 16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), ((index * 53) % 255, 80, 160)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_resume_shards(root: Path) -> Path:
    """3 unequal video shards (one undecodable and one uncaptioned clip among them) and 2 image shards."""
    root.mkdir(parents=True, exist_ok=True)
    number = 0
    for name, count in VIDEO_SHARDS.items():
        members = {}
        for _ in range(count):
            key = f"v{number:04d}"
            members[f"{key}.mp4"] = b"not an mp4" if number == 4 else tiny_clip(number)
            if number != 9:
                members[f"{key}.txt"] = f"clip {number}".encode()
            number += 1
        write_tar(root / name, members)
    for name, count in IMAGE_SHARDS.items():
        members = {}
        for _ in range(count):
            members[f"i{number:04d}.jpg"] = tiny_jpeg(number)
            members[f"i{number:04d}.txt"] = f"still {number}".encode()
            number += 1
        write_tar(root / name, members)
    return root


def datamodule(root: Path):
    from vgen.data import VideoDataModule

    sources = [
        {"urls": [str(root / name) for name in VIDEO_SHARDS], "type": "video", "weight": 0.6},
        {"urls": [str(root / name) for name in IMAGE_SHARDS], "type": "image", "weight": 0.4},
    ]
    return VideoDataModule(sources, num_frames=3, sample_fps=8, resolution=[8, 8], batch_size=2,
                           image_batch_size=3, num_workers=2, seed=5, shuffle_buffer=3)


def fit(root: Path, out: Path, name: str, max_steps: int, devices: int, ckpt_path: Path | None = None):
    """Train ``max_steps`` steps; write each rank's per-step sample keys to ``out/<name>-rank<r>.json``."""
    import lightning as L
    import torch

    class KeyRecorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.keys: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            assert "_loader" not in batch, "the datamodule must take the loader position out of the batch"
            self.keys.append(list(batch["key"]))
            return (self.weight * batch["video"].mean() + self.weight**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = KeyRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule(root), ckpt_path=ckpt_path, weights_only=True)
    if ckpt_path is None and max_steps == STOP:
        trainer.save_checkpoint(out / "stop.ckpt")
    (out / f"{name}-rank{trainer.global_rank}.json").write_text(json.dumps(model.keys))
    trainer.strategy.barrier()


def run_all(root: Path, out: Path, devices: int) -> None:
    fit(root, out, "full", STEPS, devices)
    fit(root, out, "first", STOP, devices)
    fit(root, out, "resumed", STEPS, devices, ckpt_path=out / "stop.ckpt")


def assert_resumed_exactly(out: Path, ranks: int) -> list[list[list[str]]]:
    runs = []
    for rank in range(ranks):
        full, first, resumed = (json.loads((out / f"{n}-rank{rank}.json").read_text())
                                for n in ("full", "first", "resumed"))
        assert len(full) == STEPS and first == full[:STOP]
        assert resumed == full[STOP:], f"rank {rank}: resumed keys differ from the uninterrupted run"
        runs.append(full)
    return runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_resume_shards(tmp_path_factory.mktemp("resume") / "shards")


def test_resume_is_exact_with_one_rank_and_two_workers(shards, tmp_path):
    run_all(shards, tmp_path, devices=1)
    [full] = assert_resumed_exactly(tmp_path, 1)
    keys = [key for step in full for key in step]
    assert "v0004" not in keys and "v0009" not in keys  # undecodable / uncaptioned clips never trained on


@pytest.mark.slow
def test_resume_is_exact_with_two_ddp_ranks_and_two_workers(shards, tmp_path):
    env = {**os.environ, "MASTER_PORT": "29731", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
               __file__, str(shards), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = assert_resumed_exactly(tmp_path, 2)
    # Equal batch counts on both ranks (no hang with 3 shards for 4 readers), and the ranks read different data.
    assert len(ranks[0]) == len(ranks[1]) == STEPS and ranks[0] != ranks[1]


if __name__ == "__main__":
    run_all(Path(sys.argv[1]), Path(sys.argv[2]), devices=int(os.environ.get("WORLD_SIZE", "1")))
