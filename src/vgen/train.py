"""Training entry point: ``python -m vgen.train experiment=<name> [overrides]``.

Composes the Hydra config, instantiates data, stage, callbacks, loggers and trainer, and fits — resuming from the
newest complete checkpoint in the run directory with ``resume=auto``.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from vgen.callbacks.preemption import resume_after_requeue, slurm_plugins
from vgen.checkpoint.safe_load import CheckpointError
from vgen.config import CONF_DIR, ConfigError, build_or_exit, exit_with, precheck_overrides
from vgen.data.errors import DataError, data_error_message
from vgen.launch.run_id import drop_foreign_wandb_service
from vgen.training.checkpointing import AtomicCheckpointIO, resolve_resume, stored_config

log = logging.getLogger("vgen.train")  # not __main__ under python -m


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


def train(cfg: DictConfig, on_valid: Callable[[DictConfig, L.Trainer], None] | None = None) -> L.Trainer:
    """Build everything from ``cfg`` and fit. ``on_valid(cfg, trainer)`` runs once the whole config has been
    built without error (``python -m vgen.train`` writes ``.hydra/`` there: nothing is written before)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
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
    if on_valid is not None:
        on_valid(cfg, trainer)
    if rank_zero_only.rank == 0:
        log.info("seed %s; output directory: %s", cfg.seed, cfg.paths.output_dir)
        if ckpt_path is not None:
            warn_config_changes(stage.run_config, ckpt_path)
    trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer


IGNORED_CHANGES = ("resume",)  # keys that may differ between a run and the checkpoint it resumes from


def config_changes(now: dict, saved: dict) -> list[tuple[str, object, object]]:
    """``(dotted key, saved value, value now)`` for every leaf that differs (missing on one side: ``<absent>``)."""
    absent = "<absent>"
    a, b = _flatten(saved), _flatten(now)
    keys = sorted(k for k in set(a) | set(b) if k.split(".", 1)[0] not in IGNORED_CHANGES)
    return [(k, a.get(k, absent), b.get(k, absent)) for k in keys if a.get(k, absent) != b.get(k, absent)]


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        return {k: v for name, child in tree.items() for k, v in _flatten(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): tree}


def warn_config_changes(run_config: dict, ckpt_path: str, limit: int = 12) -> None:
    """Log a warning naming the keys where this run's config differs from the one stored in ``ckpt_path``
    (``resume=`` takes the config given now, not the checkpoint's)."""
    try:
        saved = stored_config(ckpt_path)
    except Exception as err:  # noqa: BLE001 - the resume itself reports an unreadable checkpoint
        log.warning("resume: could not read the config stored in %s to compare: %s", ckpt_path, err)
        return
    if saved is None:
        return
    changes = config_changes(run_config, saved)
    if changes:
        # paths that only follow a moved run directory go last, so the settings that changed are the ones named
        moved = _moved_run_dir(run_config, saved)
        changes.sort(key=lambda change: moved(change[1], change[2]))
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:limit])
        more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
        log.warning("resume: this run's config differs from the one stored in %s in %d key(s); the values given now "
                    "apply (give the same overrides again to keep the run as it was): %s%s", ckpt_path,
                    len(changes), shown, more)


def _moved_run_dir(now: dict, saved: dict):
    """A predicate: whether a changed value is a path that only follows the run directory (``paths.*`` moved)."""
    pairs = [(str(saved.get("paths", {}).get(k)), str(now.get("paths", {}).get(k))) for k in ("output_dir", "log_dir")]
    pairs = [(old, new) for old, new in pairs if old != new and old not in ("None", "") and new not in ("None", "")]

    def moved(old, new) -> bool:
        return isinstance(old, str) and isinstance(new, str) and any(
            old.startswith(a) and new == b + old[len(a):] for a, b in pairs)

    return moved


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
                 "NCCL", "ProcessGroup")


