"""What the ``data_pipelines/`` tools share: work splitting (``--shard-range``, SLURM arrays, ``--workers``),
atomic shard writing, reading shards sample by sample, and merging per-shard stats into a report."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import webdataset as wds

from vgen.data.shards import read_shard

SLURM_HELP = (
    "Work is split by output shard: --shard-range A:B does shards A..B-1; under a SLURM array "
    "(SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT set) each task takes its contiguous slice of that range "
    "(of all shards without --shard-range). Complete shards are skipped, so a rerun resumes; --workers N runs "
    "N shards at a time in this task."
)


class ToolParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line on stderr (``<prog>: error: ...``, exit 2), like vgen's other tools."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def fail(prog: str, message: str, code: int = 2):
    """Stop a tool with one line on stderr."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_range(text: str) -> tuple[int, int]:
    """``A:B`` (0 <= A < B) -> (A, B); the argparse type of ``--shard-range``."""
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(start) >= int(stop):
        raise argparse.ArgumentTypeError(f"expected A:B with 0 <= A < B (shard indices, B excluded), got {text!r}")
    return int(start), int(stop)


def add_work_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-range", type=parse_range, metavar="A:B",
                        help="only output shards A..B-1 (a SLURM array task then takes its slice of these)")
    parser.add_argument("--workers", type=int, default=1, help="shards processed in parallel by this task")
    parser.add_argument("--overwrite", action="store_true", help="rewrite shards that already exist")


