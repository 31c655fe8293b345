"""Every distribution strategy trains the tiny model on 2 CPU ranks (gloo) exactly as one process does, saves,
resumes, and exports a sharded checkpoint that equals the unsharded weights.

Two ranks with 2 samples each see the same global batch as one process with 4 (``vgen.training.synthetic``
gives every sample its own data and diffusion-noise seed), dropout is off, CFG dropout is 0 and the model
trains in pixel space, so the only differences left are float summation order: losses agree to 1e-5 relative
over 6 steps. A NaN is injected on
one rank at step 2 in every run: every rank must skip that step together (one process skips it too).

This file is also the worker the tests launch: ``python tests/test_strategies.py '<json spec>'`` trains
through ``vgen.train.train`` (Lightning relaunches the same command for rank 1).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
N = 3  # steps per run: checkpoint at N, resume to 2N
NAN_STEP = 2  # global step (0-based) whose loss is made NaN
SAMPLES = 4  # global batch
STRATEGY_RTOL = 1e-5

# pixel space (identity VAE): the tiny KL autoencoder would draw its posterior sample from the global generator
BASE = ["debug=tiny", "logger=csv", "model/vae=identity", "model.unet.in_channels=3", "model.unet.out_channels=3",
        "model.unet.conditions.text.dropout=0.0", "stage.ema.decay=0.5", "optim.lr=1e-3",
        "optim.warmup_steps=0", f"callbacks.checkpoint.every_n_train_steps={N}", "callbacks.checkpoint.save_top_k=-1"]


# ---------------------------------------------------------------------------------------------------- worker side
class Recorder(L.Callback):
    """Records each step's loss, injects faults, and dumps the gathered full weights and EMA at the end."""

    def __init__(self, out_dir: str, tag: str, no_dropout: bool = True, nan_step: int | list | None = None,
                 nan_rank: int = 0, hang_step: int | None = None, die_step: int | None = None, die_rank: int = 1,
                 dump: bool = True):
        self.out, self.tag = Path(out_dir), tag
        self.nan_steps = set(nan_step) if isinstance(nan_step, Sequence) else {nan_step}
        self.no_dropout, self.nan_rank = no_dropout, nan_rank
        self.hang_step, self.die_step, self.die_rank, self.dump = hang_step, die_step, die_rank, dump
        self.losses: dict[int, float] = {}

    def on_fit_start(self, trainer, pl_module):
        if self.no_dropout:
            for m in pl_module.unet.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._skipped_before = pl_module.nonfinite_steps
        step, rank = trainer.global_step, trainer.global_rank
        if step in self.nan_steps and rank == self.nan_rank:
            batch["video"][0] = float("nan")
        if step == self.die_step and rank == self.die_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.hang_step and rank == 0:
            (self.out / f"hanging-{self.tag}").write_text(str(step))
            time.sleep(120)  # the test kills the whole process group while this step is running

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.nonfinite_steps == self._skipped_before:  # else the step was skipped (on every rank)
            self.losses[trainer.global_step - 1] = float(outputs["loss"] if isinstance(outputs, dict) else outputs)

    def on_train_end(self, trainer, pl_module):
        from safetensors.torch import save_file

        rank = trainer.global_rank
        (self.out / f"losses-{self.tag}-rank{rank}.json").write_text(json.dumps(self.losses))
        (self.out / f"skipped-{self.tag}-rank{rank}.json").write_text(json.dumps(pl_module.nonfinite_steps))
        if not self.dump:
            return
        weights = full_weights(trainer, pl_module)
        ema = pl_module.ema.full_shadow(pl_module.unet) if pl_module.ema is not None else {}
        if rank == 0:
            save_file(weights, str(self.out / f"{self.tag}-model.safetensors"))
            save_file(ema, str(self.out / f"{self.tag}-ema.safetensors"))


def full_weights(trainer, pl_module) -> dict[str, torch.Tensor]:
    """The whole UNet state dict on CPU, gathered from any strategy's shards (collective)."""
    from torch.distributed.tensor import DTensor

    unet = pl_module.unet
    params = list(unet.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in unet.state_dict().items()}


