"""The one place vgen reads ``torch.save`` files: weights only, and one clear error naming the file.

:func:`load_weights_only` is ``torch.load(weights_only=True)`` plus the checks a user-facing tool needs:

* an empty, truncated or corrupt file, or one that is neither a torch zip archive nor a pickle, raises
  :class:`CheckpointError` ``"<path>: not a readable checkpoint: <why>"``;
* a pickle that would import or call anything beyond tensors and plain containers (a malicious ``__reduce__``,
  a pickled object) raises ``"<path>: not a weights-only checkpoint: refused (...)"``. Nothing in it runs, and
  the message never suggests loading it some unsafe way (torch's own text does: it is not passed through).

Every checkpoint reader (training resume, ``resume=auto``'s scan, export, ``vgen.sample``, sharded metadata,
DeepSpeed's engine files) goes through here.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

REFUSED = "not a weights-only checkpoint: refused"
UNREADABLE = "not a readable checkpoint"
_ZIP_MAGIC = b"PK\x03\x04"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_PLAIN_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode")  # what tensor checkpoints name
_UNSAFE_ADVICE = ("weights_only", "pickle_module", "safe_globals", "add_safe_globals")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, or refused because it is not weights-only.

    The message is one line and starts with the file's path; the command-line tools print it as it is.
    """


def load_weights_only(path: str | Path, map_location: Any = "cpu", mmap: bool = False,
                      allowed_globals: Iterable = ()) -> Any:
    """``torch.load(path, weights_only=True)``, raising :class:`CheckpointError` for anything unusable.

    ``mmap`` maps zip-format files instead of reading them (ignored for legacy pickle files, which cannot be
    mapped). ``allowed_globals`` are extra classes the file may name (e.g. DeepSpeed's loss scaler).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path}: {UNREADABLE}: a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: {UNREADABLE}: empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == _ZIP_MAGIC
    if not is_zip and not _well_formed(path, is_zip):
        raise CheckpointError(f"{path}: {UNREADABLE}: neither a torch zip archive nor a complete pickle ({size} "
                              f"bytes, starting with {head.hex()})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols, suggesting unsafe loading
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(allowed_globals)):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        if _well_formed(path, is_zip):
            raise CheckpointError(f"{path}: {REFUSED} ({_refusal_detail(path, is_zip, str(err))}; vgen reads only "
                                  "tensors and plain containers and never runs code from a checkpoint)") from None
        raise CheckpointError(f"{path}: {UNREADABLE}: truncated or corrupt ({size} bytes)") from None
    except Exception as err:  # noqa: BLE001 - zip, EOF, key and runtime errors all mean a damaged file
        raise CheckpointError(f"{path}: {UNREADABLE}: truncated or corrupt ({size} bytes){_detail(err)}") from None


def _pickle_stream(path: Path, is_zip: bool) -> io.BufferedIOBase:
    """The file's (first) pickle as a stream: the whole file (a legacy torch file starts with its pickles) or a
    zip archive's ``data.pkl``."""
    if not is_zip:
        return open(path, "rb")
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        return io.BytesIO(archive.read(name) if name is not None else b"")


def _well_formed(path: Path, is_zip: bool) -> bool:
    """Whether the file's (first) pickle parses up to its STOP, read as opcodes only (nothing is built or run)."""
    try:
        with _pickle_stream(path, is_zip) as stream:
            for opcode, _, _ in pickletools.genops(stream):
                if opcode.name == "STOP":
                    return True
    except Exception:  # noqa: BLE001 - unknown opcode, exhausted stream, bad zip
        return False
    return False


def _pickle_globals(data) -> list[str]:
    """``module.name`` of every global the pickle imports (GLOBAL, INST and STACK_GLOBAL), read as opcodes."""
    found, strings = [], []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("GLOBAL", "INST"):
            found.append(".".join(str(arg).split(" ", 1)))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        if isinstance(arg, str) and "UNICODE" in opcode.name:
            strings.append(arg)
        if opcode.name == "STOP":
            break
    return found


def _refusal_detail(path: Path, is_zip: bool, text: str) -> str:
    match = _GLOBAL.search(text)
    names = [match.group(1)] if match else []
    if not names:
        try:
            with _pickle_stream(path, is_zip) as stream:
                names = [n for n in _pickle_globals(stream) if not n.startswith(_PLAIN_GLOBALS)]
        except Exception:  # noqa: BLE001 - the detail is a courtesy; the refusal stands without it
            names = []
    if names:
        return f"it would import and call {names[0]}"
    return "it holds pickle operations beyond tensors and plain containers"


def _detail(err: BaseException) -> str:
    """``": <first sentence of err>"``, or nothing where that says nothing (a bare key) or advises unsafe loading."""
    if isinstance(err, (KeyError, EOFError)):
        return ""
    text = " ".join(str(err).split())
    sentence = text.split(". ")[0].rstrip(".")
    if not sentence or any(word in sentence for word in _UNSAFE_ADVICE):
        return ""
    return f": {sentence[:200]}"
