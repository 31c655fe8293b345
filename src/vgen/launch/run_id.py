"""A W&B run id kept in the run directory, so a rerun (``resume=auto``) or a requeued SLURM job continues the same
W&B run instead of starting a new one."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

_ID = re.compile(r"[a-z0-9]{8,64}")


def persistent_run_id(path: str | Path) -> str:
    """The id stored in ``path``; created (8 random base-36 characters) if the file does not exist yet.

    Creation is atomic (a hard link that fails if the file exists), so ranks or jobs racing on a shared file
    system all end up with the first writer's id.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(candidate + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    run_id = path.read_text().strip()
    if not _ID.fullmatch(run_id):
        raise ValueError(f"logger.wandb.run_id_file {path} holds {run_id[:80]!r}, not a W&B run id "
                         f"(8-64 lowercase letters/digits); fix or delete the file")
    return run_id


_SERVICE_TOKEN = re.compile(r"\d+-(\d+)-")


def drop_foreign_wandb_service() -> str | None:
    """Forget a W&B service that another process started; returns the dropped token.

    wandb keeps the address of its service process in ``WANDB_SERVICE``, which children inherit. A job submitted
    from a shell (or notebook, or test process) that had used wandb would connect to *that* service: unreachable
    from another node, and on one host it still holds the killed job's run open, so the requeued job that resumes
    the run id is refused ("run ID ... is in use"). A training process therefore starts its own service unless
    the inherited one was started by this very process (token ``<version>-<pid>-...``).
    """
    token = os.environ.get("WANDB_SERVICE")
    if not token:
        return None
    match = _SERVICE_TOKEN.match(token)
    if match and int(match.group(1)) == os.getpid():
        return None
    del os.environ["WANDB_SERVICE"]
    return token


def resumable_wandb_logger(run_id_file: str | Path, **kwargs) -> WandbLogger:
    """``WandbLogger(**kwargs)`` that resumes the run whose id is in ``run_id_file`` (``resume="allow"``)."""
    return WandbLogger(id=persistent_run_id(run_id_file), resume="allow", **kwargs)


__all__ = ["drop_foreign_wandb_service", "persistent_run_id", "resumable_wandb_logger"]
