"""Logs the data loader's skipped-sample counters (summed over ranks) so bad data shows up in W&B and train.log."""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L
import torch

from vgen.data.stream import SKIP_REASONS

log = logging.getLogger(__name__)  # propagates to the run's logging: console and <run dir>/train.log


class DataStats(L.Callback):
    """Every ``log_every_n_steps`` steps, and once more when training ends (whatever the interval):
    ``data/skipped/<reason>`` and ``data/skipped/total``, summed over all ranks and DataLoader workers (counted up
    to the last batch trained on), and one rank-zero log line per source when its counts change (at the end: the
    final counts of every source that skipped anything). Reasons: :data:`vgen.data.errors.SKIP_REASONS`. Needs a
    datamodule with ``skip_counts()`` (``vgen.data.VideoDataModule``)."""

    def __init__(self, log_every_n_steps: int = 50):
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"callbacks.data_stats.log_every_n_steps must be an integer >= 1, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self._reported: dict[str, dict] = {}

    @staticmethod
    def _values(per_source: dict[str, Counter]) -> dict[str, float]:
        totals = sum(per_source.values(), Counter())
        values = {f"data/skipped/{reason}": float(totals[reason]) for reason in SKIP_REASONS}
        values["data/skipped/total"] = float(sum(totals.values()))
        return values

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "skip_counts") or trainer.global_step % self.log_every_n_steps:
            return
        per_source = datamodule.skip_counts()
        pl_module.log_dict(self._values(per_source), on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=True)
        self._summarise(trainer, per_source, final=False)

    def on_train_end(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "skip_counts"):
            return
        per_source = datamodule.skip_counts()
        values = self._values(per_source)
        names = list(values)
        summed = trainer.strategy.reduce(torch.tensor([values[n] for n in names], device=pl_module.device),
                                         reduce_op="sum")  # every rank runs this hook: the collective is matched
        if trainer.is_global_zero:
            metrics = dict(zip(names, summed.cpu().tolist(), strict=True))
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
        self._summarise(trainer, per_source, final=True)

    def _summarise(self, trainer, per_source: dict[str, Counter], final: bool) -> None:
        if not trainer.is_global_zero:
            return
        for source, counts in sorted(per_source.items()):
            if final or dict(counts) != self._reported.get(source):
                self._reported[source] = dict(counts)
                log.info("%s: samples skipped %s on rank 0 by reason: %s", source,
                         f"in all ({trainer.global_step} steps)" if final else "so far", dict(sorted(counts.items())))