def run(cfg: DictConfig, on_valid: Callable[[DictConfig, L.Trainer], None] | None = None) -> L.Trainer:
    """:func:`train` for the command line: config and checkpoint errors exit 2, a source that cannot feed training
    and a failed collective exit 1, each with one line on stderr (a rank whose peer died or hung past
    ``strategy.timeout_s`` must not hang or dump a trace)."""
    import torch.distributed as dist

    try:
        return train(cfg, on_valid)
    except (ConfigError, CheckpointError) as err:
        _discard_new_run_dir()
        print(f"vgen.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except DataError as err:
        print(f"vgen.train: error: {data_error_message(err)}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as err:  # torch.distributed.DistError is a RuntimeError
        if not (isinstance(err, dist.DistError) or any(s in str(err) for s in _PEER_FAILURE)):
            raise
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else os.environ.get("RANK", "?")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"vgen.train: error: rank {rank}: a collective failed, another rank died or did not answer within "
              f"strategy.timeout_s={cfg.strategy.get('timeout_s', 'default')}: {first}", file=sys.stderr, flush=True)
        os._exit(1)  # a process group with a dead peer cannot be shut down cleanly


# ------------------------------------------------------------------------------------------- the command line
_NEW_RUN_DIR: Path | None = None  # the outermost directory this process's Hydra creates (None: it all existed)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` (``path`` itself or a parent) that does not exist yet, or None."""
    missing = None
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing = directory
    return missing


class _HeldFileLog(logging.handlers.MemoryHandler):
    """Holds the records meant for ``train.log`` until the config is valid (:func:`_release_file_log`); a run
    stopped by a config error drops them, so an existing ``train.log`` is left as it was."""

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return False

    def drop(self) -> None:
        self.acquire()
        try:
            self.buffer.clear()
            self.target = None
        finally:
            self.release()


def _hold_file_log() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            root.addHandler(_HeldFileLog(capacity=0, target=handler))


def _release_file_log(keep: bool) -> None:
    """Write the held records to ``train.log`` and log there directly from now on (``keep``), or drop them."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _HeldFileLog):
            target = handler.target
            root.removeHandler(handler)
            if keep:
                handler.flush()
                root.addHandler(target)
            else:
                handler.drop()
                target.close()
            handler.close()


def _discard_new_run_dir() -> None:
    """A run stopped by a config error leaves nothing behind: its held log records are dropped, and the run
    directory is removed if this process made it."""
    _release_file_log(keep=False)
    if _NEW_RUN_DIR is not None and _NEW_RUN_DIR.is_dir():
        shutil.rmtree(_NEW_RUN_DIR, ignore_errors=True)


def _save_hydra_files(cfg: DictConfig, trainer: L.Trainer) -> None:
    """``.hydra/`` (config, hydra config, overrides) as Hydra writes it, once the config has been built."""
    from hydra.core.hydra_config import HydraConfig

    global _NEW_RUN_DIR
    _NEW_RUN_DIR = None  # the config is valid: from here on the run directory is the run's, whatever happens
    _release_file_log(keep=True)
    if not trainer.is_global_zero or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                       ("overrides.yaml", hydra_cfg.overrides.task)):
        (out / name).write_text(OmegaConf.to_yaml(node))


def _route_lightning_logs() -> None:
    """Lightning's messages and Python warnings go through the logging Hydra configured (console on stdout and
    ``train.log``), so stderr carries only errors."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)


def refuse_rerun(cfg: DictConfig) -> str | None:
    """Why this fresh run (no ``resume=``) must not start: its run directory already holds checkpoints."""
    from vgen.callbacks.preemption import restart_count

    if cfg.resume not in (None, "", "none", "null") or restart_count() >= 1:
        return None
    checkpoint_dir = Path(str(cfg.paths.checkpoint_dir))
    existing = sorted(p.name for p in checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    if not existing:
        return None
    return (f"{checkpoint_dir} already holds checkpoints of a run named {cfg.name!r} ({existing[-1]}"
            f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''}): pass resume=auto to continue it, "
            "or another name= to start a new run")


def _run_dir(cfg: DictConfig | None) -> Path | None:
    """The run directory Hydra will use for ``cfg`` (composed with its hydra node), with ``paths.*`` resolvable."""
    from hydra.core.hydra_config import HydraConfig

    if cfg is None:
        return None
    try:
        run_dir = Path(os.path.abspath(str(cfg.hydra.run.dir)))
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        return run_dir
    except Exception:  # noqa: BLE001 - a run directory that does not resolve here: Hydra reports it
        return None


def _kill_loader_workers() -> None:
    """At exit, kill the DataLoader workers still running (after an error the loader was not shut down).

    The workers ignore SIGTERM (a preemption must not kill them before the checkpoint), so multiprocessing's own
    exit handler, which terminates daemonic children with SIGTERM and then joins them, would wait forever.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    drop_foreign_wandb_service()  # e.g. the submitting shell's: a requeued job would find its old run still open
    _route_lightning_logs()
    _hold_file_log()
    atexit.register(_kill_loader_workers)  # runs before multiprocessing's handler (registered at its import)
    run(cfg, on_valid=_save_hydra_files)


def main() -> None:
    global _NEW_RUN_DIR
    composed = precheck_overrides("vgen.train", "train", sys.argv[1:])
    run_dir = _run_dir(composed)
    if run_dir is not None:
        problem = refuse_rerun(composed)
        if problem:
            exit_with("vgen.train", problem)
        _NEW_RUN_DIR = _first_missing(run_dir)
    _hydra_main()


if __name__ == "__main__":
    main()
