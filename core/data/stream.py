"""Training batches streamed from a Lance table, one bounded buffer at a time (``data.stream``).

The in-memory :class:`~rex.data.loader.BatchLoader` holds a split's whole columns; this loader
holds two buffers of at most ``buffer_rows`` rows, whatever the table's size: one served while
the next is read. Each epoch the table's fragments, cut into pieces of ``buffer_rows / 4`` rows
(so that a table of one big fragment is still read in a shuffled order), are read in a seeded
random order, a buffer at a time; each buffer is shuffled and served as batches, and the rows too
few for a whole batch are shuffled again with the next buffer's. Batches are made by the
in-memory loader's own code (same columns, dtypes, padding), and the order depends on
(seed, epoch) alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import torch
from torch import Tensor

from rex.config.errors import DataError
from rex.data.datamodule import column
from rex.data.lance_io import lance_failures, numpy_column, open_table
from rex.data.loader import Column, EpochShuffle, select_rows, shard_count

# Pieces a buffer holds: a buffer mixes rows from this many places of the table, and reads stay
# large (a Lance read costs about 1.5 ms besides its rows: 8 pieces of 8,192 rows read taobao_mb's
# ctr table at half the speed of 4 of 16,384).
PIECES_PER_BUFFER = 4

# Lance caches what it learns of the data files it reads, 30 MB over an epoch of 10 M taobao_mb
# ctr rows by default: capped, so that the loader's memory does not grow with the table (4 MB
# read at the same speed on local files).
METADATA_CACHE_BYTES = 4 * 2**20

Range = tuple[int, int, int]
"""Rows ``start .. stop - 1`` of fragment ``index``: (index, start, stop)."""


class StreamLoader:
    """Iterable of dict batches read from the Lance table at ``uri``: a local path, or any URI
    Lance reads (``s3://bucket/table.lance``...), passed to Lance unchanged with ``storage_options``.

    A batch holds the table's ``columns`` as :class:`BatchLoader` serves them: ids (B,) int64,
    floats (B,) float32, lists (B, W) int64 holding each row's last ``max_len`` ids left-padded
    with 0 to the batch's longest, W <= ``max_len``; then ``transform`` is applied. Batches have
    ``batch_size`` rows but the last of an epoch, which holds the rest (as in BatchLoader, with
    :func:`~rex.data.loader.shard_batches`' rule over processes). The interface is what training
    uses of BatchLoader: ``sampler.set_epoch``, ``len`` (batches per epoch for this process),
    ``shard(rank, world_size)`` and ``skip_batches(epoch, n)``.
    """

    def __init__(
        self,
        uri: str | Path,
        columns: list[str],
        batch_size: int,
        *,
        buffer_rows: int,
        max_len: int,
        seed: int = 0,
        transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        self.uri = str(uri)
        self.names = list(columns)
        self.batch_size = batch_size
        self.buffer_rows = buffer_rows
        self.max_len = max_len
        self.transform = transform
        dataset = open_table(self.uri, self.names, storage_options, METADATA_CACHE_BYTES)
        self._fragments = dataset.get_fragments()
        with lance_failures(self.uri, "cannot read table"):
            sizes = [fragment.count_rows() for fragment in self._fragments]
        piece = max(buffer_rows // PIECES_PER_BUFFER, 1)
        self._pieces: list[Range] = [
            (index, start, min(start + piece, size))
            for index, size in enumerate(sizes)
            for start in range(0, size, piece)
        ]
        self.num_rows = sum(sizes)
        self.sampler = EpochShuffle(self.num_rows, seed, shuffle=True)
        self.batch_sampler = None  # Lightning inspects loaders as it would a torch DataLoader
        self.rank, self.world_size = 0, 1
        self._check_buffer()

    def shard(self, rank: int, world_size: int) -> None:
        """Serve only process ``rank``'s share of each epoch: every process the same number of
        batches, and the union over processes each row exactly once."""
        if world_size > 1 and self.num_rows < world_size:
            raise ValueError(f"{self.num_rows} rows cannot be shared by {world_size} processes")
        self.rank, self.world_size = rank, world_size
        self._check_buffer()

    def __len__(self) -> int:
        return shard_count(-(-self.num_rows // self.batch_size), self.world_size)

    def skip_batches(self, epoch: int, batches: int) -> None:
        """Make the next pass over ``epoch`` start at batch ``batches`` (mid-epoch resume). The
        skipped batches' rows are still read, since the buffers they share decide what follows,
        but are not made into batches."""
        self.sampler.resume_at(epoch, batches)

    def _bound(self, rank: int) -> int:
        """Where process ``rank``'s share of an epoch's rows starts (shares differ by 1 at most)."""
        share, extra = divmod(self.num_rows, self.world_size)
        return rank * share + min(rank, extra)

    def _check_buffer(self) -> None:
        # The epoch's last batch holds what is left over (more than batch_size rows over several
        # processes), and a batch is made from one buffer.
        count = len(self)
        largest = max(self.batch_size, self._bound(1) - (count - 1) * self.batch_size) if count else 0
        if largest > self.buffer_rows:
            raise DataError(
                f"a buffer of {self.buffer_rows} rows cannot hold a batch of {largest} rows: raise "
                "data.stream_buffer_rows or lower train.batch_size",
                key="data.stream_buffer_rows",
            )

    def _share(self) -> deque[Range]:
        """This process's row ranges this epoch, in reading order: its run of the epoch's
        shuffled pieces, cut where the processes' shares meet."""
        first, end = self._bound(self.rank), self._bound(self.rank + 1)
        order = torch.randperm(len(self._pieces), generator=self.sampler.generator()).tolist()
        mine: deque[Range] = deque()
        at = 0  # rows of the epoch's stream before this piece
        for index in order:
            fragment, start, stop = self._pieces[index]
            low, high = max(first - at, 0), min(end - at, stop - start)
            if low < high:
                mine.append((fragment, start + low, start + high))
            at += stop - start
            if at >= end:
                break
        return mine

    def _read(self, fragment: int, start: int, rows: int) -> pa.Table:
        """Rows ``start .. start + rows - 1`` of a fragment, the served columns only."""
        with lance_failures(self.uri, "cannot read table"):
            return self._fragments[fragment].to_table(columns=self.names, offset=start, limit=rows)

    def _load(self, held: pa.Table | None, ranges: deque[Range]) -> tuple[pa.Table, dict[str, Column]]:
        """``held`` topped up to ``buffer_rows`` rows from the front of ``ranges`` (consumed), as
        read and as the in-memory loader holds columns."""
        parts = [] if held is None else [held]
        room = self.buffer_rows - sum(part.num_rows for part in parts)
        while room > 0 and ranges:
            fragment, start, stop = ranges.popleft()
            rows = min(room, stop - start)
            if rows < stop - start:
                ranges.appendleft((fragment, start + rows, stop))
            parts.append(self._read(fragment, start, rows))
            room -= rows
        table = pa.concat_tables(parts)
        return table, {name: column(numpy_column(table.column(name)), self.max_len) for name in self.names}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        # A generator: the order is drawn at the first next(), after Lightning's set_epoch.
        skip = self.sampler.batches_to_skip()
        count, served = len(self), 0
        if count == 0:
            return
        shuffle = self.sampler.generator(salt=1 + self.rank)
        ranges = self._share()
        # The next buffer is read (Lance decodes without the GIL) while this one is served.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rex-stream") as reader:
            loading = reader.submit(self._load, None, ranges)
            while served < count:
                table, columns = loading.result()  # ``ranges`` is this thread's again
                order = torch.randperm(table.num_rows, generator=shuffle)
                sizes = [self.batch_size] * min(table.num_rows // self.batch_size, count - 1 - served)
                if not ranges:  # the share is all read: the last batch takes every row left
                    sizes.append(table.num_rows - sum(sizes))
                used = sum(sizes)
                if served + len(sizes) < count:  # the rows left over join the next buffer
                    rest = table.take(order[used:].numpy()) if used < table.num_rows else None
                    loading = reader.submit(self._load, rest, ranges)
                del table
                for index in order[:used].split(sizes)[max(skip - served, 0) :]:
                    batch = {name: select_rows(values, index) for name, values in columns.items()}
                    yield self.transform(batch) if self.transform is not None else batch
                served += len(sizes)
                del columns  # before the next buffer is taken: two are held at most
