"""Lance tables in, numpy columns out.

Tables are written atomically (a killed write never leaves a half table in place) and read
column-wise into numpy: scalar columns as 1-D arrays, list columns as a :class:`RaggedColumn`
(flat values plus offsets), which pads a batch with index arithmetic instead of a Python loop,
and fixed-size list columns (vectors) as ``rows x dim`` arrays.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rex.config.errors import DataError


@dataclass(frozen=True)
class RaggedColumn:
    """A list column: row ``r`` is ``values[offsets[r]:offsets[r + 1]]``.

    ``values`` is a flat int64 array and ``offsets`` an int64 array of ``rows + 1`` entries
    starting at 0.
    """

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """Number of elements in each row (int64, one per row)."""
        return np.diff(self.offsets)

    def row(self, index: int) -> np.ndarray:
        """The elements of one row (a view into ``values``)."""
        return self.values[self.offsets[index] : self.offsets[index + 1]]

    def take(self, indices: np.ndarray) -> RaggedColumn:
        """The rows at ``indices``, in that order, as a new compact column."""
        indices = np.asarray(indices, dtype=np.int64)
        return RaggedColumn.from_slices(self.values, self.offsets[:-1][indices], self.lengths()[indices])

    @classmethod
    def from_slices(cls, values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> RaggedColumn:
        """A column whose row ``r`` is ``values[starts[r]:starts[r] + lengths[r]]`` (copied)."""
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Output element k of row r is values[starts[r] + (k - offsets[r])].
        source = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return cls(np.asarray(values, dtype=np.int64)[source], offsets)

    def padded(self, max_len: int) -> np.ndarray:
        """A ``rows x max_len`` int64 matrix of each row's last ``max_len`` elements.

        Rows are right-aligned: the most recent element sits in the last column and shorter rows
        are zero-padded on the left (0 is the padding id).
        """
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        rows = len(self)
        out = np.zeros((rows, max_len), dtype=np.int64)
        kept = np.minimum(self.lengths(), max_len)
        total = int(kept.sum())
        if total == 0:
            return out
        row_of = np.repeat(np.arange(rows, dtype=np.int64), kept)
        kept_start = np.cumsum(kept) - kept
        within = np.arange(total, dtype=np.int64) - np.repeat(kept_start, kept)
        source = np.repeat(self.offsets[1:] - kept, kept) + within
        column = np.repeat(max_len - kept, kept) + within
        out[row_of, column] = self.values[source]
        return out

    @classmethod
    def concat(cls, columns: list[RaggedColumn]) -> RaggedColumn:
        """The rows of every column, in order, as one column."""
        lengths = np.concatenate([column.lengths() for column in columns])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate([column.values[: column.offsets[-1]] for column in columns])
        return cls(values.astype(np.int64, copy=False), offsets)

    @classmethod
    def from_lists(cls, lists: list[list[int]]) -> RaggedColumn:
        """Build from Python lists (for tests and small hand-made inputs)."""
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((v for x in lists for v in x), dtype=np.int64, count=int(offsets[-1]))
        return cls(values, offsets)

    def to_arrow(self) -> pa.Array:
        """The column as an arrow ``list<int64>`` array (for writing tables)."""
        values = pa.array(self.values, pa.int64())
        if self.offsets[-1] > np.iinfo(np.int32).max:
            return pa.LargeListArray.from_arrays(pa.array(self.offsets, pa.int64()), values)
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), values)


Column = np.ndarray | RaggedColumn


def write_table(path: Path, table: pa.Table) -> None:
    """Write ``table`` as a Lance dataset at ``path``, replacing any table already there.

    The dataset is written to ``<path>.tmp-<pid>`` first and swapped in with renames, so ``path``
    holds either the old complete table or the new one (or, for an instant during the swap,
    nothing), never a half-written one.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        lance.write_dataset(table, str(tmp), mode="create")
        swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(new: Path, path: Path) -> None:
    """Replace the directory ``path`` with the complete directory ``new`` by renames.

    The old directory is renamed away, the new one renamed in, then the old one deleted, so a
    reader never sees a mix of the two.
    """
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _rebuild_hint(location: str | Path) -> str:
    """How to rebuild the dataset that holds the table at ``location``: re-import an imported one
    (its schema.json records the mapping), prepare a built-in one."""
    from rex.data.schema import SCHEMA_FILE, load_schema, rebuild_hint

    path = Path(location)
    if (path.parent / SCHEMA_FILE).is_file():
        with contextlib.suppress(DataError):  # an unreadable schema.json: rebuild by name
            return rebuild_hint(load_schema(path.parent))
    return f"rebuild it with `rex data prepare {path.parent.name} --force`"


