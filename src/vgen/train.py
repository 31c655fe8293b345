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


def precision_setup(trainer_cfg: DictConfig, strategy) -> tuple[str | None, list]:
    """``16-mixed`` on CPU processes gets fp16 autocast with a dynamic loss scaler (Lightning would switch such
    runs to bf16); everything else goes to Lightning as configured."""
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    precision = str(trainer_cfg.precision)
    cpu = trainer_cfg.accelerator == "cpu" or (trainer_cfg.accelerator == "auto" and not torch.cuda.is_available())
    if precision == "16-mixed" and cpu and not isinstance(strategy, (DeepSpeedStrategy, ModelParallelStrategy)):
        return None, [MixedPrecision("16-mixed", "cpu")]
    return precision, []


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
        strategy = instantiate(cfg.strategy)
        precision, precision_plugins = precision_setup(cfg.trainer, strategy)
        trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers,
                              precision=precision,
                              plugins=[AtomicCheckpointIO(), *slurm_plugins(), *precision_plugins])
    rank_zero_info(f"output directory: {cfg.paths.output_dir}")
    trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
                 "NCCL", "ProcessGroup")


def run(cfg: DictConfig) -> L.Trainer:
    """:func:`train` for the command line: config errors exit 2 and a failed collective exits 1, each with one
    line on stderr (a rank whose peer died or hung past ``strategy.timeout_s`` must not hang or dump a trace)."""
    import torch.distributed as dist

    try:
        return train(cfg)
    except ConfigError as err:
        print(f"vgen.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:  # torch.distributed.DistError is a RuntimeError
        if not (isinstance(err, dist.DistError) or any(s in str(err) for s in _PEER_FAILURE)):
            raise
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else os.environ.get("RANK", "?")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"vgen.train: error: rank {rank}: a collective failed, another rank died or did not answer within "
              f"strategy.timeout_s={cfg.strategy.get('timeout_s', 'default')}: {first}", file=sys.stderr, flush=True)
        os._exit(1)  # a process group with a dead peer cannot be shut down cleanly


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    run(cfg)


def main() -> None:
    precheck_overrides("vgen.train", "train", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
