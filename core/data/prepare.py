"""Data stages: raw mirror files in, a prepared dataset (Lance tables + schema.json) out.

``prepare_dataset(name)`` fetches the raw source (:mod:`rex.data.mirror`), builds every table
with vectorised numpy and writes ``<root>/<name>/`` atomically: the whole directory is built
beside the target and swapped in, so the tables and the schema always belong together.

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

import difflib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rex.data.lance_io import RaggedColumn, swap_into_place, write_table
from rex.data.mirror import AMAZON_S3REC_SEQ, ML100K_RECBOLE, RawSource, fetch, log
from rex.data.schema import DatasetSchema, FieldSpec, ViewSpec, data_hash, load_schema, save_schema
from rex.errors import DataError

DATA_HOME_ENV = "REX_DATA_HOME"
PARAMS_FILE = "params.yaml"
# Bump when the tables a build writes change for the same raw data and params: an older
# prepared directory is then rebuilt instead of being reused.
PREPARE_VERSION = 1
MIN_SEQUENCE = 3  # leave-one-out needs a train item, a valid target and a test target
RAW_DIR = "_raw"


def data_root() -> Path:
    """Where prepared datasets live: ``$REX_DATA_HOME`` or ``<cwd>/data``."""
    env = os.environ.get(DATA_HOME_ENV)
    return Path(env).expanduser() if env else Path.cwd() / "data"


# --------------------------------------------------------------------------------------------
# params


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Ml100kParams(_Params):
    """Params of ``ml-100k`` (section ``ml-100k:`` of params.yaml)."""

    label_threshold: float = 4.0
    split_seed: int = 2024
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    ctr_max_history: int = Field(50, ge=1)

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or abs(sum(value) - 1.0) > 1e-9:
            raise ValueError(f"train/valid/test fractions must be >= 0 and sum to 1, got {list(value)}")
        return value


class BeautyParams(_Params):
    """Params of ``beauty`` (section ``beauty:`` of params.yaml)."""

    ctr_max_history: int = Field(50, ge=1)
    neg_ratio: int = Field(1, ge=1)
    neg_seed: int = 2024


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict (``{}`` when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(f"not valid YAML: {exc}", file=str(path)) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise DataError("expected a mapping of dataset name to params", file=str(path))
    return loaded


def _validate_params(name: str, model: type[_Params], raw: Any, file: str) -> _Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DataError("expected a mapping of params", file=file, key=name)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(first["loc"][0]), list(model.model_fields), n=1)
            message = "unknown param" + (f" (did you mean {close[0]}?)" if close else "")
            message += f"; known: {', '.join(model.model_fields)}"
        raise DataError(message, file=file, key=f"{name}.{loc}" if loc else name) from exc


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
    params: type[_Params]
    build: Callable[[Path, Any], Built]


# --------------------------------------------------------------------------------------------
# shared building blocks


def _remap(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map raw id tokens to contiguous ids 1..N; returns (ids, sorted raw keys: id i has key i - 1).

    All-numeric tokens are keyed (and ordered) as integers, so ids already 1..N stay the same.
    """
    tokens = np.asarray(tokens).astype(str)
    numeric = len(tokens) > 0 and bool(np.char.isdigit(tokens).all())
    keys, inverse = np.unique(tokens.astype(np.int64) if numeric else tokens, return_inverse=True)
    return inverse.astype(np.int64) + 1, keys


def _encode(tokens: np.ndarray, unknown: frozenset[str] = frozenset()) -> tuple[np.ndarray, int]:
    """Encode string tokens as 1..K (sorted), with ``unknown`` tokens and '' as 0; returns (codes, K + 1)."""
    tokens = np.asarray(tokens).astype(str)
    known = ~np.isin(tokens, [*unknown, ""])
    uniques, inverse = np.unique(tokens[known], return_inverse=True)
    codes = np.zeros(len(tokens), dtype=np.int64)
    codes[known] = inverse + 1
    return codes, len(uniques) + 1


