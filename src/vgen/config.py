"""Shared helpers for the Hydra entry points: where the configs live and how config errors are reported."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A user-facing configuration problem: reported as one line, no traceback."""


def root_cause(err: BaseException) -> BaseException:
    while (err.__cause__ or err.__context__) is not None and isinstance(err, InstantiationException):
        err = err.__cause__ or err.__context__
    return err


@contextlib.contextmanager
def build_or_exit():
    """Turn errors raised while building objects from the config into :class:`ConfigError` (one line).

    ``HYDRA_FULL_ERROR=1`` keeps the full traceback instead (for debugging vgen itself).
    """
    try:
        yield
    except (InstantiationException, ValueError, FileNotFoundError, TypeError, KeyError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        cause = root_cause(err)
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"{type(cause).__name__}: {message}") from err


_NOISE = ("Config search path", "provider=", "Set the environment variable", "object_type=", "See https://hydra.cc")


def one_line(message: str) -> str:
    """Condense Hydra's multi-line composition errors (option lists, search paths) to one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_NOISE)]
    head, options = [], []
    for line in lines:
        (options if options or line.startswith("Available options") else head).append(line)
    text = "; ".join(head)
    if options:
        text += f"; {options[0].rstrip(':')}: " + ", ".join(options[1:])
    return text


def precheck_overrides(prog: str, config_name: str, argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so a bad key or choice exits with one line naming it.

    Only plain ``key=value`` runs are checked (multirun, ``--flags`` and ``hydra.*`` overrides go straight to
    Hydra, which reports them itself).
    """
    if any(a.startswith("-") or a.lstrip("+~").startswith("hydra") for a in argv):
        return
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name=config_name, overrides=argv)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"{prog}: error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
