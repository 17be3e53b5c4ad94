"""Batches from columns already in memory, by index arithmetic.

A split's columns are read from Lance once and held as contiguous tensors (ids compactly as
int32 where they fit, sequences as flat values plus offsets). A batch is then an
``index_select`` per column, or a gather for sequences: no Python work per row, no per-epoch
reread, and memory that does not grow with epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor


class EpochShuffle:
    """The epoch-seeded permutation of one loader.

    Lightning calls ``set_epoch`` before each epoch (as it does for a DistributedSampler),
    so the order depends on (seed, epoch) alone and a resumed run sees the same batches.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool, fixed: Tensor | None = None) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._order: Tensor | None = None if shuffle else fixed
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next pass over ``epoch`` starts at batch ``batches`` (resuming mid-epoch)."""
        self._resume = (epoch, batches)

    def batches_to_skip(self) -> int:
        """Batches the pass now starting skips: a pending resume's, if it is for this epoch."""
        resume, self._resume = self._resume, None
        return resume[1] if resume is not None and resume[0] == self.epoch else 0

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + salt * 7_919)

    def order(self) -> Tensor:
        if not self.shuffle:
            return self._order if self._order is not None else torch.arange(self.num_rows)
        generator = self.generator()
        # Drawn into one buffer kept across epochs: a fresh (rows,) permutation each epoch is a
        # large allocation that the heap may not hand back, and RSS would creep per epoch.
        if self._order is None:
            self._order = torch.empty(self.num_rows, dtype=torch.int64)
        return torch.randperm(self.num_rows, generator=generator, out=self._order)


class Ragged:
    """Variable-length id lists as flat ``values`` and row ``offsets`` (rows + 1), kept unpadded.

    ``gather(index)`` returns the rows' last ``max_len`` ids as a (B, W) int64 matrix left-padded
    with 0, where W is the longest of those rows: padding costs memory per batch, not per dataset.
    """

    def __init__(self, values: Tensor, offsets: Tensor, max_len: int, prefixed: bool = False) -> None:
        # ``max_len`` zeros in front, so that the W ids ending at any row's end always exist and
        # a batch is one index_select of overlapping windows (a strided view, never copied).
        # ``prefixed``: ``values`` already starts with them (built that way to save a copy).
        self.values = values if prefixed else torch.cat([values.new_zeros(max_len), values])
        self.offsets = offsets
        self.max_len = max_len

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes

    def lengths(self) -> Tensor:
        """(rows,) each row's length as served: at most ``max_len``."""
        return (self.offsets[1:] - self.offsets[:-1]).clamp(max=self.max_len)

    def gather(self, index: Tensor) -> Tensor:
        starts = self.offsets[index]
        ends = self.offsets[index + 1]
        lengths = (ends - starts).clamp(max=self.max_len)
        width = max(int(lengths.max()) if index.numel() else 0, 1)
        windows = self.values.unfold(0, width, 1).index_select(0, ends + (self.max_len - width))
        batch = windows.long() if windows.dtype != torch.int64 else windows
        # Columns before a row's first id hold the previous row's ids: blank them.
        return batch.masked_fill_(torch.arange(width) < (width - lengths)[:, None], 0)


Column = Tensor | Ragged


def shard_batches(batches: list[Tensor], rank: int, world_size: int) -> list[Tensor]:
    """Process ``rank``'s share of one epoch's ``batches`` (row indices, the same on every rank).

    Rank r takes batches r, r + world_size, ... . When the count does not divide, the last whole
    round and the rest are pooled and split evenly, so every rank runs the same number of steps
    (data-parallel ranks step together) and the union over ranks is each row exactly once.
    """
    if world_size == 1:
        return batches
    rounds = len(batches) // world_size
    whole = rounds if len(batches) % world_size == 0 else rounds - 1
    mine = batches[rank : max(whole, 0) * world_size : world_size]
    pooled = batches[max(whole, 0) * world_size :]
    if pooled:
        rows = torch.cat(pooled)
        if len(rows) < world_size:
            raise ValueError(f"{len(rows)} rows cannot be shared by {world_size} processes")
        mine.append(torch.tensor_split(rows, world_size)[rank])
    return mine