def _per_id(meta_ids: np.ndarray, codes: np.ndarray, id_keys: np.ndarray, path: Path) -> np.ndarray:
    """Scatter metadata codes (one per metadata row, keyed by raw id) onto remapped ids 1..N.

    ``id_keys`` are the sorted raw keys from :func:`_remap`. Ids without a metadata row get 0
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


def _previous_items(seqs: RaggedColumn, flat: np.ndarray, max_len: int) -> RaggedColumn:
    """For the elements at ``flat`` indices of ``seqs.values``: up to ``max_len`` items before each
    in its own row, oldest first."""
    row = np.searchsorted(seqs.offsets, flat, side="right") - 1
    kept = np.minimum(flat - seqs.offsets[row], max_len)
    return RaggedColumn.from_slices(seqs.values, flat - kept, kept)


def _leave_one_out(users: np.ndarray, seqs: RaggedColumn) -> dict[str, pa.Table]:
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


def _sequence_view(num_users: int, num_items: int) -> ViewSpec:
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


def _ctr_view(num_users: int, num_items: int, features: dict[str, int], protocol: str) -> ViewSpec:
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


def _ctr_table(columns: dict[str, np.ndarray], history: RaggedColumn, rows: np.ndarray) -> pa.Table:
    data: dict[str, pa.Array] = {name: pa.array(values[rows]) for name, values in columns.items()}
    data["history"] = history.take(rows).to_arrow()
    return pa.table(data)


def _read_atomic(path: Path) -> dict[str, np.ndarray]:
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


def _require(columns: dict[str, np.ndarray], names: list[str], path: Path) -> None:
    missing = [n for n in names if n not in columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; found {', '.join(columns)}", file=str(path))


# --------------------------------------------------------------------------------------------
# ml-100k


def _build_ml100k(raw: Path, params: Ml100kParams) -> Built:
    base = raw / "ml-100k"
    inter_path, user_path, item_path = (base / f"ml-100k.{s}" for s in ("inter", "user", "item"))
    inter = _read_atomic(inter_path)
    _require(inter, ["user_id", "item_id", "rating", "timestamp"], inter_path)
    users, user_keys = _remap(inter["user_id"])
    items, item_keys = _remap(inter["item_id"])
    rating, timestamp = inter["rating"], inter["timestamp"]
    n_rows, num_users, num_items = len(users), len(user_keys) + 1, len(item_keys) + 1
    log(f"ml-100k: {n_rows} interactions, {num_users - 1} users, {num_items - 1} items")

    # Chronological order per user; equal timestamps (half the rows share one with another
    # row of the same user) keep the file's order.
    order = np.lexsort((np.arange(n_rows), timestamp, users))
    per_user = np.bincount(users, minlength=num_users)[1:]
    offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
    seqs = RaggedColumn(items[order], offsets)

    keep = np.flatnonzero(per_user >= MIN_SEQUENCE)
    tables = _leave_one_out(keep + 1, seqs.take(keep))

    # ctr: each rating is a row; its history is everything the user rated before it in the
    # chronological order above, whichever split the earlier rows fall in.
    position = np.empty(n_rows, dtype=np.int64)
    position[order] = np.arange(n_rows)
    history = _previous_items(seqs, position, params.ctr_max_history)

    user_feat = _read_atomic(user_path)
    _require(user_feat, ["user_id", "age", "gender", "occupation", "zip_code"], user_path)
    item_feat = _read_atomic(item_path)
    _require(item_feat, ["item_id", "release_year", "class"], item_path)
    year = item_feat["release_year"].astype(str)
    # Two items carry no usable year ("unkonwn" for item 267, "V" for item 1412).
    year = np.where((np.char.str_len(year) == 4) & np.char.isdigit(year), year, "")
    genre = np.array([g.split(" ", 1)[0] for g in item_feat["class"].astype(str)])
    columns: dict[str, np.ndarray] = {
        "user": users,
        "item": items,
        "label": (rating >= params.label_threshold).astype(np.float32),
    }
    features: dict[str, int] = {}
    user_meta = {
        "age": user_feat["age"],
        "gender": user_feat["gender"],
        "occupation": user_feat["occupation"],
        "zip": user_feat["zip_code"],
    }
    item_meta = {"release_year": year, "genre": genre}
    for meta, meta_ids, id_keys, ids, path in (
        (user_meta, user_feat["user_id"], user_keys, users, user_path),
        (item_meta, item_feat["item_id"], item_keys, items, item_path),
    ):
        for column, tokens in meta.items():
            # "unknown" is MovieLens's own genre for a movie without one.
            unknown = frozenset({"unknown"}) if column == "genre" else frozenset()
            codes, size = _encode(tokens, unknown=unknown)
            columns[column] = _per_id(meta_ids, codes, id_keys, path)[ids]
            features[column] = size

    rng = np.random.default_rng(params.split_seed)
    perm = rng.permutation(n_rows)
    n_train = round(params.split_fractions[0] * n_rows)
    n_valid = round(params.split_fractions[1] * n_rows)
    splits = {
        "ctr_train": perm[:n_train],
        "ctr_valid": perm[n_train : n_train + n_valid],
        "ctr_test": perm[n_train + n_valid :],
    }
    for table_name, rows in splits.items():
        tables[table_name] = _ctr_table(columns, history, np.sort(rows))

    counts = {
        "raw_users": num_users - 1,
        "raw_items": num_items - 1,
        "raw_interactions": n_rows,
        "users": len(keep),
        "items": int(np.unique(seqs.take(keep).values).size),
        "interactions": int(per_user[keep].sum()),
        "dropped_users_short": int(num_users - 1 - len(keep)),
        "ctr_positives": int(columns["label"].sum()),
    }
    return Built(
        tables=tables,
        protocol="leave_one_out",
        num_users=num_users,
        num_items=num_items,
        views={
            "sequence": _sequence_view(num_users, num_items),
            "ctr": _ctr_view(num_users, num_items, features, protocol="random"),
        },
        counts=counts,
    )


# --------------------------------------------------------------------------------------------
# beauty


def _read_sequences(path: Path) -> tuple[np.ndarray, RaggedColumn]:
    """Read ``user item item ...`` lines into (users, sequences), checking every token is an id."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read: {exc}", file=str(path)) from exc
    lines = [line for line in lines if line.strip()]
    lengths = np.fromiter((line.count(" ") for line in lines), dtype=np.int64, count=len(lines))
    try:
        tokens = np.array(" ".join(lines).split(" "), dtype=np.int64)
    except ValueError as exc:
        raise DataError(
            f"expected lines of integer ids separated by single spaces: {exc}", file=str(path)
        ) from exc
    if len(tokens) != int(lengths.sum()) + len(lines):
        raise DataError("expected lines of integer ids separated by single spaces", file=str(path))
    heads = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    is_item = np.ones(len(tokens), dtype=bool)
    is_item[heads] = False
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if (lengths < 1).any():
        line = int(np.flatnonzero(lengths < 1)[0]) + 1
        raise DataError(f"line {line}: a user with no items", file=str(path))
    return tokens[heads], RaggedColumn(tokens[is_item], offsets)


