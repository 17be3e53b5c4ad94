"""Shared pieces of dataset builders: params, the builder registry, vectorised table blocks,
negative sampling and the ctr splits (DIN-style per sequence, or seeded random row fractions).

Conventions the training code relies on:

* ids: items and users are ``1..N`` with 0 reserved for padding/unknown; ``num_items`` and
  ``num_users`` are ``N + 1`` (embedding table sizes). Categorical features use 0 = unknown.
* view ``sequence`` (leave-one-out): ``seq_train`` (``user``, ``items`` = sequence minus its
  last 2), ``seq_valid`` (``user``, ``history`` = seq[:-2], ``target`` = seq[-2]), ``seq_test``
  (``user``, ``history`` = seq[:-1], ``target`` = seq[-1]). Users with < 3 interactions are
  dropped.
* view ``ctr``: ``user``, ``item``, ``label`` (float32 0/1), categorical feature columns and
  ``history`` (the user's previous items, oldest first, the last ``ctr_max_history`` kept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import AfterValidator, Field

from rex.config.base import Strict
from rex.config.errors import DataError
from rex.data.lance_io import RaggedColumn
from rex.data.mirror import RawSource
from rex.data.schema import FieldSpec, ViewSpec

MIN_SEQUENCE = 3  # leave-one-out needs a train item, a valid target and a test target
CTR_TABLES = ("ctr_train", "ctr_valid", "ctr_test")  # the ctr view's tables, by split code 0, 1, 2


class Params(Strict):
    """A dataset's section of params.yaml."""


class SequenceCtrParams(Params):
    """Params of a DIN-style ctr view cut from chronological sequences."""

    ctr_max_history: int = Field(50, ge=1)
    neg_ratio: int = Field(1, ge=1)
    neg_seed: int = 2024


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Built:
    """What a dataset builder returns: the tables and the schema fields it alone knows."""

    tables: dict[str, pa.Table]
    protocol: str
    num_users: int
    num_items: int
    views: dict[str, ViewSpec]
    counts: dict[str, int]


@dataclass(frozen=True)
class DatasetDef:
    """A preparable dataset: its raw source, its params model and its builder."""

    source: RawSource
    params: type[Params]
    build: Callable[[Path, Any], Built]


DATASETS: dict[str, DatasetDef] = {}


def register_dataset(
    name: str, source: RawSource, params: type[Params]
) -> Callable[[Callable[..., Built]], Callable[..., Built]]:
    """Decorator for a builder ``(raw_dir, params) -> Built``: makes ``name`` preparable."""

    def decorate(build: Callable[..., Built]) -> Callable[..., Built]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = DatasetDef(source, params, build)
        return build

    return decorate


# --------------------------------------------------------------------------------------------
# shared building blocks


