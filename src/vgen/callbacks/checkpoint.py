"""Step-based checkpointing that also saves when training stops (so ``max_steps=N`` always leaves step N)."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` keyed on the global step; keeps the newest ``save_top_k`` and saves at train end."""

    def __init__(self, dirpath: str, every_n_train_steps: int = 1000, save_top_k: int = 3):
        if every_n_train_steps <= 0:
            raise ValueError(f"callbacks.checkpoint.every_n_train_steps must be > 0, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_train_steps, save_top_k=save_top_k, monitor="step",
                         mode="max", save_last=False, save_on_train_epoch_end=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step and self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
