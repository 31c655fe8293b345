"""Throughput and memory logging: samples/s across all ranks and the peak memory of this process."""

from __future__ import annotations

import time

import lightning as L
import torch


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ThroughputMonitor(L.Callback):
    """Every ``log_every_n_steps`` steps: ``perf/samples_per_sec`` (all ranks), ``perf/step_time_s`` (per batch)
    and ``perf/peak_memory_mib`` (this process).

    Wall clock over the batches since the last log, each from the end of the previous batch (the start of training
    for the first): the interval holds the wait for the data loader, forward, backward, the optimizer step and
    whatever other callbacks did after the previous batch (periodic checkpoints, validation videos, evaluation),
    so a loader that cannot keep up shows as fewer samples/s.
    """

    def __init__(self, log_every_n_steps: int = 1):
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"callbacks.throughput.log_every_n_steps must be an integer >= 1, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self._since: float | None = None
        self._samples = 0
        self._batches = 0

    def on_train_start(self, trainer, pl_module):
        self._since, self._samples, self._batches = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._since is None:
            return
        self._samples += (batch["latent"] if "latent" in batch else batch["video"]).shape[0] * trainer.world_size
        self._batches += 1
        if trainer.global_step % self.log_every_n_steps:
            return
        now = time.perf_counter()
        elapsed = now - self._since
        pl_module.log_dict({"perf/samples_per_sec": self._samples / max(elapsed, 1e-9),
                            "perf/step_time_s": elapsed / self._batches,
                            "perf/peak_memory_mib": peak_memory_mib(pl_module.device)})
        self._since, self._samples, self._batches = now, 0, 0