def task_shards(num_shards: int, shard_range: tuple[int, int] | None = None,
                environ: dict | None = None) -> range:
    """The output shards this task does: ``shard_range`` (clipped to ``num_shards``), then this SLURM array
    task's contiguous share of it when ``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT`` are set."""
    environ = os.environ if environ is None else environ
    start, stop = shard_range or (0, num_shards)
    start, stop = min(max(start, 0), num_shards), min(max(stop, 0), num_shards)
    task, count = environ.get("SLURM_ARRAY_TASK_ID"), environ.get("SLURM_ARRAY_TASK_COUNT")
    if task is None or count is None:
        return range(start, stop)
    index, count = int(task) - int(environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(count)
    if not 0 <= index < count:
        raise ValueError(f"SLURM_ARRAY_TASK_ID={task} is outside an array of {count} tasks "
                         "(SLURM_ARRAY_TASK_MIN is taken as the first)")
    total = stop - start
    task = index
    return range(start + total * task // count, start + total * (task + 1) // count)


def run_shards(function: Callable[[int], dict | None], shards: Iterable[int], workers: int) -> list[dict]:
    """``function(shard)`` for every shard, ``workers`` at a time in processes (1 = in this process)."""
    shards = list(shards)
    if workers <= 1 or len(shards) <= 1:
        return [result for result in map(function, shards) if result is not None]
    with ProcessPoolExecutor(min(workers, len(shards))) as pool:
        return [result for result in pool.map(function, shards) if result is not None]


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a per-process temporary name and rename, so ``path`` exists only when complete."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def tar_bytes(samples: Iterable[dict[str, bytes]]) -> bytes:
    """A tar of samples ``{"__key__": key, ext: bytes, ...}`` -> members ``key.ext``, with fixed metadata
    (mtime 0, mode 0644) so the bytes depend only on the contents."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for extension, data in sample.items():
                if extension.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def expand_inputs(patterns: list[str]) -> list[str]:
    """Shard paths from brace patterns, files or directories (their ``*.tar``, sorted).

    Raises :class:`FileNotFoundError` naming them when a local shard is missing or empty (0 bytes): a tool must
    not write (and mark complete) an output for an input it never read. Remote URLs (``pipe:``, ...) pass.
    """
    urls = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            urls += sorted(str(p) for p in Path(pattern).glob("*.tar"))
        else:
            urls += wds.shardlists.expand_urls(pattern)
    if not urls:
        raise FileNotFoundError(f"--input: no shards in {' '.join(patterns)}")
    missing = [url for url in urls if _is_local(url) and not _nonempty_file(url)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"--input: {len(missing)} of {len(urls)} shards are missing or empty: {shown} "
                                f"(from {' '.join(patterns)})")
    return urls


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _nonempty_file(url: str) -> bool:
    path = urlparse(url).path if url.startswith("file:") else url
    return os.path.isfile(path) and os.path.getsize(path) > 0


def split_failed(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(written, failed)``: per-shard results, where a failed one is ``{"input": url, "failed": [errors]}``."""
    return [r for r in results if "failed" not in r], [r for r in results if "failed" in r]


def report_failed(prog: str, failed: list[dict]) -> None:
    """Exit 1 with one line naming the input shards that could not be read whole (their outputs were not
    written, so a rerun retries them)."""
    if failed:
        shown = "; ".join(f"{f['input']} ({f['failed'][0]})" for f in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        fail(prog, f"{len(failed)} input shard(s) could not be read whole, so their outputs were not written (a "
                   f"rerun retries them): {shown}{more}", code=1)


def shard_samples(url: str) -> tuple[Iterator[dict], list[str]]:
    """Raw samples of one shard and a list that collects its read errors (as text)."""
    errors: list[str] = []
    return read_shard(url, lambda _url, error: errors.append(f"{type(error).__name__}: {error}")), errors


def write_report(out: Path, name: str, merge: Callable[[list[dict]], dict]) -> dict:
    """Merge every ``*.stats.json`` sidecar in ``out`` into ``out/name`` (atomically) and return it."""
    sidecars = sorted(out.glob("*.stats.json"))
    report = merge([json.loads(path.read_text()) for path in sidecars])
    report["shards"] = len(sidecars)
    atomic_write(out / name, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return report


def add_members(url: str, out: Path, overwrite: bool, members_of: Callable[[dict], dict[str, bytes]]) -> dict | None:
    """Copy every sample of shard ``url`` byte for byte to ``out`` with the members ``members_of(sample)`` adds
    (or replaces); the shared body of the tools that annotate shards (``data_pipelines/conditions.py``, ``cues.py``).

    A sample with an unsafe member (pickle-like extensions) is dropped, one whose ``members_of`` raises
    :class:`~vgen.data.errors.SampleError` is dropped under its reason. Returns None when ``out`` exists (complete,
    and not ``overwrite``), ``{"input", "failed"}`` when the shard could not be read whole (nothing written: a rerun
    retries it), else the stats also written beside ``out`` (``written``, ``annotated`` -- samples that got
    members --, ``dropped``, ``read_errors``).
    """
    from collections import Counter

    from vgen.data.errors import SampleError
    from vgen.data.stream import UNSAFE_EXTENSIONS

    if out.exists() and not overwrite:
        return None
    samples, errors = shard_samples(url)
    written, dropped, annotated = [], Counter(), 0
    for sample in samples:
        if any(k.rsplit(".", 1)[-1] in UNSAFE_EXTENSIONS for k in sample):
            dropped["unsafe_member"] += 1
            continue
        try:
            members = members_of(sample)
        except SampleError as error:
            dropped[error.reason] += 1
            continue
        kept = {k: v for k, v in sample.items() if (k == "__key__" or not k.startswith("__")) and k not in members}
        written.append({**kept, **members})
        annotated += bool(members)
    if errors:
        return {"input": url, "failed": errors}
    atomic_write(out, tar_bytes(written))
    stats = {"input": url, "written": len(written), "annotated": annotated, "dropped": dict(dropped),
             "read_errors": errors}
    atomic_write(out.with_name(out.name + ".stats.json"), json.dumps(stats, sort_keys=True).encode())
    return stats


def merge_added(sidecars: list[dict]) -> dict:
    """The report of :func:`add_members` sidecars: totals, drop reasons, and the shards with read errors."""
    from collections import Counter

    dropped = sum((Counter(s["dropped"]) for s in sidecars), Counter())
    return {"written": sum(s["written"] for s in sidecars), "annotated": sum(s.get("annotated", 0) for s in sidecars),
            "dropped": dict(dropped), "read_errors": {s["input"]: s["read_errors"] for s in sidecars if s["read_errors"]}}


def run_annotation(prog: str, parser: argparse.ArgumentParser, args, shard: Callable[..., dict | None],
                   report_name: str, merge: Callable[[list[dict]], dict] | None = None,
                   ) -> tuple[list[dict], range, dict, list[dict]]:
    """The shared main of the annotating tools: expand ``args.input`` (distinct names: each gives the output shard
    of that name), run ``shard(index, urls=..., args=...)`` over this task's shards with ``args.workers``, merge
    the sidecars into ``args.out/report_name`` (with ``merge``, default :func:`merge_added`). Returns ``(written, shards, report, failed)``; call
    :func:`report_failed` after printing."""
    import functools

    try:
        urls = expand_inputs(args.input)
    except FileNotFoundError as error:
        fail(prog, str(error))
    names = [Path(url).name for url in urls]
    if len(set(names)) != len(names):
        parser.error("input shards must have distinct file names (each gives the output shard of that name)")
    args.out.mkdir(parents=True, exist_ok=True)
    shards = task_shards(len(urls), args.shard_range)
    results = run_shards(functools.partial(shard, urls=urls, args=args), shards, args.workers)
    written, failed = split_failed(results)
    return written, shards, write_report(args.out, report_name, merge or merge_added), failed


def quantiles(values: list[float]) -> dict:
    """count, mean and the 10/50/90% quantiles of ``values`` (nearest rank)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"count": len(values), "mean": round(sum(values) / len(values), 4), "p10": at(0.1), "p50": at(0.5),
            "p90": at(0.9)}
