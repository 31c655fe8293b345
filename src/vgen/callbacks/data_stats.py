"""Logs the data loader's skipped-sample counters (summed over ranks) so bad data shows up in W&B."""

from __future__ import annotations

from collections import Counter

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from vgen.data.stream import SKIP_REASONS


class DataStats(L.Callback):
    """Every ``log_every_n_steps`` steps: ``data/skipped/<reason>`` and ``data/skipped/total``, summed over all
    ranks and DataLoader workers (counted up to the last batch trained on), and one rank-zero log line per
    source when its counts change. Needs a datamodule with ``skip_counts()`` (``vgen.data.VideoDataModule``)."""

    def __init__(self, log_every_n_steps: int = 50):
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"callbacks.data_stats.log_every_n_steps must be an integer >= 1, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self._reported: dict[str, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "skip_counts") or trainer.global_step % self.log_every_n_steps:
            return
        per_source = datamodule.skip_counts()
        totals = sum(per_source.values(), Counter())
        values = {f"data/skipped/{reason}": float(totals[reason]) for reason in SKIP_REASONS}
        values["data/skipped/total"] = float(sum(totals.values()))
        pl_module.log_dict(values, on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=True)
        for source, counts in sorted(per_source.items()):
            if dict(counts) != self._reported.get(source):
                self._reported[source] = dict(counts)
                rank_zero_info(f"{source}: samples skipped so far on rank 0 by reason: {dict(sorted(counts.items()))}")