@contextlib.contextmanager
def lance_failures(location: str | Path, what: str) -> Iterator[None]:
    """Turn any failure of the Lance calls inside into a DataError: ``<location>: <what> (why); fix``."""
    try:
        with _without_panic_reports():
            yield
    except BaseException as exc:
        _reraise_interrupts(exc)
        raise DataError(f"{location}: {what} ({_first_line(exc)}); {_rebuild_hint(location)}") from exc


def open_table(
    location: str | Path,
    columns: list[str] | None = None,
    storage_options: dict[str, str] | None = None,
    metadata_cache_bytes: int | None = None,
) -> lance.LanceDataset:
    """The Lance table at ``location``: a local path, or any URI Lance reads (``s3://...``), which
    is passed to Lance unchanged with ``storage_options``. A :class:`DataError` when it is missing,
    cannot be opened or lacks one of ``columns``. ``metadata_cache_bytes`` caps what Lance keeps
    of the data files' metadata it has read (Lance's default: unbounded for our sizes)."""
    uri = str(location)
    if "://" not in uri and not Path(uri).exists():
        raise DataError(f"{uri}: table missing; run `rex data prepare {Path(uri).parent.name}`")
    with lance_failures(uri, "cannot open table"):
        dataset = lance.dataset(
            uri, storage_options=storage_options, metadata_cache_size_bytes=metadata_cache_bytes
        )
    names = dataset.schema.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise DataError(
            f"{uri}: no column {', '.join(missing)} (columns: {', '.join(names)}); {_rebuild_hint(uri)}"
        )
    return dataset


def read_metadata(path: Path) -> dict[bytes, bytes]:
    """The table's schema metadata (empty when it has none)."""
    return dict(open_table(path).schema.metadata or {})


def read_columns(path: Path, columns: list[str]) -> dict[str, Column]:
    """Read ``columns`` of the Lance table at ``path`` into numpy.

    Scalar columns become 1-D arrays; list columns become :class:`RaggedColumn`; fixed-size list
    columns become ``rows x dim`` arrays of their value type. Every failure
    (missing table, missing column, unreadable files) is a :class:`DataError` naming the path.
    """
    path = Path(path)
    dataset = open_table(path, columns)
    with lance_failures(path, "cannot read table"):
        # One column at a time: the Arrow copy of a column is freed once it is numpy, so reading
        # holds the data plus one column, not the data twice.
        return {name: numpy_column(dataset.to_table(columns=[name]).column(name)) for name in columns}


def column_maxima(path: Path, columns: list[str]) -> tuple[int, dict[str, Any]]:
    """The row count of the Lance table at ``path`` and the largest value of each of ``columns``
    that it has (of the elements, for a list column; None where there are none).

    Failures are :class:`DataError` s as in :func:`read_columns`.
    """
    path = Path(path)
    dataset = open_table(path)
    maxima: dict[str, Any] = {}
    with lance_failures(path, "cannot read table"):
        for name in (c for c in columns if c in dataset.schema.names):
            values = dataset.to_table(columns=[name]).column(name)
            if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
                values = pc.list_flatten(values)
            maxima[name] = pc.max(values).as_py()
        return dataset.count_rows(), maxima


def numpy_column(column: pa.ChunkedArray) -> Column:
    """An Arrow column as :func:`read_columns` returns it (1-D array, :class:`RaggedColumn` or
    ``rows x dim`` array)."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        offsets = np.asarray(array.offsets, dtype=np.int64)
        values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return RaggedColumn(values, offsets - offsets[0])
    if pa.types.is_fixed_size_list(array.type):
        flat = array.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(array), array.type.list_size)
    return array.to_numpy(zero_copy_only=False)


def vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """A ``rows x dim`` float array as an arrow ``fixed_size_list<float32>[dim]`` column."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"expected a rows x dim array, got shape {matrix.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])


# One thread at a time redirects stderr, so each restores the descriptor it found.
_STDERR_LOCK = threading.RLock()


@contextlib.contextmanager
def _without_panic_reports() -> Iterator[None]:
    """Keep the report of a Rust panic in the calls inside off stderr; anything else is let through.

    A damaged file can make a Lance thread panic. Rust's panic hook writes a multi-line report
    (``thread '...' panicked at ...``, a backtrace with RUST_BACKTRACE=1) straight to file
    descriptor 2, before the panic becomes the Python exception whose message our DataError
    carries. So stderr is captured for the call and dropped if it holds a panic report; with
    ``REX_DEBUG=1``, which asks for tracebacks, it is left alone.
    """
    if os.environ.get("REX_DEBUG") == "1":
        yield
        return
    with _STDERR_LOCK, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read()
            if text and b"panicked at" not in text:
                os.write(2, text)


def _reraise_interrupts(exc: BaseException) -> None:
    # Lance is Rust: a corrupt file can surface as a pyo3 PanicException, which derives from
    # BaseException. Everything but a real interrupt counts as a read failure.
    if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
        raise exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."
