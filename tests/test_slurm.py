"""SLURM: sbatch rendering, the preemption callback, and (against a real local cluster, see
launch/local_cluster/up.sh, started by .ci/run) 2-node training, USR1 -> checkpoint -> requeue -> exact resume,
a data_pipelines job array, and a Hydra multirun through the submitit launcher.

The cluster tests skip, saying why, where no SLURM cluster answers. They submit all their jobs at once (module
fixture) so that the group's wall time is about that of its slowest job, not the sum.
"""

import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF_DIR, REPO
from vgen.callbacks.checkpoint import StepCheckpoint
from vgen.callbacks.preemption import (
    PreemptionCheckpoint,
    ignore_preemption_signals_in_worker,
    preempted,
    resume_after_requeue,
    slurm_job_id,
)
from vgen.launch.run_id import drop_foreign_wandb_service, persistent_run_id
from vgen.launch.sbatch import LaunchError, shard_ranges

PY = sys.executable
RANK_LINE = re.compile(r"rank (\d+) of world size (\d+) on node (\S+) starts at global step (\d+) "
                       r"\(SLURM job (\S+), restart (\d+)\)")
STOP_LINE = re.compile(r"rank (\d+): SIGUSR1 -> checkpoint at step (\d+) and stop")
MAX_STEPS = 12
SIGNAL_AFTER_STEP = 2  # the preempted run gets USR1 once its step-2 checkpoint exists
JOB_TIMEOUT_S = 270
# the array job: 4 video and 2 image shards of tiny clips, split over 3 tasks as 0:2, 2:3, 3:4
SYNTHETIC_ARGS = ["--videos", "8", "--images", "4", "--shard-size", "2", "--frames", "4", "--size", "16"]


