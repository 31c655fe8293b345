"""Bit-exact resume: 2N steps uninterrupted give the same weights, EMA and optimizer state as N steps, a
``kill -9`` while step N+2 runs, and ``resume=auto`` to 2N -- in one process and with 2 DDP ranks. Dropout,
CFG dropout and the diffusion noise all draw from the global generators here (no per-sample seeds), so the
per-rank RNG state in the checkpoint is what makes this exact. A NaN at step 2 is skipped in every run.

The data is ``vgen.training.synthetic`` (its position follows the restored global step; no loader workers), so
these tests do not depend on the WebDataset loader's own resume state.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from test_strategies import BASE, NAN_STEP, N, compose_config, kill_group, launch, read
from vgen.training.checkpointing import MARKER, find_resume_checkpoint, resolve_resume

UNSEEDED = {"seeded_noise": False}
BIT_EXACT = [*BASE, "model.unet.conditions.text.dropout=0.1"]  # CFG dropout on: it draws from the global generator


@contextmanager
def one_thread():
    """The launched workers run with OMP_NUM_THREADS=1; in-process runs must sum in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_here(out: Path, overrides: list[str], tag: str, **recorder):
    from vgen.train import train

    rec = {"out_dir": str(out), "tag": tag, "no_dropout": False, "nan_step": NAN_STEP, **recorder}
    with one_thread():
        return train(compose_config(out, [*BIT_EXACT, "trainer.devices=1", *overrides], UNSEEDED, rec))


def kill_during_step(out: Path, overrides: list[str], step: int):
    """Launch, wait until rank 0 is inside step ``step`` (0-based), then SIGKILL every process of the run."""
    proc = launch(out, overrides, {"tag": "killed", "no_dropout": False, "nan_step": NAN_STEP, "hang_step": step,
                                   "dump": False}, UNSEEDED, wait=False)
    marker = out / "hanging-killed"
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the step to kill"
            time.sleep(0.2)
        kill_group(proc)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert find_resume_checkpoint(out / "checkpoints").name == f"step{N:07d}.ckpt"


def assert_identical_checkpoints(a: Path, b: Path):
    ca = torch.load(a, map_location="cpu", weights_only=True)
    cb = torch.load(b, map_location="cpu", weights_only=True)
    assert ca["global_step"] == cb["global_step"] == 2 * N
    assert ca["nonfinite_steps"] == cb["nonfinite_steps"] == 1
    for key in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][key], cb["state_dict"][key]), f"weights differ: {key}"
    for key in ca["ema"]["shadow"]:
        assert torch.equal(ca["ema"]["shadow"][key], cb["ema"]["shadow"][key]), f"EMA differs: {key}"
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for name, value in sa[index].items():
            assert torch.equal(value, sb[index][name]), f"optimizer state {index}.{name} differs"
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    assert all(torch.equal(ca["rng"][k], cb["rng"][k]) for k in ca["rng"]), "RNG states differ"


@pytest.mark.slow
def test_single_process_kill9_and_resume_auto_is_bit_exact(tmp_path):
    full, broken = tmp_path / "full" / "run", tmp_path / "broken" / "run"
    train_here(full, [f"trainer.max_steps={2 * N}"], "full")
    kill_during_step(broken, [*BIT_EXACT, "trainer.devices=1", f"trainer.max_steps={2 * N}"], N + 1)
    trainer = train_here(broken, [f"trainer.max_steps={2 * N}", "resume=auto"], "resumed")
    assert trainer.global_step == 2 * N
    assert_identical_checkpoints(full / "checkpoints" / f"step{2 * N:07d}.ckpt",
                                 broken / "checkpoints" / f"step{2 * N:07d}.ckpt")


@pytest.mark.slow
def test_two_rank_ddp_kill9_and_resume_auto_is_bit_exact(tmp_path):
    full, broken = tmp_path / "full" / "run", tmp_path / "broken" / "run"
    common = [*BIT_EXACT, "strategy=ddp", "trainer.devices=2", f"trainer.max_steps={2 * N}"]
    rec = {"no_dropout": False, "nan_step": NAN_STEP, "nan_rank": 1}
    launch(full, common, {**rec, "tag": "full"}, UNSEEDED)
    kill_during_step(broken, common, N + 1)
    launch(broken, [*common, "resume=auto"], {**rec, "tag": "resumed"}, UNSEEDED)
    assert_identical_checkpoints(full / "checkpoints" / f"step{2 * N:07d}.ckpt",
                                 broken / "checkpoints" / f"step{2 * N:07d}.ckpt")
    for part in ("model", "ema"):
        a, b = read(full / f"full-{part}.safetensors"), read(broken / f"resumed-{part}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_skips_partial_and_corrupt_checkpoints(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    torch.save({"state_dict": {}, "global_step": 3}, directory / "step0000003.ckpt")
    (directory / "step0000009.ckpt.tmp").write_bytes(b"half a checkpoint")  # killed during an atomic save
    good = (directory / "step0000003.ckpt").read_bytes()
    (directory / "step0000006.ckpt").write_bytes(good[: len(good) // 2])  # a truncated file
    sharded = directory / "step0000008.ckpt"  # a sharded save that never got its completion marker
    (sharded / "checkpoint").mkdir(parents=True)
    assert find_resume_checkpoint(directory).name == "step0000003.ckpt"
    with pytest.raises(FileNotFoundError, match="incomplete sharded checkpoint"):
        resolve_resume(str(sharded), directory)
    (sharded / MARKER).write_text('{"format": "deepspeed", "world_size": 2, "global_step": 8}')
    assert find_resume_checkpoint(directory) == sharded


def test_nonfinite_losses_in_a_row_stop_with_the_step_named(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3: 2 steps in a row"):
        train_here(tmp_path / "run", ["trainer.max_steps=6", "++stage.max_nonfinite_steps=2"], "nan",
                   nan_step=[2, 3])


def test_fp16_loss_scaler_skips_a_nonfinite_step_and_is_checkpointed(tmp_path):
    out = tmp_path / "run"
    train_here(out, ["trainer.max_steps=4", "trainer.precision=16-mixed"], "fp16")
    ckpt = torch.load(out / "checkpoints" / "step0000004.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["nonfinite_steps"] == 1
    scaler = ckpt["MixedPrecision"]
    assert scaler["scale"] == 2.0**15, "the skipped step must back the loss scale off from 2**16"
    assert ckpt["optimizer_states"][0]["state"][0]["step"].item() == 3, "3 of 4 steps updated the weights"