def _check_contiguous(ids: np.ndarray, what: str, path: Path) -> int:
    """Check the ids are exactly 1..N (each present) and return N."""
    uniques = np.unique(ids)
    if len(uniques) == 0 or uniques[0] != 1 or uniques[-1] != len(uniques):
        raise DataError(
            f"{what} ids are not contiguous 1..N ({len(uniques)} distinct, range "
            f"{uniques.min() if len(uniques) else '-'}..{uniques.max() if len(uniques) else '-'})",
            file=str(path),
        )
    return int(len(uniques))


def _sample_negatives(
    seqs: RaggedColumn, rows: np.ndarray, count: int, num_items: int, rng: np.random.Generator
) -> np.ndarray:
    """``len(rows) x count`` item ids drawn uniformly from items the row's user never touched."""
    width = np.int64(num_items)
    user_of = np.repeat(np.arange(len(seqs), dtype=np.int64), seqs.lengths())
    seen = np.unique(user_of * width + seqs.values)
    owner = np.repeat(rows, count) * width
    draws = rng.integers(1, num_items, size=len(owner), dtype=np.int64)
    # Rejection sampling: users touch ~0.1% of items, so a redraw or two settles every slot.
    while True:
        keys = owner + draws
        hit = seen[np.minimum(np.searchsorted(seen, keys), len(seen) - 1)] == keys
        if not hit.any():
            return draws.reshape(len(rows), count)
        draws[hit] = rng.integers(1, num_items, size=int(hit.sum()), dtype=np.int64)