def launch(*args, cwd=REPO, env=None, check=True):
    result = subprocess.run([PY, "-m", "vgen.launch", *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


# ---------------------------------------------------------------------------------------------- no cluster needed

def compose_with_slurm_launcher(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)


def test_slurm_launcher_config_follows_the_trainer_and_asks_for_usr1_and_requeue():
    cfg = compose_with_slurm_launcher("trainer.num_nodes=16", "trainer.devices=8", "hydra.launcher.gpus_per_node=8")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (16, 8, 8)
    assert launcher.additional_parameters.signal == f"USR1@{launcher.signal_delay_s}"
    assert launcher.additional_parameters.requeue is True
    assert launcher.max_num_timeout == 0, "submitit must not resubmit on its own: vgen requeues itself"


def test_rendered_train_script_has_every_setting_and_resumes(tmp_path):
    result = launch("train", "experiment=demo", "debug=tiny", "trainer.num_nodes=2", "trainer.devices=1",
                    f"paths.log_dir={tmp_path}", "name=r1", "hydra.launcher.partition=gpu",
                    "hydra.launcher.account=proj7", "hydra.launcher.qos=high", "hydra.launcher.cpus_per_task=6",
                    "hydra.launcher.mem_gb=64", "hydra.launcher.timeout_min=90", "hydra.launcher.signal_delay_s=300",
                    "+hydra.launcher.additional_parameters.exclusive=true",
                    "hydra.launcher.setup=[module load cuda]")
    script = tmp_path / "r1" / "launch.sbatch"
    assert str(script) in result.stderr
    text = script.read_text()
    for line in ["#SBATCH --job-name=r1", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj7", "#SBATCH --qos=high",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --mem=64G", "#SBATCH --time=90", "#SBATCH --signal=USR1@300",
                 "#SBATCH --requeue", "#SBATCH --exclusive", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path}/r1/slurm-%j.out", f"#SBATCH --chdir={REPO}", "module load cuda"]:
        assert line in text.splitlines(), f"{line!r} missing from\n{text}"
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith("name=r1 resume=auto"), srun
    assert "hydra.launcher" not in srun[0] and f"{PY} -u -m vgen.train experiment=demo" in srun[0]
    assert text.index("module load cuda") < text.index("srun ")


@pytest.mark.parametrize("overrides,needle", [
    (["trainer.devices=auto"], "trainer.devices must be an integer"),
    (["trainer.devices=2", "hydra.launcher.nodes=3"], "hydra.launcher.nodes=3"),
    (["trainer.devices=1", "hydra.launcher.partiton=x"], "hydra.launcher.partiton"),
])
def test_bad_launch_settings_fail_with_one_line_naming_the_key(overrides, needle, tmp_path):
    result = launch("train", f"paths.log_dir={tmp_path}", *overrides, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("vgen.launch: error:"), result.stderr
    assert not list(tmp_path.rglob("*.sbatch")), "nothing is written for a bad launch"


def test_shard_ranges_are_disjoint_contiguous_and_cover_all_shards():
    assert shard_ranges(3, 8) == [(0, 3), (3, 6), (6, 8)]
    assert shard_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for tasks, shards in [(1, 1), (3, 10), (7, 100)]:
        covered = [i for a, b in shard_ranges(tasks, shards) for i in range(a, b)]
        assert covered == list(range(shards))
    with pytest.raises(LaunchError, match="--tasks=5"):
        shard_ranges(5, 3)


def test_rendered_array_script_gives_each_task_its_own_range(tmp_path):
    launch("array", "--tasks", "3", "--shards", "8", "--log-dir", str(tmp_path), "--name", "shards",
           "--partition", "cpu", "--time", "30", "--sbatch", "mail-type=FAIL", "--setup", "source env.sh", "--",
           "python", "data_pipelines/make_shards.py", "--out", "out dir")
    lines = (tmp_path / "shards.sbatch").read_text().splitlines()
    for line in ["#SBATCH --job-name=shards", "#SBATCH --array=0-2", "#SBATCH --ntasks=1", "#SBATCH --partition=cpu",
                 "#SBATCH --time=30", "#SBATCH --mail-type=FAIL", f"#SBATCH --output={tmp_path}/slurm-%A_%a.out",
                 "RANGES=(0:3 3:6 6:8)", "source env.sh"]:
        assert line in lines, f"{line!r} missing from {lines}"
    srun = [line for line in lines if line.startswith("srun ")]
    # the explicit range is the task's whole share: array-aware tools must not split it again
    expected = ("srun env -u SLURM_ARRAY_TASK_ID -u SLURM_ARRAY_TASK_COUNT python data_pipelines/make_shards.py "
                "--out 'out dir' --shard-range \"$range\"")
    assert srun == [expected], srun
    result = launch("array", "--tasks", "4", "--shards", "2", "--log-dir", str(tmp_path), "--", "true", check=False)
    assert result.returncode == 2 and "--tasks=4 must be between 1 and --shards=2" in result.stderr


def test_wandb_run_id_is_created_once_and_reused(tmp_path):
    path = tmp_path / "wandb" / "run_id"
    first = persistent_run_id(path)
    assert re.fullmatch(r"[a-z0-9]{8}", first)
    assert persistent_run_id(path) == first
    assert not list(path.parent.glob("*.tmp"))
    path.write_text("not an id!\n")
    with pytest.raises(ValueError, match="logger.wandb.run_id_file"):
        persistent_run_id(path)


def test_a_wandb_service_started_by_another_process_is_not_used(monkeypatch):
    """The submitting process's service (inherited through the job's environment) is dropped; this process's own
    service is kept. The 2-node requeue test below submits its jobs with such a foreign token."""
    foreign = "3-1-unix-/tmp/wandb-submitting-shell.sock"
    monkeypatch.setenv("WANDB_SERVICE", foreign)
    assert drop_foreign_wandb_service() == foreign and "WANDB_SERVICE" not in os.environ
    own = f"3-{os.getpid()}-unix-/tmp/wandb-this-process.sock"
    monkeypatch.setenv("WANDB_SERVICE", own)
    assert drop_foreign_wandb_service() is None and os.environ["WANDB_SERVICE"] == own


def test_requeued_job_resumes_from_its_own_checkpoint(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_after_requeue("pretrained.ckpt", ckpt_dir) == "pretrained.ckpt"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_after_requeue(None, ckpt_dir) is None, "no checkpoint yet: nothing to resume"
    ckpt_dir.mkdir()
    torch.save({"state_dict": {}, "global_step": 3}, ckpt_dir / "step0000003.ckpt")
    assert resume_after_requeue(None, ckpt_dir) == "auto"
    assert resume_after_requeue("pretrained.ckpt", ckpt_dir) == "auto"
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm_job_id() == "40_2"


class _Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(256, 4, generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=4)


class _SignalAtStep(L.Callback):
    def __init__(self, signum, step):
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            handler = signal.getsignal(self.signum)
            # never kill the test process: only signal once the preemption handler is in place
            assert getattr(handler, "__self__", None).__class__ is PreemptionCheckpoint, handler
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_checkpoints_at_the_next_step_and_stops_outside_slurm(signum, tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    before = signal.getsignal(signum)
    preemption = PreemptionCheckpoint()
    checkpoints = StepCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=100)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=50, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[_SignalAtStep(signum, 3), preemption, checkpoints])
    trainer.fit(_Linear())
    assert trainer.global_step == 3 and preemption.stopped_at == 3 and not preemption.requeued and preempted(trainer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step0000003.ckpt"]
    saved = torch.load(tmp_path / "checkpoints" / "step0000003.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert torch.equal(saved["state_dict"]["layer.weight"], trainer.lightning_module.layer.weight)
    assert signal.getsignal(signum) == before, "handlers are restored after fit"


class _Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(10_000)


def test_data_workers_survive_the_preemption_signals():
    """SLURM signals the data workers too; with the worker_init_fn they keep serving batches."""
    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=None, num_workers=2, persistent_workers=True,
                                         worker_init_fn=ignore_preemption_signals_in_worker)
    iterator = iter(loader)
    first = [next(iterator) for _ in range(4)]
    pids = [str(worker.pid) for worker in iterator._workers]
    # sent by another process, as slurmstepd does (a worker exits quietly only when its parent sends SIGTERM)
    for name in ("TERM", "USR1"):
        subprocess.run(["kill", f"-{name}", *pids], check=True, timeout=10)
    time.sleep(0.5)
    more = [next(iterator) for _ in range(36)]  # well past the 4 batches prefetched before the signals
    assert all(worker.is_alive() for worker in iterator._workers)
    assert sorted(first + more) == sorted(list(range(20)) * 2), "both workers go on from where they were"
    del iterator


def test_unknown_signal_name_is_a_config_error():
    with pytest.raises(ValueError, match="callbacks.preemption.signals"):
        PreemptionCheckpoint(signals=["SIGUSR9"])


# ---------------------------------------------------------------------------------------------- real local cluster

@functools.lru_cache(maxsize=1)
def cluster_problem() -> str | None:
    """Why no usable SLURM cluster is here (None if sbatch works and 2 nodes are up)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM client (sbatch/sinfo) on PATH: start the local cluster with launch/local_cluster/up.sh " \
               "(root, Debian 12), as .ci/run does"
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, capture_output=True, text=True,
                                timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if result.returncode != 0:
        return f"slurmctld is not answering: {(result.stderr.strip() or 'sinfo failed').splitlines()[0]}"
    usable = {line.split()[0] for line in result.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].rstrip("*~#") in ("idle", "mixed", "allocated")}
    if len(usable) < 2:
        return f"need 2 SLURM nodes up, sinfo shows: {result.stdout.strip() or 'none'}"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONFAULTHANDLER="1", HYDRA_FULL_ERROR="1")
    # as when the submitting shell had used wandb (CI: this pytest process, after the W&B tests): the jobs inherit
    # the address of a service that is not theirs, which a requeued job must not use (its old run is still open)
    env["WANDB_SERVICE"] = "3-1-unix-/tmp/wandb-submitting-shell.sock"
    return env


def job_active(job: str) -> bool:
    result = subprocess.run(["squeue", "-h", "-j", job], check=False, capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and bool(result.stdout.strip())


def wait_for(predicate, timeout_s: float, what: str, interval=0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def job_info(job: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job], check=False, capture_output=True, text=True,
                          timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def log_tail(path: Path, n=40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else f"({path} missing)"


def finished(job: str, log: Path) -> dict:
    """Wait for ``job`` to leave the queue; its final ``scontrol show job`` fields."""
    try:
        wait_for(lambda: not job_active(job), JOB_TIMEOUT_S, f"SLURM job {job}", interval=1.0)
    except AssertionError as err:
        raise AssertionError(f"{err}; log tail:\n{log_tail(log)}") from None
    return job_info(job)


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Submits everything at once: an uninterrupted and a to-be-preempted 2-node run, a 3-task data-pipeline
    array and a 2-job Hydra multirun; signals the preempted run once it has taken SIGNAL_AFTER_STEP steps."""
    root = tmp_path_factory.mktemp("slurm")
    env = job_env()
    data = root / "data"
    subprocess.run([PY, str(REPO / "data_pipelines" / "synthetic.py"), "--out", str(data / "demo"), "--videos", "64",
                    "--images", "32", "--shard-size", "8"], check=True, capture_output=True, env=env)
    common = ["experiment=demo", "debug=tiny", "logger=wandb", "strategy=ddp", "trainer.num_nodes=2",
              "trainer.devices=1", f"trainer.max_steps={MAX_STEPS}", "callbacks.checkpoint.every_n_train_steps=1",
              "callbacks.checkpoint.save_top_k=-1", f"paths.log_dir={root / 'out'}", f"paths.data_dir={data}",
              "callbacks.preemption.wait_after_requeue_s=60"]
    submitted: list[str] = []
    runs = {}
    sweep = None
    try:
        for name in ("preempted", "reference"):
            job = launch("train", "--submit", *common, f"name={name}", env=env).stdout.strip()
            submitted.append(job)
            runs[name] = (job, root / "out" / name)
        array_out = root / "pipeline"
        array_job = launch("array", "--tasks", "3", "--shards", "4", "--log-dir", str(array_out / "logs"), "--submit",
                           "--", PY, str(REPO / "data_pipelines" / "synthetic.py"), "--out", str(array_out / "data"),
                           *SYNTHETIC_ARGS, env=env).stdout.strip()
        submitted.append(array_job)
        sweep_log = root / "multirun.log"
        sweep_name = f"vgen-test-sweep-{os.getpid()}"  # to cancel its jobs by name if the test stops early
        with open(sweep_log, "w") as log:
            sweep = subprocess.Popen([PY, "-m", "vgen.train", "-m", "hydra/launcher=slurm", "experiment=demo",
                                      "debug=tiny", "trainer.devices=1", "seed=1,2", "name=sweep",
                                      f"paths.log_dir={root / 'out'}", f"paths.data_dir={data}",
                                      "hydra.launcher.timeout_min=10", f"hydra.launcher.name={sweep_name}"],
                                     cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        job, run_dir = runs["preempted"]
        step_ckpt = run_dir / "checkpoints" / f"step{SIGNAL_AFTER_STEP:07d}.ckpt"
        try:
            wait_for(step_ckpt.exists, JOB_TIMEOUT_S, f"{step_ckpt.name} of the preempted run")
        except AssertionError as err:
            raise AssertionError(f"{err}; log tail:\n{log_tail(run_dir / f'slurm-{job}.out')}") from None
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        yield {"root": root, "runs": runs, "array": (array_job, array_out), "sweep": (sweep, sweep_log, root / "out")}
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.terminate()
            sweep.wait(timeout=30)
        leftover = [job for job in submitted if job_active(job)]
        if leftover:
            subprocess.run(["scancel", *leftover], check=False, timeout=30)
        if sweep is not None:
            subprocess.run(["scancel", f"--name={sweep_name}"], check=False, timeout=30)
        for ckpt_dir in (root / "out").glob("*/checkpoints"):
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # ~0.5 GB of per-step checkpoints


def rank_lines(log: Path) -> list[tuple[int, int, str, int, str, int]]:
    return [(int(r), int(w), node, int(step), job, int(restart))
            for r, w, node, step, job, restart in RANK_LINE.findall(log.read_text(errors="replace"))]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def differing(a: dict, b: dict, prefix="") -> list[str]:
    """Keys whose tensors (recursively) are not bit-identical."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b) else [prefix]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [prefix + " (keys)"]
        return [d for k in a for d in differing(a[k], b[k], f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [prefix + " (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differing(x, y, f"{prefix}[{i}]")]
    return [] if a == b else [prefix]


@pytest.fixture(scope="module")
def reference_run(jobs):
    job, run_dir = jobs["runs"]["reference"]
    info = finished(job, run_dir / f"slurm-{job}.out")
    return job, run_dir, info


@pytest.fixture(scope="module")
def preempted_run(jobs):
    job, run_dir = jobs["runs"]["preempted"]
    info = finished(job, run_dir / f"slurm-{job}.out")
    return job, run_dir, info


@pytest.mark.slow
def test_two_node_sbatch_training_completes_with_one_rank_per_node(reference_run):
    job, run_dir, info = reference_run
    log = run_dir / f"slurm-{job}.out"
    assert info.get("JobState") == "COMPLETED", f"{info.get('JobState')}\n{log_tail(log)}"
    starts = rank_lines(log)
    assert sorted((rank, world, step) for rank, world, _, step, _, _ in starts) == [(0, 2, 0), (1, 2, 0)], starts
    assert {node for _, _, node, _, _, _ in starts} == {"node1", "node2"}, "each emulated node ran one rank"
    final = load(run_dir / "checkpoints" / f"step{MAX_STEPS:07d}.ckpt")
    assert final["global_step"] == MAX_STEPS


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_from_that_step(preempted_run, reference_run):
    job, run_dir, info = preempted_run
    log = run_dir / f"slurm-{job}.out"
    text = log.read_text(errors="replace")
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", f"{info}\n{log_tail(log)}"
    stops = {int(rank): int(step) for rank, step in STOP_LINE.findall(text)}
    assert set(stops) == {0, 1} and len(set(stops.values())) == 1, f"both ranks stop at one step: {stops}"
    stop_step = stops[0]
    assert SIGNAL_AFTER_STEP <= stop_step < MAX_STEPS
    assert f"step-{stop_step} checkpoint written; requeueing SLURM job {job}" in text
    assert f"SLURM restart 1 of job {job}: resume=auto" in text
    starts = rank_lines(log)
    first = sorted((r, step, restart) for r, _, _, step, _, restart in starts if restart == 0)
    second = sorted((r, step, restart) for r, _, _, step, _, restart in starts if restart == 1)
    assert first == [(0, 0, 0), (1, 0, 0)] and second == [(0, stop_step, 1), (1, stop_step, 1)], starts
    assert f"resuming from {run_dir / 'checkpoints' / f'step{stop_step:07d}.ckpt'}" in text
    # the same W&B run: both offline runs carry the id kept in the run directory
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{run_id}") for name in offline), offline
    # the preemption checkpoint is the uninterrupted run's state at that step, bit for bit
    _, ref_dir, _ = reference_run
    ours, theirs = (load(d / "checkpoints" / f"step{stop_step:07d}.ckpt") for d in (run_dir, ref_dir))
    for key in ("state_dict", "optimizer_states", "ema"):
        assert not differing(ours[key], theirs[key]), f"{key} differs at step {stop_step}"


@pytest.mark.slow
def test_requeued_run_ends_with_the_uninterrupted_runs_weights(preempted_run, reference_run):
    """Needs the data-loader position (issue 4) and every rank's RNG state (issue 5) in the checkpoint."""
    _, run_dir, _ = preempted_run
    _, ref_dir, _ = reference_run
    name = f"step{MAX_STEPS:07d}.ckpt"
    ours, theirs = load(run_dir / "checkpoints" / name), load(ref_dir / "checkpoints" / name)
    assert ours["global_step"] == theirs["global_step"] == MAX_STEPS
    diff = differing(ours["state_dict"], theirs["state_dict"]) + differing(ours["ema"], theirs["ema"])
    assert not diff, f"{len(diff)} tensors differ from the uninterrupted run, e.g. {diff[:3]}"


def shard_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.tar"))}


@pytest.mark.slow
def test_data_pipeline_array_writes_disjoint_shards_and_one_task_reruns_alone(jobs, tmp_path):
    job, out = jobs["array"]
    logs = out / "logs"
    info = finished(job, logs / f"slurm-{job}_0.out")
    data = out / "data"
    # the same tool run once over all shards, in this process's machine: the array must give the same bytes
    subprocess.run([PY, str(REPO / "data_pipelines" / "synthetic.py"), "--out", str(tmp_path), *SYNTHETIC_ARGS],
                   check=True, capture_output=True, env=job_env())
    assert shard_digests(data) == shard_digests(tmp_path) and len(shard_digests(data)) == 6, info
    for task, (a, b) in enumerate([(0, 2), (2, 3), (3, 4)]):
        text = (logs / f"slurm-{job}_{task}.out").read_text()
        assert f"array task {task}: shards {a}:{b}" in text, text
    before = shard_digests(data)
    mtimes = {p.name: p.stat().st_mtime_ns for p in data.glob("*.tar")}
    (data / "videos-000002.tar").unlink()  # task 1's output (shard range 2:3), as if that task had failed
    script = logs / "synthetic.sbatch"
    rerun = subprocess.run(["sbatch", "--parsable", "--array=1", str(script)], capture_output=True, text=True,
                           check=True, timeout=60, env=job_env()).stdout.strip().split(";")[0]
    finished(rerun, logs / f"slurm-{rerun}_1.out")
    assert "array task 1: shards 2:3" in (logs / f"slurm-{rerun}_1.out").read_text()
    assert shard_digests(data) == before, "the rerun task rewrote its shard with identical bytes"
    assert {p.name: p.stat().st_mtime_ns for p in data.glob("*.tar") if p.name != "videos-000002.tar"} == \
           {k: v for k, v in mtimes.items() if k != "videos-000002.tar"}, "other tasks' shards untouched"
    assert not (logs / f"slurm-{rerun}_0.out").exists() and not (logs / f"slurm-{rerun}_2.out").exists()


@pytest.mark.slow
def test_hydra_multirun_through_submitit_completes_two_jobs(jobs):
    process, log, out = jobs["sweep"]
    try:
        process.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"multirun did not finish in {JOB_TIMEOUT_S} s:\n{log_tail(log)}") from None
    assert process.returncode == 0, log_tail(log)
    for job_num, seed in ((0, 1), (1, 2)):
        run = out / "multirun" / "sweep" / str(job_num)
        ckpt = load(run / "checkpoints" / "step0000002.ckpt")
        assert ckpt["global_step"] == 2 and ckpt["vgen_config"]["seed"] == seed
    submitted = list((out / "multirun" / "sweep" / ".submitit").glob("*/*_submission.sh"))
    assert len(submitted) == 1 and "#SBATCH --array=0-1" in submitted[0].read_text(), "one 2-task job array"
