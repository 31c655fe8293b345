"""Mixed precision on 2 ranks and gradient accumulation.

* ``trainer.precision=bf16-mixed`` trains under DDP and under FSDP2 on 2 CPU ranks (``python -m vgen.train``): finite
  losses, a complete step checkpoint, and the in-training evaluation (held-out loss, every rank its share, reduced;
  metrics sampled by every rank of the sharded model) with its best checkpoint;
* ``trainer.accumulate_grad_batches=2`` with batches of 2 is one step on the batch of 4: the same gradients, grad
  norm, weights and EMA (``vgen.training.synthetic`` gives every sample its own data and noise seed, so micro-batches
  0 and 1 hold samples 0-3); a non-finite loss in either micro-batch drops the whole step.
"""

import csv
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from conftest import REPO
from helpers import demo_shard_overrides, evaluation_overrides, run_training, write_demo_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_demo_shards(tmp_path_factory.mktemp("shards"))


def _rows(run_dir):
    with open(max((run_dir / "csv").glob("version_*/metrics.csv"))) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_bf16_mixed_trains_on_two_ranks(strategy, shards, tmp_path):
    from vgen.callbacks.evaluation import held_out_loss, held_out_samples, rank_batches
    from vgen.data.datamodule import SourceConfig
    from vgen.pipeline import VideoPipeline
    from vgen.training.checkpointing import read_marker, resume_problem

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-m", "vgen.train", "experiment=demo", "debug=tiny", "logger=csv", f"paths.log_dir={tmp_path}",
         "name=bf16", "trainer.precision=bf16-mixed", f"strategy={strategy}", "trainer.devices=2",
         "trainer.max_steps=2", "callbacks.progress=null", "callbacks.sample_videos=null",
         *demo_shard_overrides(shards), *evaluation_overrides(shards, every=2, metrics="[shape_found]")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run = tmp_path / "bf16"
    rows = _rows(run)
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert sorted(losses) == [0, 1] and all(math.isfinite(v) for v in losses.values()), losses
    evals = [r for r in rows if r.get("eval/loss")]
    assert [int(r["step"]) for r in evals] == [2] and float(evals[0]["eval/shape_found"]) in (0.0, 0.5, 1.0)
    for name in ("step0000002.ckpt", "best.ckpt"):
        path = run / "checkpoints" / name
        assert resume_problem(path) is None, name
        assert path.is_dir() == (strategy == "fsdp2")
        if strategy == "fsdp2":
            assert read_marker(path)["format"] == "dcp" and read_marker(path)["global_step"] == 2

    # the reduced held-out loss is one process's number for the step-2 weights (bf16 rounding apart)
    pipe = VideoPipeline.from_checkpoint(run / "checkpoints" / "step0000002.ckpt", ema=False)
    source = SourceConfig.parse({"urls": str(shards / "videos-000001.tar"), "type": "video"}, "s")
    samples = held_out_samples([source], {"sample_fps": 2}, 4, 8, 8, per_source=3, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = held_out_loss(pipe, rank_batches(samples, 0, 1, 2), [250, 750], seed=0)
    assert sums[-1] == 3
    assert float(evals[0]["eval/loss"]) == pytest.approx(float(sums[:-1].mean() / sums[-1]), rel=2e-2)


# ------------------------------------------------------------------------------------------------ accumulation
class Capture(L.Callback):
    """No dropout; the gradients each optimizer step sees (after accumulation, before clipping); a NaN in one
    micro-batch of step 0; the weights before training."""

    def __init__(self, nan_micro_batch: int | None = None):
        self.nan_micro_batch = nan_micro_batch
        self.gradients: list[dict] = []
        self.initial: dict = {}

    def on_fit_start(self, trainer, pl_module):
        for m in pl_module.unet.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        self.initial = {k: v.clone() for k, v in pl_module.unet.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.nan_micro_batch:
            batch["video"][0] = float("nan")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.gradients.append({n: p.grad.clone() for n, p in pl_module.unet.named_parameters()
                                  if p.grad is not None})


BASE = ["debug=tiny", "logger=csv", "model/vae=identity", "model.unet.in_channels=3", "model.unet.out_channels=3",
        "model.unet.conditions.text.dropout=0.0", "stage.ema.decay=0.5", "optim.lr=1e-3", "optim.warmup_steps=0",
        "trainer.gradient_clip_val=0.01", "callbacks.progress=null", "callbacks.sample_videos=null"]


def _train(tmp_path, tag: str, batch_size: int, accumulate: int, steps: int, nan_micro_batch: int | None = None):
    from omegaconf import OmegaConf

    def edit(cfg):
        cfg.data = OmegaConf.create({"_target_": "vgen.training.synthetic.SyntheticVideoData", "batch_size": batch_size,
                                     "num_frames": 4, "resolution": [16, 16]})
        cfg.callbacks.capture = OmegaConf.create({"_target_": f"{__name__}.Capture",
                                                  "nan_micro_batch": nan_micro_batch})

    trainer = run_training([*BASE, f"paths.log_dir={tmp_path}", f"trainer.max_steps={steps}",
                            f"trainer.accumulate_grad_batches={accumulate}"], tmp_path / tag, edit=edit)
    stage = trainer.lightning_module
    capture = next(c for c in trainer.callbacks if isinstance(c, Capture))
    grad_norms = {int(r["step"]): float(r["train/grad_norm"]) for r in _rows(tmp_path / tag) if r.get("train/grad_norm")}
    return {"gradients": capture.gradients, "initial": capture.initial, "grad_norm": grad_norms, "stage": stage,
            "weights": {k: v.clone() for k, v in stage.unet.state_dict().items()},
            "ema": {k: v.clone() for k, v in stage.ema.shadow.items()}}


def test_accumulating_two_batches_of_two_is_one_step_on_the_batch_of_four(tmp_path):
    whole = _train(tmp_path, "whole", batch_size=4, accumulate=1, steps=2)
    accumulated = _train(tmp_path, "accumulated", batch_size=2, accumulate=2, steps=2)
    assert len(whole["gradients"]) == len(accumulated["gradients"]) == 2
    for step, (a, b) in enumerate(zip(accumulated["gradients"], whole["gradients"], strict=True)):
        assert set(a) == set(b) and a
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name, s=step:
                                       f"step {s} gradient {n}: {m}")
    assert sorted(accumulated["grad_norm"]) == sorted(whole["grad_norm"]) == [0, 1]
    for step, norm in whole["grad_norm"].items():
        assert accumulated["grad_norm"][step] == pytest.approx(norm, rel=1e-5)
    for what in ("weights", "ema"):
        for name, value in whole[what].items():
            torch.testing.assert_close(accumulated[what][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, w=what: f"{w} {n}: {m}")
    assert accumulated["stage"].global_step == 2 and accumulated["stage"].nonfinite_steps == 0


@pytest.mark.parametrize("nan_micro_batch", [0, 1])
def test_a_non_finite_micro_batch_drops_the_whole_accumulated_step(nan_micro_batch, tmp_path):
    run = _train(tmp_path, "nan", batch_size=2, accumulate=2, steps=1, nan_micro_batch=nan_micro_batch)
    stage = run["stage"]
    assert stage.global_step == 1 and stage.nonfinite_steps == 1
    for name, value in run["initial"].items():
        assert torch.equal(run["weights"][name], value), f"{name} changed in a dropped step"
        if name in run["ema"]:
            assert torch.equal(run["ema"][name], value.float()), f"EMA {name} moved in a dropped step"
    assert run["grad_norm"] == {}