def _build_beauty(raw: Path, params: BeautyParams) -> Built:
    seq_path = raw / "s3rec" / "Beauty.txt"
    attr_path = raw / "s3rec" / "Beauty_item2attributes.json"
    users, seqs = _read_sequences(seq_path)
    n_users = _check_contiguous(users, "user", seq_path)
    if len(users) != n_users:
        raise DataError(f"{len(users) - n_users} users appear on more than one line", file=str(seq_path))
    n_items = _check_contiguous(seqs.values, "item", seq_path)
    # Row r holds user r + 1, so a user id indexes its row directly.
    seqs = seqs.take(np.argsort(users, kind="stable"))
    num_users, num_items = n_users + 1, n_items + 1
    log(f"beauty: {len(seqs.values)} interactions, {n_users} users, {n_items} items")

    lengths = seqs.lengths()
    keep = np.flatnonzero(lengths >= MIN_SEQUENCE)
    kept = seqs.take(keep)
    tables = _leave_one_out(keep + 1, kept)

    try:
        attributes = json.loads(attr_path.read_text(encoding="utf-8"))
        attr_items = np.array([int(k) for k in attributes], dtype=np.int64)
        attr_lists = [list(map(int, v)) for v in attributes.values()]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(
            f"expected a JSON object of item id -> list of attribute ids: {exc}", file=str(attr_path)
        ) from exc
    if len(attr_items) and (attr_items.min() < 1 or attr_items.max() >= num_items):
        raise DataError(f"attribute keys outside the item ids 1..{n_items}", file=str(attr_path))
    per_item: list[list[int]] = [[] for _ in range(num_items)]
    for item, attrs in zip(attr_items.tolist(), attr_lists, strict=True):
        per_item[item] = attrs
    attr_column = RaggedColumn.from_lists(per_item[1:])
    num_attributes = int(attr_column.values.max(initial=0)) + 1
    tables["items"] = pa.table(
        {"item": pa.array(np.arange(1, num_items, dtype=np.int64)), "attributes": attr_column.to_arrow()}
    )

    # ctr (DIN-style): every position i >= 1 of a kept sequence is a positive with history
    # s[:i]; positions up to n-3 train, n-2 valid, n-1 test (matching the leave-one-out view).
    k_len = kept.lengths()
    flat = np.arange(len(kept.values), dtype=np.int64)
    row = np.repeat(np.arange(len(kept), dtype=np.int64), k_len)
    pos = flat - kept.offsets[row]
    positive = pos >= 1
    flat, row, pos = flat[positive], row[positive], pos[positive]
    n_of = k_len[row]
    split = np.where(pos <= n_of - 3, 0, np.where(pos == n_of - 2, 1, 2))

    ratio = params.neg_ratio
    rng = np.random.default_rng(params.neg_seed)
    negatives = _sample_negatives(kept, row, ratio, num_items, rng)
    group = 1 + ratio
    # Each positive row is followed by its negatives, which share its user and history.
    source = np.repeat(flat, group)
    item_col = np.concatenate([kept.values[flat][:, None], negatives], axis=1).ravel()
    label = np.tile(np.array([1.0] + [0.0] * ratio, dtype=np.float32), len(flat))
    columns = {"user": (keep + 1)[np.repeat(row, group)], "item": item_col, "label": label}
    history = _previous_items(kept, source, params.ctr_max_history)
    row_split = np.repeat(split, group)
    for code, table_name in enumerate(("ctr_train", "ctr_valid", "ctr_test")):
        tables[table_name] = _ctr_table(columns, history, np.flatnonzero(row_split == code))

    counts = {
        "raw_users": n_users,
        "raw_items": n_items,
        "raw_interactions": int(lengths.sum()),
        "users": len(keep),
        "items": int(np.unique(kept.values).size),
        "interactions": int(k_len.sum()),
        "dropped_users_short": int(n_users - len(keep)),
        "num_attributes": num_attributes,
        "ctr_positives": len(flat),
        "ctr_negatives": int(negatives.size),
    }
    items_view = ViewSpec(
        tables={"all": "items"},
        fields={
            "item": FieldSpec(role="item", kind="categorical", vocab_size=num_items),
            "attributes": FieldSpec(role="item_attributes", kind="sequence", vocab_size=num_attributes),
        },
    )
    return Built(
        tables=tables,
        protocol="leave_one_out",
        num_users=num_users,
        num_items=num_items,
        views={
            "sequence": _sequence_view(num_users, num_items),
            "ctr": _ctr_view(num_users, num_items, {}, protocol="leave_one_out"),
            "items": items_view,
        },
        counts=counts,
    )


DATASETS: dict[str, DatasetDef] = {
    "ml-100k": DatasetDef(ML100K_RECBOLE, Ml100kParams, _build_ml100k),
    "beauty": DatasetDef(AMAZON_S3REC_SEQ, BeautyParams, _build_beauty),
}


# --------------------------------------------------------------------------------------------
# entry points