def remap(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map raw id tokens to contiguous ids 1..N; returns (ids, sorted raw keys: id i has key i - 1).

    All-numeric tokens are keyed (and ordered) as integers, so ids already 1..N stay the same.
    """
    tokens = np.asarray(tokens).astype(str)
    numeric = len(tokens) > 0 and bool(np.char.isdigit(tokens).all())
    keys, inverse = np.unique(tokens.astype(np.int64) if numeric else tokens, return_inverse=True)
    return inverse.astype(np.int64) + 1, keys


def encode(tokens: np.ndarray, unknown: frozenset[str] = frozenset()) -> tuple[np.ndarray, int]:
    """Encode string tokens as 1..K (sorted), with ``unknown`` tokens and '' as 0; returns (codes, K + 1)."""
    tokens = np.asarray(tokens).astype(str)
    known = ~np.isin(tokens, [*unknown, ""])
    uniques, inverse = np.unique(tokens[known], return_inverse=True)
    codes = np.zeros(len(tokens), dtype=np.int64)
    codes[known] = inverse + 1
    return codes, len(uniques) + 1


def per_id(meta_ids: np.ndarray, codes: np.ndarray, id_keys: np.ndarray, path: Path) -> np.ndarray:
    """Scatter metadata codes (one per metadata row, keyed by raw id) onto remapped ids 1..N.

    ``id_keys`` are the sorted raw keys from :func:`remap`. Ids without a metadata row get 0
    (unknown); metadata rows for ids that never occur in the interactions are ignored.
    """
    meta = np.asarray(meta_ids).astype(str)
    if np.issubdtype(id_keys.dtype, np.integer):
        if not np.char.isdigit(meta).all():
            raise DataError("non-numeric ids where the interactions have numeric ones", file=str(path))
        meta = meta.astype(np.int64)
    at = np.minimum(np.searchsorted(id_keys, meta), len(id_keys) - 1)
    found = id_keys[at] == meta
    per_id = np.zeros(len(id_keys) + 1, dtype=np.int64)
    per_id[at[found] + 1] = codes[found]
    return per_id


def previous_items(seqs: RaggedColumn, flat: np.ndarray, max_len: int) -> RaggedColumn:
    """For the elements at ``flat`` indices of ``seqs.values``: up to ``max_len`` items before each
    in its own row, oldest first."""
    row = np.searchsorted(seqs.offsets, flat, side="right") - 1
    kept = np.minimum(flat - seqs.offsets[row], max_len)
    return RaggedColumn.from_slices(seqs.values, flat - kept, kept)


def leave_one_out(users: np.ndarray, seqs: RaggedColumn) -> dict[str, pa.Table]:
    """The ``seq_*`` tables from chronological sequences of >= 3 items, one row per user."""
    lengths = seqs.lengths()
    starts, ends = seqs.offsets[:-1], seqs.offsets[1:]
    users_arr = pa.array(users, pa.int64())
    before_valid = RaggedColumn.from_slices(seqs.values, starts, lengths - 2).to_arrow()
    return {
        "seq_train": pa.table({"user": users_arr, "items": before_valid}),
        "seq_valid": pa.table(
            {"user": users_arr, "history": before_valid, "target": pa.array(seqs.values[ends - 2])}
        ),
        "seq_test": pa.table(
            {
                "user": users_arr,
                "history": RaggedColumn.from_slices(seqs.values, starts, lengths - 1).to_arrow(),
                "target": pa.array(seqs.values[ends - 1]),
            }
        ),
    }


def sequence_view(num_users: int, num_items: int) -> ViewSpec:
    item = {"vocab_size": num_items, "vocab_of": "item"}
    return ViewSpec(
        tables={"train": "seq_train", "valid": "seq_valid", "test": "seq_test"},
        protocol="leave_one_out",
        fields={
            "user": FieldSpec(role="user", kind="categorical", vocab_size=num_users),
            "items": FieldSpec(role="sequence", kind="sequence", **item),
            "history": FieldSpec(role="history", kind="sequence", **item),
            "target": FieldSpec(role="target", kind="categorical", **item),
        },
    )


def ctr_view(num_users: int, num_items: int, features: dict[str, int], protocol: str) -> ViewSpec:
    fields = {
        "user": FieldSpec(role="user", kind="categorical", vocab_size=num_users),
        "item": FieldSpec(role="item", kind="categorical", vocab_size=num_items),
        **{
            name: FieldSpec(role=None, kind="categorical", vocab_size=size) for name, size in features.items()
        },
        "history": FieldSpec(role="history", kind="sequence", vocab_size=num_items, vocab_of="item"),
        "label": FieldSpec(role="label", kind="label"),
    }
    return ViewSpec(
        tables={"train": "ctr_train", "valid": "ctr_valid", "test": "ctr_test"},
        protocol=protocol,
        fields=fields,
    )


def ctr_table(columns: dict[str, np.ndarray], history: RaggedColumn, rows: np.ndarray) -> pa.Table:
    data: dict[str, pa.Array] = {name: pa.array(values[rows]) for name, values in columns.items()}
    data["history"] = history.take(rows).to_arrow()
    return pa.table(data)


def read_atomic(path: Path) -> dict[str, np.ndarray]:
    """Read a RecBole atomic file (tab-separated, ``name:type`` header) into numpy columns.

    ``float`` columns become float64; ``token``/``token_seq`` columns stay strings.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            header = handle.readline().rstrip("\n").split("\t")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read: {exc}", file=str(path)) from exc
    names = [h.split(":", 1)[0] for h in header]
    types = {
        n: (pa.float64() if h.endswith(":float") else pa.string()) for n, h in zip(names, header, strict=True)
    }
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=names),
            # Titles hold quotes and commas: fields are split on tabs only.
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot parse as a RecBole atomic file: {exc}", file=str(path)) from exc
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in names}


def read_delimited(path: Path, columns: dict[str, pa.DataType], delimiter: str, what: str) -> pa.Table:
    """Read a headerless file of ``delimiter``-separated ``columns`` (name: type), without quoting.

    A file that does not parse raises a :class:`DataError` saying it expected lines of ``what``.
    """
    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=list(columns)),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=columns),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"expected lines of {what}: {exc}", file=str(path)) from exc


