"""What a run logs, read back from the offline W&B run file: the keys of every stage kind (joint, distillation,
reward), with the in-training evaluation's scalars, table and videos; samples/s counts the wait for data."""

import math
import time
from types import SimpleNamespace

import pytest
import torch
import wandb

from helpers import demo_shard_overrides, evaluation_overrides, run_training, wandb_history, write_demo_shards

SKIP_REASONS = ("bad_metadata", "empty_member", "missing_condition", "missing_member", "no_caption", "too_short",
                "undecodable", "unreadable_input", "unreadable_shard", "unsafe_member")
EVERY_STAGE = ("train/loss", "lr-AdamW", "train/grad_norm", "perf/samples_per_sec", "perf/step_time_s",
               "perf/peak_memory_mib", "data/skipped/total", *(f"data/skipped/{r}" for r in SKIP_REASONS))
OWN_TERMS = {
    "demo": ("train/loss_video", "eval/loss", "eval/loss_t0250", "eval/loss_t0750", "eval/direction",
             "eval/shape_found", "eval/color"),
    "videolcm_distill": ("train/consistency_mse", "train/solver_timestep"),
    "instructvideo": ("train/reward", "train/frame_score", "train/kl"),
}
EXTRA = {"demo": evaluation_overrides, "videolcm_distill": lambda shards: [],
         "instructvideo": lambda shards: ["stage.tuning.kl_weight=0.1"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_demo_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.parametrize("experiment", list(OWN_TERMS))
def test_the_wandb_run_holds_every_key_of_the_stage(experiment, shards, tmp_path, monkeypatch):
    from vgen.data.stream import SKIP_REASONS as REASONS

    assert set(REASONS) == set(SKIP_REASONS)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run_training([f"experiment={experiment}", "debug=tiny", "logger=wandb", f"paths.log_dir={tmp_path}",
                  "trainer.max_steps=2", "callbacks.progress=null",
                  *demo_shard_overrides(shards), *EXTRA[experiment](shards)], run_dir)
    wandb.finish()  # as the process's exit does: the run file is complete
    rows = wandb_history(run_dir)
    scalars = {k: v for row in rows for k, v in row.items() if isinstance(v, (int, float))}
    missing = [k for k in (*EVERY_STAGE, *OWN_TERMS[experiment]) if k not in scalars]
    assert not missing, f"not in the W&B run: {missing}; logged: {sorted(scalars)}"
    assert all(math.isfinite(scalars[k]) for k in (*EVERY_STAGE, *OWN_TERMS[experiment]))
    assert scalars["perf/samples_per_sec"] > 0 and scalars["perf/peak_memory_mib"] > 0
    steps = {row["trainer/global_step"] for row in rows if "train/loss" in row}
    assert steps == {0, 1}
    assert rows[-1]["data/skipped/total"] == 0 and rows[-1]["trainer/global_step"] == 2  # the train-end counters
    videos = [row for row in rows if row.get("val/videos/_type") == "videos"]
    assert [row["trainer/global_step"] for row in videos] == [2] and videos[0]["val/videos/count"] >= 2
    if experiment == "demo":  # the evaluation at steps 1 and 2: scalars, a table of 2 rows and 2 videos each time
        evals = [row for row in rows if "eval/loss" in row]
        assert [row["trainer/global_step"] for row in evals] == [1, 2]
        tables = [row for row in rows if row.get("eval/table/_type") == "table-file"]
        assert [(row["trainer/global_step"], row["eval/table/nrows"]) for row in tables] == [(1, 2), (2, 2)]
        assert all(row.get("eval/videos/_type") == "videos" and row["eval/videos/count"] == 2 for row in tables)
        table = next((run_dir / "wandb").glob("offline-run-*/files/" + tables[-1]["eval/table/path"]))
        assert table.is_file()


class _Trainer(SimpleNamespace):
    global_step = 0
    world_size = 2


def test_samples_per_second_counts_the_wait_for_data():
    """From the end of one batch to the end of the next: a loader that takes 0.3 s per batch caps samples/s at
    (4 samples x 2 ranks) / 0.3 s, however fast the step itself is."""
    from vgen.callbacks import ThroughputMonitor

    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=logged.append)
    monitor, trainer, batch = ThroughputMonitor(log_every_n_steps=1), _Trainer(), {"video": torch.zeros(4, 3, 1, 2, 2)}
    monitor.on_train_start(trainer, module)
    for step in range(2):
        time.sleep(0.3)  # the loader
        monitor.on_train_batch_start(trainer, module, batch, step)
        monitor.on_train_batch_end(trainer, module, None, batch, step)  # a step that takes no time
    assert len(logged) == 2
    for values in logged:
        assert values["perf/step_time_s"] >= 0.3
        assert values["perf/samples_per_sec"] <= 8 / 0.3
        assert values["perf/peak_memory_mib"] > 0
