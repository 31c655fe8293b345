"""Shared helpers for the Hydra entry points: where the configs live and how config errors are reported."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path

from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf
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


def precheck_overrides(prog: str, config_name: str, argv: list[str]):
    """Compose the config once before Hydra runs, so a bad key, choice or value type exits with one line naming it.

    Returns the composed config (with its ``hydra`` node), or None where nothing was checked: multirun,
    ``--flags`` and ``hydra.*`` overrides go straight to Hydra, which reports them itself.

    An unknown key is named with the nearest valid keys; a key added with ``+`` under a node whose ``_target_``
    takes fixed arguments, and a value of the wrong type for the target's argument (``trainer.max_steps=abc``),
    are refused the same way (see :func:`check_override`).
    """
    if any(a.startswith("-") or a.lstrip("+~").startswith("hydra") for a in argv):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def composed(overrides: list[str]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)

    try:
        cfg = composed(argv)
    except (HydraException, OmegaConfBaseException) as err:
        message = one_line(str(err))
        unknown = _UNKNOWN_KEY.search(str(err))
        if unknown:
            key = unknown.group(1)
            given = [a for a in argv if a.split("=", 1)[0].lstrip("+~") == key]
            rest = [a for a in argv if a not in given]
            value = given[0].split("=", 1)[1] if given and "=" in given[0] else "..."
            try:
                message = unknown_key_message(key, composed(rest), value)
            except (HydraException, OmegaConfBaseException):
                message = f"unknown key {key}"
        exit_with(prog, message)
    finally:
        GlobalHydra.instance().clear()
    for override in argv:
        key, sep, _ = override.partition("=")
        if sep and not key.startswith("~"):
            problem = check_override(cfg, key.lstrip("+"))
            if problem:
                exit_with(prog, problem)
    return cfg


def exit_with(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'|Key '[^']+' is not in struct.*?full_key: ([\w.\[\]]+)",
                          re.DOTALL)
_SPECIAL_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def _keys(node, prefix: str = "") -> list[str]:
    """Every dotted key under ``node`` (its mappings; list items are not descended into)."""
    keys = []
    for name in node:
        key = f"{prefix}{name}"
        keys.append(key)
        child = node._get_node(name)  # not resolved: interpolations (${hydra:...}) stay as they are
        if isinstance(child, DictConfig):
            keys += _keys(child, key + ".")
    return keys


def _parent(cfg, key: str):
    parent_key, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent_key, throw_on_resolution_failure=False) if parent_key else cfg
    return parent_key, leaf, node


def target_signature(node) -> tuple[str, inspect.Signature] | None:
    """``(target path, signature)`` of a config node with a ``_target_``, or None (no target, not importable)."""
    if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
        return None
    try:
        from hydra.utils import get_object

        return node._target_, inspect.signature(get_object(node._target_))
    except Exception:  # noqa: BLE001 - a target that does not import is reported when it is built
        return None


def unknown_key_message(key: str, cfg, value: str = "...") -> str:
    """``unknown key K; nearest valid keys: ...`` (difflib over the node's keys and its target's arguments).

    The ``+K=value`` advice is given only where it works: the key's node is built by a target that takes ``K``
    as an argument the config does not set, or that takes extra keyword arguments.
    """
    parent_key, leaf, parent = _parent(cfg, key)
    target = target_signature(parent)
    params = target[1].parameters if target else {}
    if leaf in params and params[leaf].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return f"{key} is not set in the config, but {target[0]} takes it: add it with +{key}={value}"
    if isinstance(parent, DictConfig):
        prefix = f"{parent_key}." if parent_key else ""
        names = [str(k) for k in parent if str(k) not in _SPECIAL_KEYS]
        names += [n for n, p in params.items() if n not in names and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        candidates = [f"{prefix}{k}" for k in difflib.get_close_matches(leaf, names, n=3)]
    else:
        candidates = difflib.get_close_matches(key, [k for k in _keys(cfg) if not k.startswith("hydra")], n=3)
    message = f"unknown key {key}"
    message += f"; nearest valid keys: {', '.join(candidates)}" if candidates else "; no valid key is close to it"
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        message += f" ({target[0]} takes extra keyword arguments: add it with +{key}={value})"
    return message


def check_override(cfg, key: str) -> str | None:
    """What is wrong with the overridden ``key`` of the composed ``cfg`` for the target that receives it (a key its
    fixed arguments do not have, or a value its annotation rules out), or None."""
    parent_key, leaf, parent = _parent(cfg, key)
    target = target_signature(parent)
    if target is None or leaf in _SPECIAL_KEYS:
        return None
    path, signature = target
    params = signature.parameters
    if leaf not in params:
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        close = difflib.get_close_matches(leaf, names, n=3)
        return (f"unknown key {key}: {path} takes no argument {leaf!r}"
                + (f"; nearest valid keys: {', '.join(f'{parent_key}.{c}' for c in close)}" if close else ""))
    try:
        value = OmegaConf.select(cfg, key)
    except OmegaConfBaseException:
        return None
    annotation = _annotation(path, leaf, params[leaf])
    if annotation is None or OmegaConf.is_config(value) or _accepts(annotation, value) is not False:
        return None
    return f"{key} must be {_describe(annotation)}, got {value!r}"


def _annotation(path: str, name: str, param: inspect.Parameter):
    if not isinstance(param.annotation, str):
        return None if param.annotation is inspect.Parameter.empty else param.annotation
    try:
        from hydra.utils import get_object

        target = get_object(path)
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target).get(name)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve is not checked
        return None


_SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _accepts(annotation, value) -> bool | None:
    """Whether ``value`` fits ``annotation`` (ints, floats, bools, strings, None, Literal and unions of them), or
    None where the annotation says something this check does not read (then the target decides)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        answers = [_accepts(a, value) for a in typing.get_args(annotation)]
        return True if True in answers else (None if None in answers else False)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if annotation not in _SIMPLE:
        return None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation) -> str:
    kinds, choices = [], []

    def walk(a) -> None:
        origin = typing.get_origin(a)
        if origin in (typing.Union, types.UnionType):
            for member in typing.get_args(a):
                walk(member)
        elif origin is typing.Literal:
            choices.extend(typing.get_args(a))
        else:
            kinds.append(_SIMPLE.get(a, getattr(a, "__name__", str(a))))

    walk(annotation)
    parts = ([f"one of {', '.join(repr(c) for c in choices)}"] if choices else []) + kinds
    return " or ".join(parts)
