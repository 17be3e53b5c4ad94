"""Shared pieces of dataset builders: params, the builder registry, and vectorised table blocks.

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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import BaseModel, ConfigDict

from rex.data.lance_io import RaggedColumn
from rex.data.mirror import RawSource
from rex.data.schema import FieldSpec, ViewSpec
from rex.errors import DataError

MIN_SEQUENCE = 3  # leave-one-out needs a train item, a valid target and a test target


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


def require_columns(columns: dict[str, np.ndarray], names: list[str], path: Path) -> None:
    missing = [n for n in names if n not in columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; found {', '.join(columns)}", file=str(path))
