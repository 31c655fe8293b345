"""Preemption-safe training: a signal only raises a flag; the checkpoint is written at the next optimizer-step
boundary, on all ranks together, and then the SLURM job requeues itself.

Lightning's own SLURM auto-requeue saves the checkpoint inside the signal handler, in the middle of whatever
the process was doing (Lightning issue #21406: it fails intermittently), and a first run given
``ckpt_path="hpc"`` fails (#20347). vgen therefore runs Lightning's :class:`SLURMEnvironment` with
``auto_requeue=False`` (:func:`slurm_plugins`) and uses :class:`PreemptionCheckpoint` instead:

1. SIGUSR1 (SLURM's ``--signal=USR1@<s>`` warning before the time limit, or ``scancel --signal=USR1``) or SIGTERM
   (preemption) sets a flag on the rank that received it;
2. after every optimizer step the ranks OR their flags (one tiny all-reduce), so all of them stop at the same step;
3. the checkpoint callback writes ``step<N>.ckpt`` (atomically, on all ranks, as its periodic saves do);
4. global rank 0 runs ``scontrol requeue <job>``; training stops and the run waits for SLURM to end it;
5. the requeued job (``SLURM_RESTART_COUNT >= 1``) resumes from that checkpoint (:func:`resume_after_requeue`) in
   the same run directory, with the same W&B run id (:mod:`vgen.launch.run_id`).

Outside SLURM the same signals save and stop cleanly; there is nothing to requeue.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from vgen.training.checkpointing import find_resume_checkpoint

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def restart_count() -> int:
    """How often SLURM has requeued this job (the variable is unset, not 0, on the first run)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(value) if value.isdigit() else 0


def slurm_plugins() -> list:
    """Lightning's SLURM environment with its own auto-requeue off (see the module docstring); ``[]`` outside SLURM."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def resume_after_requeue(resume: str | None, checkpoint_dir: str | Path) -> str | None:
    """A job SLURM restarted continues from its own newest checkpoint (``resume=auto``), whatever ``resume`` was
    on the first run (that may be a pretrained start point); otherwise ``resume`` is returned unchanged."""
    if restart_count() >= 1 and find_resume_checkpoint(checkpoint_dir) is not None:
        log.info("SLURM restart %d of job %s: resume=auto", restart_count(), slurm_job_id())
        return "auto"
    return resume


def requeue(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; True on success (failures are logged, never raised)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("scontrol requeue %s failed: %s", job_id, err)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (exit %d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    return True


def ignore_preemption_signals_in_worker(worker_id: int | None = None) -> None:
    """``worker_init_fn`` for DataLoader workers: ignore SIGTERM/SIGUSR1/SIGUSR2.

    SLURM signals every process of a job step, data workers included. PyTorch's workers die on SIGTERM, and the
    training process then fails at its next batch ("DataLoader worker ... is killed by signal: Terminated")
    before it reaches the step boundary where it would checkpoint. Workers still exit with their parent.
    """
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def preempted(trainer) -> bool:
    """True once a :class:`PreemptionCheckpoint` has stopped this run (so train-end work can be skipped)."""
    return any(isinstance(c, PreemptionCheckpoint) and c.stopped_at is not None for c in trainer.callbacks)


class PreemptionCheckpoint(L.Callback):
    """On one of ``signals``: checkpoint at the next optimizer step on all ranks, then stop (and requeue under SLURM).

    ``requeue``: under SLURM, requeue the job after the checkpoint (false: save and stop only).
    ``wait_after_requeue_s``: after a requeue the run waits this long for SLURM to end it, so that it does not
    report success (a submitit job would otherwise store the stopped run's result as the job's result).
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True,
                 wait_after_requeue_s: float = 300.0):
        names = [str(name).upper() for name in signals]
        unknown = [name for name in names if not isinstance(getattr(signal, name, None), signal.Signals)]
        if unknown or "SIGKILL" in names or "SIGSTOP" in names:
            raise ValueError(f"callbacks.preemption.signals: {unknown or names} are not signals a process can "
                             f"catch; use names such as SIGUSR1, SIGUSR2, SIGTERM")
        self.signals = [signal.Signals[name] for name in names]
        self.requeue = bool(requeue)
        self.wait_after_requeue_s = float(wait_after_requeue_s)
        self.received: signal.Signals | None = None
        self.stopped_at: int | None = None
        self.requeued = False
        self._previous: dict[signal.Signals, object] = {}
        self._checked_step = -1

    def _on_signal(self, signum, frame) -> None:  # only raise the flag: nothing else is safe inside a handler
        self.received = signal.Signals(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registers its own SIGTERM handler after setup (it raises SIGTERMException at the next step,
        # without a checkpoint): take the signals back.
        self._install()
        log.info("rank %d of world size %d on node %s starts at global step %d (SLURM job %s, restart %d)",
                 trainer.global_rank, trainer.world_size, os.environ.get("SLURMD_NODENAME", socket.gethostname()),
                 trainer.global_step, slurm_job_id(), restart_count())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._checked_step or self.stopped_at is not None:
            return  # not an optimizer-step boundary (gradient accumulation), or already stopping
        self._checked_step = step
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        what = self.received.name if self.received is not None else "another rank's signal"
        log.warning("rank %d: %s -> checkpoint at step %d and stop", trainer.global_rank, what, step)
        self._save(trainer)
        self.stopped_at = step
        trainer.should_stop = True
        job = slurm_job_id() if SLURMEnvironment.detect() else None
        if self.requeue and job is not None:
            ok = False
            if trainer.is_global_zero:  # logged first: SLURM may stop this process's output right after
                log.warning("step-%d checkpoint written; requeueing SLURM job %s", step, job)
                ok = requeue(job)
            self.requeued = bool(trainer.strategy.broadcast(ok, src=0))

    @staticmethod
    def _save(trainer) -> None:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_top_k != 0 and callback.dirpath:
            # the checkpoint callback's own save path: its file name, top-k bookkeeping and "already saved at
            # this step" mark (so it does not save the same step again at train end)
            callback._save_topk_checkpoint(trainer, callback._monitor_candidates(trainer))
            if callback._last_global_step_saved == trainer.global_step:
                return
        path = Path(trainer.default_root_dir) / "checkpoints" / f"step{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(path)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._restore()
        if self.requeued:
            log.warning("this run was requeued: waiting up to %.0f s for SLURM to end it", self.wait_after_requeue_s)
            deadline = time.monotonic() + self.wait_after_requeue_s
            while time.monotonic() < deadline:
                time.sleep(1.0)
            log.error("SLURM did not end the requeued run within %.0f s; exiting", self.wait_after_requeue_s)


__all__ = ["PreemptionCheckpoint", "ignore_preemption_signals_in_worker", "preempted", "requeue", "restart_count",
           "resume_after_requeue", "slurm_job_id", "slurm_plugins"]
