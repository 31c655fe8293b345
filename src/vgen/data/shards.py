"""Raw WebDataset samples with a resumable position: which shard each reader reads, and where in it it is.

A *reader* is one (rank, DataLoader worker) pair; there are ``R = world_size x workers`` of them. For every
source, the shards form an endless sequence ``S = P_0 + P_1 + ...`` where ``P_p`` is a seeded permutation of
all shards (pass ``p``). Reader ``k`` reads ``S[k], S[k + R], S[k + 2R], ...``: every reader always has a
next shard, even with fewer shards than readers or shards of very different sizes, so no rank runs dry.

Inside a shard, samples are shuffled in blocks of ``shuffle_block`` consecutive samples (seeded per shard and
block). A reader's position is ``(shard ordinal, samples already taken from that shard)``; restoring it
re-reads at most one shard's raw bytes (no decoding) and never depends on a shuffle buffer's history.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vgen.data.errors import DataError

log = logging.getLogger(__name__)


def seeded(*parts) -> random.Random:
    """A ``random.Random`` seeded from ``parts`` (strings/ints), stable across processes and runs."""
    return random.Random("/".join(str(part) for part in parts))


class ShardSchedule:
    """The endless, seeded shard sequence of one source (see the module docstring)."""

    def __init__(self, urls: list[str], seed: int | str, name: str):
        if not urls:
            raise ValueError(f"{name}: no shards")
        self.urls, self.seed, self.name = list(urls), seed, name
        self._pass, self._order = -1, []

    def __len__(self) -> int:
        return len(self.urls)

    def url(self, position: int) -> str:
        """The shard at ``position`` of the endless sequence."""
        pass_index, index = divmod(position, len(self.urls))
        if pass_index != self._pass:
            self._order = list(range(len(self.urls)))
            seeded(self.seed, self.name, "pass", pass_index).shuffle(self._order)
            self._pass = pass_index
        return self.urls[self._order[index]]


def read_shard(url: str, on_error: Callable[[str, Exception], None]) -> Iterator[dict]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``) of one tar shard: a path or any ``gopen`` URL.

    A shard that cannot be opened or ends mid-member calls ``on_error(url, error)`` once and ends (the samples
    read before the error were already yielded). The stream (and a ``pipe:`` process) is closed when the
    generator ends or is dropped.
    """
    try:
        stream = gopen(url)
    except Exception as error:  # noqa: BLE001 (any opener failure means: skip the shard)
        on_error(url, error)
        return
    completed = False
    try:
        files = ({**member, "__url__": url} for member in tar_file_iterator(stream, handler=_reraise))
        yield from group_by_keys(files, handler=_reraise)
        completed = True
    except Exception as error:  # noqa: BLE001 (tarfile, IO and pipe-status errors all mean a bad shard)
        on_error(url, error)
    finally:
        try:
            stream.close()
        except Exception as error:  # noqa: BLE001
            if completed:  # a pipe command that failed after writing its output
                on_error(url, error)


def _reraise(error: Exception) -> bool:
    raise error


@dataclass
class Position:
    """Where a reader is in one source: its ``ordinal``-th shard, ``offset`` samples already taken from it."""

    ordinal: int = 0
    offset: int = 0


class RawSamples:
    """The endless raw-sample stream of one source for one reader, resumable from a :class:`Position`.

    Yields ``(sample, (shard_position, offset))``: the pair identifies the sample, so anything random about it
    (e.g. the clip window) can be seeded from it. ``position`` is updated before each sample is yielded.
    """

    def __init__(
        self,
        schedule: ShardSchedule,
        reader: int,
        num_readers: int,
        shuffle_block: int,
        position: Position,
        on_shard_error: Callable[[str, Exception], None],
    ):
        self.schedule, self.reader, self.num_readers = schedule, reader, num_readers
        self.shuffle_block = max(1, shuffle_block)
        self.position = position
        self.on_shard_error = on_shard_error

    def __iter__(self) -> Iterator[tuple[dict, tuple[int, int]]]:
        failed_in_a_row: set[str] = set()  # distinct shards that gave nothing since the last sample
        while True:
            shard_position = self.reader + self.position.ordinal * self.num_readers
            url = self.schedule.url(shard_position)
            yielded = False
            for sample in self._shuffled(url, shard_position, skip=self.position.offset):
                self.position.offset += 1
                yielded = True
                yield sample, (shard_position, self.position.offset - 1)
            self.position.ordinal += 1
            self.position.offset = 0
            failed_in_a_row = set() if yielded else failed_in_a_row | {url}
            if len(failed_in_a_row) == len(self.schedule):
                raise DataError(
                    f"{self.schedule.name}: none of its {len(self.schedule)} shards gave a sample (last: {url}); "
                    "check the urls and that the shards are readable tar files"
                )

    def _shuffled(self, url: str, shard_position: int, skip: int) -> Iterator[dict]:
        """The shard's samples in block-shuffled order, the first ``skip`` of them left out."""
        size, block, block_start = self.shuffle_block, [], 0
        for index, sample in enumerate(read_shard(url, self.on_shard_error)):
            if (index // size + 1) * size <= skip:  # in a block that was taken whole before
                continue
            if not block:
                block_start = index
            block.append(sample)
            if len(block) == size:
                yield from self._emit(block, shard_position, block_start, skip)
                block = []
        if block:
            yield from self._emit(block, shard_position, block_start, skip)

    def _emit(self, block: list[dict], shard_position: int, block_start: int, skip: int) -> Iterator[dict]:
        order = list(range(len(block)))
        if len(block) > 1:
            seeded(self.schedule.seed, self.schedule.name, "block", shard_position, block_start).shuffle(order)
        for taken, index in enumerate(order):
            if block_start + taken >= skip:
                yield block[index]