def _lookup(name: str) -> DatasetDef:
    try:
        return DATASETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; known: {', '.join(DATASETS)}") from None


def _is_current(directory: Path, schema: DatasetSchema, params: dict[str, Any], source: RawSource) -> bool:
    return (
        schema.version == PREPARE_VERSION
        and schema.params == params
        and schema.source.get("sha256") == source.sha256
        and all((directory / f"{table}.lance").is_dir() for table in schema.tables)
    )


def _remove_stale(root: Path, name: str) -> None:
    """Delete build directories left by killed ``prepare`` runs (their pid is gone)."""
    for leftover in root.glob(f".{name}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(leftover, ignore_errors=True)
            except PermissionError:
                pass


def prepare_dataset(
    name: str, params: dict[str, Any] | None = None, root: Path | None = None, force: bool = False
) -> DatasetSchema:
    """Build ``<root>/<name>/`` (Lance tables + schema.json) from the raw source.

    ``params`` default to the ``<name>:`` section of ``params.yaml`` in the working directory;
    missing keys take the defaults. An existing directory built from the same source, params
    and prepare version is reused unless ``force``.
    """
    definition = _lookup(name)
    if params is None:
        raw_params, params_file = load_params().get(name), PARAMS_FILE
    else:
        raw_params, params_file = params, "params"
    validated = _validate_params(name, definition.params, raw_params, params_file)
    used = validated.model_dump(mode="json")
    root = Path(root) if root is not None else data_root()
    out = root / name

    if not force and (out / "schema.json").is_file():
        try:
            existing = load_schema(out)
        except DataError:
            existing = None
        if existing is not None and _is_current(out, existing, used, definition.source):
            log(f"{name}: up to date at {out}")
            return existing

    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root, name)
    raw = fetch(definition.source, root / RAW_DIR)
    built = definition.build(raw, validated)
    log(f"{name}: built {len(built.tables)} tables in {time.perf_counter() - started:.1f}s; writing")

    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for table_name, table in built.tables.items():
            write_table(tmp / f"{table_name}.lance", table)
        schema = DatasetSchema(
            name=name,
            version=PREPARE_VERSION,
            protocol=built.protocol,
            num_users=built.num_users,
            num_items=built.num_items,
            views=built.views,
            tables={table_name: table.num_rows for table_name, table in built.tables.items()},
            counts=built.counts,
            params=used,
            source={"archive": definition.source.archive, "sha256": definition.source.sha256},
        )
        save_schema(tmp, schema)
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{name}: prepared at {out} in {time.perf_counter() - started:.1f}s")
    return schema


def ensure_dataset(name: str, root: Path | None = None) -> Path:
    """The prepared directory of ``name``, preparing it first if missing or out of date."""
    prepare_dataset(name, root=root)
    return (Path(root) if root is not None else data_root()) / name


def dataset_info(name: str, root: Path | None = None) -> str:
    """A text summary of a prepared dataset: source, sizes, counts, views and fields."""
    _lookup(name)
    directory = (Path(root) if root is not None else data_root()) / name
    schema = load_schema(directory)
    lines = [
        f"{schema.name} (prepare v{schema.version}, protocol {schema.protocol}) at {directory}",
        f"  data hash  {data_hash(directory)[:16]}",
        f"  source     {schema.source.get('archive')} sha256 {str(schema.source.get('sha256'))[:16]}",
        f"  users      {schema.num_users - 1:,} (ids 1..N, num_users {schema.num_users})",
        f"  items      {schema.num_items - 1:,} (ids 1..N, num_items {schema.num_items})",
        "  params     " + ", ".join(f"{k}={v}" for k, v in schema.params.items()),
        "  counts     " + ", ".join(f"{k}={v:,}" for k, v in schema.counts.items()),
    ]
    for view_name, view in schema.views.items():
        protocol = f", protocol {view.protocol}" if view.protocol else ""
        lines.append(f"  view {view_name}{protocol}")
        for split, table in view.tables.items():
            lines.append(f"    {split:<6} {table} ({schema.tables.get(table, 0):,} rows)")
        for field_name, spec in view.fields.items():
            extra = f" vocab {spec.vocab_size}" if spec.vocab_size is not None else ""
            extra += f" (shares {spec.vocab_of})" if spec.vocab_of else ""
            lines.append(f"    field {field_name}: {spec.kind}, role {spec.role or '-'}{extra}")
    return "\n".join(lines)
