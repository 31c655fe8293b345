"""Training entry point: ``python -m vgen.train experiment=<name> [overrides]``.

Composes the Hydra config, instantiates data, stage, callbacks, loggers and trainer, and fits — resuming from the
newest complete checkpoint in the run directory with ``resume=auto``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from vgen.callbacks.preemption import resume_after_requeue, slurm_plugins
from vgen.config import CONF_DIR, ConfigError, build_or_exit, precheck_overrides
from vgen.training.checkpointing import AtomicCheckpointIO, resolve_resume


def train(cfg: DictConfig) -> L.Trainer:
    L.seed_everything(cfg.seed, workers=True)
    with build_or_exit():
        checkpoint_dir = Path(cfg.paths.checkpoint_dir)
        ckpt_path = resolve_resume(resume_after_requeue(cfg.resume, checkpoint_dir), checkpoint_dir)
        datamodule = instantiate(cfg.data)
        if hasattr(datamodule, "check_sources"):
            datamodule.check_sources()
        stage = instantiate(cfg.stage)
        stage.run_config = OmegaConf.to_container(cfg, resolve=True)
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
        loggers = [instantiate(c) for c in cfg.logger.values() if c is not None] if cfg.logger else False
        trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), callbacks=callbacks, logger=loggers,
                              plugins=[AtomicCheckpointIO(), *slurm_plugins()])
    rank_zero_info(f"output directory: {cfg.paths.output_dir}")
    trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        train(cfg)
    except ConfigError as err:
        print(f"vgen.train: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    precheck_overrides("vgen.train", "train", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