def shard_count(batches: int, world_size: int) -> int:
    """How many of ``batches`` each rank runs under :func:`shard_batches`."""
    return batches if world_size == 1 else max(batches // world_size, 1)


class BatchLoader:
    """Iterable of dict batches over equal-length column tensors.

    Sequence columns are either :class:`Ragged` or left-padded 2-D tensors; either way a batch
    holds them padded only to the longest sequence in the batch. ``by_length`` (unshuffled
    loaders only) serves rows in order of their longest :class:`Ragged` list, so rows of similar
    length share a batch and little of it is padding: evaluation, whose metrics do not depend on
    row order, then encodes a few times fewer positions. ``budget=(weights, samples)`` replaces
    ``batch_size``: each epoch's shuffled rows are grouped by weight (a row's training samples)
    into ``ceil(sum / samples)`` batches of about ``samples`` each, served in a shuffled order,
    so a batch of long sequences holds fewer of them and padding stays small.
    ``skip_batches(epoch, n)`` makes the next pass over ``epoch`` start at batch ``n`` (used when
    resuming mid-epoch).
    """

    def __init__(
        self,
        columns: Mapping[str, Column],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        by_length: bool = False,
        budget: tuple[Tensor, int] | None = None,
    ) -> None:
        sizes = {name: len(column) for name, column in columns.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"columns differ in length: {sizes}")
        self.columns = dict(columns)
        self.batch_size = batch_size
        self.num_rows = next(iter(sizes.values()))
        lists = [column.lengths() for column in self.columns.values() if isinstance(column, Ragged)]
        fixed = None
        if by_length and lists:
            fixed = torch.argsort(torch.stack(lists).amax(dim=0), stable=True)
        self.sampler = EpochShuffle(self.num_rows, seed, shuffle, fixed)
        self.budget = budget
        self.transform = transform
        self.batch_sampler = None  # Lightning inspects loaders as it would a torch DataLoader
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Serve only process ``rank``'s share of each epoch (see :func:`shard_batches`)."""
        if world_size > 1 and self.num_rows < world_size:
            raise ValueError(f"{self.num_rows} rows cannot be shared by {world_size} processes")
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return shard_count(self._global_count(), self.world_size)

    def _global_count(self) -> int:
        """Batches per epoch over all ranks."""
        if self.budget is not None:
            weights, samples = self.budget
            return max(-(-int(weights.sum()) // samples), 1)
        return -(-self.num_rows // self.batch_size)

    def _batches(self, order: Tensor) -> list[Tensor]:
        if self.budget is None:
            return list(order.split(self.batch_size))
        weights, _ = self.budget
        count = self._global_count()
        # A stable sort of the shuffled rows: equal weights stay in random order.
        rows = order[torch.argsort(weights[order], stable=True)]
        sorted_weights = weights[rows]
        before = torch.cumsum(sorted_weights, 0) - sorted_weights
        total = max(int(sorted_weights.sum()), 1)
        batch_of = before * count // total
        pieces = rows.split(torch.bincount(batch_of, minlength=count).tolist())
        shuffled = torch.randperm(count, generator=self.sampler.generator(salt=1)).tolist()
        return [pieces[i] for i in shuffled if len(pieces[i])]

    def skip_batches(self, epoch: int, batches: int) -> None:
        self.sampler.resume_at(epoch, batches)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        # A generator: the order is drawn at the first next(), after Lightning's set_epoch.
        order = self.sampler.order()
        start = self.sampler.batches_to_skip()
        for index in shard_batches(self._batches(order), self.rank, self.world_size)[start:]:
            batch = {name: select_rows(column, index) for name, column in self.columns.items()}
            yield self.transform(batch) if self.transform is not None else batch


def select_rows(column: Column, index: Tensor) -> Tensor:
    """The batch of ``column``'s rows at ``index`` (B,): (B,) or (B, W), W the batch's longest list."""
    if isinstance(column, Ragged):
        return column.gather(index)
    rows = column.index_select(0, index)
    # Compactly stored (int32) ids become the int64 that embeddings and losses index with.
    return _trim(rows.long() if rows.dtype == torch.int32 else rows)


def _trim(column: Tensor) -> Tensor:
    if column.dim() != 2 or column.shape[1] == 0:
        return column
    used = (column != 0).any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else column.shape[1] - 1
    return column[:, first:]