def compose_config(out: Path, overrides: list[str], data: dict | None = None, recorder: dict | None = None,
                   samples: dict | None = None):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.log_dir={out.parent}", *overrides],
                      return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.data = OmegaConf.create({"_target_": "vgen.training.synthetic.SyntheticVideoData", "batch_size": 2,
                                     "num_frames": 4, "resolution": [16, 16], **(data or {})})
        if samples is None:  # validation videos only where a test asks for them (``samples``: callback options)
            cfg.callbacks.sample_videos = None
        else:
            cfg.callbacks.sample_videos = OmegaConf.merge(cfg.callbacks.sample_videos, samples)
        cfg.callbacks.progress = None
        if recorder is not None:
            cfg.callbacks.recorder = OmegaConf.create({"_target_": "test_strategies.Recorder", **recorder})
    return cfg


def worker(spec: dict) -> None:
    from vgen.train import run

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    recorder = {"out_dir": str(out), **spec.get("recorder", {})}
    run(compose_config(out, spec["overrides"], spec.get("data"), recorder, spec.get("samples")))


# ---------------------------------------------------------------------------------------------------- test side
def launch(out: Path, overrides: list[str], recorder: dict, data: dict | None = None, wait: bool = True,
           timeout: float = 420, samples: dict | None = None):
    """Run the worker in a new process group (Lightning starts rank 1 from it); returns the Popen."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"out": str(out), "overrides": overrides, "recorder": recorder, "data": data or {}, "samples": samples}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE",
                                                                      "MASTER_"))}
    env.update(WANDB_MODE="offline", DS_ACCELERATOR="cpu", PYTHONPATH=f"{TESTS}{os.pathsep}{REPO / 'src'}",
               OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    log = open(out / f"log-{recorder['tag']}.txt", "w")  # noqa: SIM115 - the child writes to it after we return
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), json.dumps(spec)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = out / f"log-{recorder['tag']}.txt"
    if wait:
        try:
            proc.wait(timeout=timeout)
        finally:
            kill_group(proc)
        assert proc.returncode == 0, proc.log_path.read_text()[-4000:]
    return proc


def group_alive(proc) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def mean_losses(out: Path, tag: str, world: int) -> dict[int, float]:
    per_rank = [json.loads((out / f"losses-{tag}-rank{r}.json").read_text()) for r in range(world)]
    assert all(set(p) == set(per_rank[0]) for p in per_rank), per_rank
    return {int(s): sum(p[s] for p in per_rank) / world for s in per_rank[0]}


def read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def single_process_run(out: Path, steps: int, **recorder) -> dict:
    """The reference: one process, the whole global batch, in this process."""
    from vgen.train import train

    rec = {"out_dir": str(out), "tag": "single", "nan_step": NAN_STEP, **recorder}
    cfg = compose_config(out, [*BASE, "trainer.devices=1", f"trainer.max_steps={steps}"], {"batch_size": SAMPLES},
                         rec)
    train(cfg)
    return mean_losses(out, rec["tag"], 1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    losses = single_process_run(out, 2 * N)
    assert NAN_STEP not in losses and len(losses) == 2 * N - 1, losses
    return {"losses": losses, "model": read(out / "single-model.safetensors"),
            "ema": read(out / "single-ema.safetensors")}


def export(ckpt: Path, out: Path, ema: bool) -> dict[str, torch.Tensor]:
    args = [sys.executable, "-m", "vgen.checkpoint", "export", str(ckpt), str(out)] + (["--ema"] if ema else [])
    result = subprocess.run(args, check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return read(out)


def assert_close_dicts(actual, expected, rtol, atol, what):
    assert set(actual) == set(expected), f"{what}: keys differ"
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{what} {k}: {m}")


SHARDED = {"deepspeed_zero2": "deepspeed", "deepspeed_zero3": "deepspeed", "fsdp2": "dcp"}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_two_ranks_match_one_process_save_resume_and_export(strategy, reference, tmp_path):
    from vgen.training.checkpointing import read_marker

    out = tmp_path / "run"
    common = [*BASE, f"strategy={strategy}", "trainer.devices=2"]
    rec = {"nan_step": NAN_STEP, "nan_rank": 1}
    launch(out, [*common, f"trainer.max_steps={N}"], {**rec, "tag": "a", "dump": False})
    first = out / "checkpoints" / f"step{N:07d}.ckpt"
    if strategy in SHARDED:
        assert first.is_dir() and read_marker(first)["format"] == SHARDED[strategy]
        assert read_marker(first)["world_size"] == 2
    else:
        assert first.is_file()
    launch(out, [*common, f"trainer.max_steps={2 * N}", "resume=auto"], {**rec, "tag": "b"})

    losses = {**mean_losses(out, "a", 2), **mean_losses(out, "b", 2)}
    assert sorted(losses) == sorted(reference["losses"]), "the NaN step must be skipped on both ranks"
    for step, loss in reference["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=STRATEGY_RTOL), (step, losses, reference["losses"])
    model, ema = read(out / "b-model.safetensors"), read(out / "b-ema.safetensors")
    # AdamW divides by sqrt(v): on weights with near-zero gradients (the zero-initialised last convs) float-order
    # noise moves a few entries by up to ~3e-5 in 5 steps of lr 1e-3; 1e-4 is a tenth of one step
    assert_close_dicts(model, reference["model"], 1e-4, 1e-4, "weights vs one process")
    assert_close_dicts(ema, reference["ema"], 1e-4, 1e-4, "EMA vs one process")

    last = out / "checkpoints" / f"step{2 * N:07d}.ckpt"
    exported = export(last, tmp_path / "model.safetensors", ema=False)
    assert_close_dicts(exported, model, 0, 0, "exported weights vs gathered weights")
    exported_ema = export(last, tmp_path / "ema.safetensors", ema=True)
    assert_close_dicts(exported_ema, {**model, **ema}, 0, 0, "exported EMA vs gathered EMA")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero2_offload", "deepspeed_zero3_offload"])
def test_offload_variants_match_one_process(strategy, reference, tmp_path):
    out = tmp_path / "run"
    launch(out, [*BASE, f"strategy={strategy}", "trainer.devices=2", f"trainer.max_steps={N}"],
           {"tag": "a", "nan_step": NAN_STEP, "nan_rank": 0, "dump": False})
    losses = mean_losses(out, "a", 2)
    expected = {s: v for s, v in reference["losses"].items() if s < N}
    assert sorted(losses) == sorted(expected)
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=STRATEGY_RTOL), (step, losses, expected)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_zero3"])
def test_validation_videos_of_a_sharded_model_sample_on_every_rank(strategy, tmp_path):
    """Each forward of a ZeRO-3 / FSDP2 model gathers its shards from every rank: SampleVideos runs the sampler
    on all ranks (a rank-0-only forward hangs) and rank 0 alone writes the mp4s. ``vgen.sample`` then samples
    from the sharded checkpoint directory itself (its EMA weights, as vgen.checkpoint export consolidates them)."""
    from vgen.data import decode_video
    from vgen.pipeline import VideoPipeline
    from vgen.sample import main

    out = tmp_path / "run"
    samples = {"prompts": ["a red circle moving left", "a blue square moving up"], "every_n_steps": 1,
               "num_frames": 4, "height": 16, "width": 16, "steps": 2}
    launch(out, [*BASE, f"strategy={strategy}", "trainer.devices=2", "trainer.max_steps=2"],
           {"tag": "samples", "dump": False}, samples=samples, timeout=300)
    files = sorted((out / "samples").glob("*.mp4"))
    assert [p.name for p in files] == [f"step_{s:07d}_{i}.mp4" for s in (1, 2) for i in range(2)]
    for path in files:
        clip = decode_video(path.read_bytes(), 4, sample_fps=8, start="first")
        assert clip.frames.shape == (4, 16, 16, 3), path

    sharded = out / "checkpoints" / "step0000002.ckpt"
    assert sharded.is_dir()
    pipe = VideoPipeline.from_checkpoint(sharded)  # the EMA weights by default, as from a .ckpt file
    weights = pipe.unet.state_dict()
    assert_close_dicts(weights, export(sharded, tmp_path / "ema.safetensors", ema=True), 0, 0, "vs exported EMA")
    model = export(sharded, tmp_path / "model.safetensors", ema=False)
    assert any(not torch.equal(weights[k], model[k]) for k in model), "the EMA must differ from the raw weights"
    assert main([f"checkpoint={sharded}", "prompt=a red circle", "steps=2", f"out={tmp_path / 'v.mp4'}"]) == 0
    clip = decode_video((tmp_path / "v.mp4").read_bytes(), 4, sample_fps=8, start="first")
    assert clip.frames.shape == (4, 16, 16, 3)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero3", "fsdp2"])
def test_videocomposer_trains_under_every_kind_of_strategy(strategy, tmp_path):
    """The VideoComposer network (STC encoders and style tokens inside the UNet, sharded with it) on condition
    maps extracted from every clip, 2 ranks, 2 steps, with its all/none/each dropout (some encoders unused in a
    step) and a checkpoint."""
    out = tmp_path / "run"
    maps = {name: {"kind": name} for name in ("local_image", "motion", "sketch", "single_sketch", "mask")}
    launch(out, ["experiment=videocomposer_stage2", *BASE, f"strategy={strategy}", "trainer.devices=2",
                 "trainer.max_steps=2", "model.unet.conditions.text.dropout=0.5"],
           {"tag": "vc", "dump": False}, data={"conditions": maps}, timeout=400)
    losses = json.loads((out / "losses-vc-rank0.json").read_text())
    assert sorted(int(s) for s in losses) == [0, 1] and all(math.isfinite(v) for v in losses.values())
    assert (out / "checkpoints" / "step0000002.ckpt").exists()


@pytest.mark.slow
def test_a_killed_rank_ends_the_others_with_a_message(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    proc = launch(out, [*BASE, "strategy=ddp", "strategy.timeout_s=600", "trainer.devices=2",
                        "trainer.max_steps=50"], {"tag": "kill", "die_step": 2, "die_rank": 0, "dump": False},
                  wait=False)
    try:
        proc.wait(timeout=300)  # rank 0 (the launcher) kills itself at step 2
        assert proc.returncode == -signal.SIGKILL, proc.log_path.read_text()[-3000:]
        died = time.monotonic()
        while time.monotonic() - died < 60 and group_alive(proc):
            time.sleep(0.5)
        survivor_exit = time.monotonic() - died
        assert not group_alive(proc), "rank 1 still running 60 s after rank 0 died"
    finally:
        kill_group(proc)
    log = proc.log_path.read_text()
    line = next((x for x in log.splitlines() if x.startswith("vgen.train: error: rank 1: a collective failed")), None)
    assert line is not None, log[-3000:]
    assert survivor_exit < 60 and time.monotonic() - start < 360


def test_strategy_configs_build_and_bad_names_are_refused():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

    from vgen.training.strategies import STRATEGIES, build_strategy

    assert build_strategy("auto") == "auto"
    assert isinstance(build_strategy("ddp", timeout_s=7), DDPStrategy)
    zero3 = build_strategy("deepspeed_zero3_offload")
    assert isinstance(zero3, DeepSpeedStrategy)
    assert zero3.config["zero_optimization"]["stage"] == 3
    assert zero3.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert zero3.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    zero2 = build_strategy("deepspeed_zero2")
    assert zero2.config["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in zero2.config[
        "zero_optimization"]
    assert isinstance(build_strategy("fsdp2"), ModelParallelStrategy)
    with pytest.raises(ValueError, match=r"strategy.name='zero4' is not one of \['auto', 'ddp'"):
        build_strategy("zero4")
    with pytest.raises(ValueError, match="strategy.timeout_s"):
        build_strategy("ddp", timeout_s=0)
    assert set(STRATEGIES) == {p.stem for p in (REPO / "conf" / "strategy").glob("*.yaml")}


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
