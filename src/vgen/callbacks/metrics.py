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
    """Logs ``perf/samples_per_sec`` (global), ``perf/step_time_s`` and ``perf/peak_memory_mib`` every step."""

    def __init__(self, log_every_n_steps: int = 1):
        self.log_every_n_steps = log_every_n_steps
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is None or trainer.global_step % self.log_every_n_steps:
            return
        elapsed = time.perf_counter() - self._start
        samples = (batch["latent"] if "latent" in batch else batch["video"]).shape[0] * trainer.world_size
        pl_module.log_dict({"perf/samples_per_sec": samples / max(elapsed, 1e-9), "perf/step_time_s": elapsed,
                            "perf/peak_memory_mib": peak_memory_mib(pl_module.device)})