def require_columns(columns: dict[str, np.ndarray], names: list[str], path: Path) -> None:
    missing = [n for n in names if n not in columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; found {', '.join(columns)}", file=str(path))


# --------------------------------------------------------------------------------------------
# ctr rows: negatives, DIN-style sequence ctr, random splits


def sample_negatives(
    seqs: RaggedColumn,
    rows: np.ndarray,
    count: int,
    low: int | np.ndarray,
    high: int | np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """``len(rows) x count`` item ids: for each of ``rows`` (indices into ``seqs``), drawn uniformly
    from ``low..high - 1`` (one range, or one per row) among the items its sequence never holds."""
    rows = np.asarray(rows, dtype=np.int64)
    low_of = np.broadcast_to(np.asarray(low, dtype=np.int64), rows.shape)
    high_of = np.broadcast_to(np.asarray(high, dtype=np.int64), rows.shape)
    width = np.int64(max(int(high_of.max(initial=1)), int(seqs.values.max(initial=0)) + 1))
    seq_of = np.repeat(np.arange(len(seqs), dtype=np.int64), seqs.lengths())
    seen = np.unique(seq_of * width + seqs.values)
    base = rows * width
    taken = np.searchsorted(seen, base + high_of) - np.searchsorted(seen, base + low_of)
    full = taken >= high_of - low_of
    if full.any():
        raise DataError(
            f"cannot sample negatives: {int(full.sum())} rows have no item left that their user "
            "never interacted with"
        )
    owner = np.repeat(base, count)
    low_of, high_of = np.repeat(low_of, count), np.repeat(high_of, count)
    draws = rng.integers(low_of, high_of, dtype=np.int64)
    # Rejection sampling: users touch a small share of the items, so a few redraws settle every slot.
    while True:
        keys = owner + draws
        hit = seen[np.minimum(np.searchsorted(seen, keys), len(seen) - 1)] == keys
        if not hit.any():
            return draws.reshape(len(rows), count)
        draws[hit] = rng.integers(low_of[hit], high_of[hit], dtype=np.int64)


def with_negatives(items: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Item and label (float32) columns in which each positive item is followed by its row of
    ``negatives``."""
    item_col = np.concatenate([items[:, None], negatives], axis=1).ravel()
    label = np.tile(np.array([1.0] + [0.0] * negatives.shape[1], dtype=np.float32), len(items))
    return item_col, label


def din_ctr(
    seqs: RaggedColumn,
    users: np.ndarray,
    params: SequenceCtrParams,
    candidates: tuple[int | np.ndarray, int | np.ndarray],
    features: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """The ``ctr_*`` tables (DIN-style) of chronological sequences of >= 3 items.

    Every position i >= 1 of a sequence (owned by ``users[row]``) is a positive with history
    s[:i]; positions up to n-3 train, n-2 valid, n-1 test (matching the leave-one-out view).
    Each positive is followed by ``neg_ratio`` negatives drawn from ``candidates`` (item ids
    ``low..high - 1``, one range or one per sequence) that share its user, history and
    ``features`` (one value per sequence).
    """
    lengths = seqs.lengths()
    flat = np.arange(len(seqs.values), dtype=np.int64)
    row = np.repeat(np.arange(len(seqs), dtype=np.int64), lengths)
    pos = flat - seqs.offsets[row]
    positive = pos >= 1
    flat, row, pos = flat[positive], row[positive], pos[positive]
    n_of = lengths[row]
    split = np.where(pos <= n_of - 3, 0, np.where(pos == n_of - 2, 1, 2))

    ratio = params.neg_ratio
    low, high = (np.broadcast_to(np.asarray(bound), (len(seqs),))[row] for bound in candidates)
    negatives = sample_negatives(seqs, row, ratio, low, high, np.random.default_rng(params.neg_seed))
    item_col, label = with_negatives(seqs.values[flat], negatives)
    # Each positive row is followed by its negatives, which share its user and history.
    source = np.repeat(flat, 1 + ratio)
    row_of = np.repeat(row, 1 + ratio)
    columns = {
        "user": users[row_of],
        "item": item_col,
        "label": label,
        **{name: values[row_of] for name, values in (features or {}).items()},
    }
    history = previous_items(seqs, source, params.ctr_max_history)
    row_split = np.repeat(split, 1 + ratio)
    tables = {
        table_name: ctr_table(columns, history, np.flatnonzero(row_split == code))
        for code, table_name in enumerate(CTR_TABLES)
    }
    return tables, {"ctr_positives": len(flat), "ctr_negatives": int(negatives.size)}


def fractions_sum_to_one(value: tuple[float, float, float]) -> tuple[float, float, float]:
    """Check (train, valid, test) fractions are >= 0 and sum to 1; returns them unchanged."""
    if min(value) < 0 or abs(sum(value) - 1.0) > 1e-9:
        raise ValueError(f"train/valid/test fractions must be >= 0 and sum to 1, got {list(value)}")
    return value


# (train, valid, test) row fractions of a random split, checked by :func:`fractions_sum_to_one`.
SplitFractions = Annotated[tuple[float, float, float], AfterValidator(fractions_sum_to_one)]


def random_split(n_rows: int, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """The split of each row (0 train, 1 valid, 2 test): a seeded permutation of the rows cut at
    ``round(fraction * n_rows)``."""
    perm = np.random.default_rng(seed).permutation(n_rows)
    n_train = round(fractions[0] * n_rows)
    n_valid = round(fractions[1] * n_rows)
    split = np.full(n_rows, 2, dtype=np.int8)
    split[perm[:n_train]] = 0
    split[perm[n_train : n_train + n_valid]] = 1
    return split


def split_tables(columns: dict[str, np.ndarray], split: np.ndarray) -> dict[str, pa.Table]:
    """The ``ctr_*`` tables (no history column) of the rows whose split is 0, 1 and 2, in row order."""
    return {
        table_name: pa.table({name: pa.array(values[split == code]) for name, values in columns.items()})
        for code, table_name in enumerate(CTR_TABLES)
    }
