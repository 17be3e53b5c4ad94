"""Amazon review datasets (S3-Rec 5-core sequences)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from rex.data.build import (
    MIN_SEQUENCE,
    Built,
    Params,
    ctr_table,
    ctr_view,
    leave_one_out,
    previous_items,
    register_dataset,
    sequence_view,
)
from rex.data.lance_io import RaggedColumn
from rex.data.mirror import AMAZON_S3REC_SEQ, log
from rex.data.schema import FieldSpec, ViewSpec
from rex.errors import DataError


class BeautyParams(Params):
    """Params of ``beauty`` (section ``beauty:`` of params.yaml)."""

    ctr_max_history: int = Field(50, ge=1)
    neg_ratio: int = Field(1, ge=1)
    neg_seed: int = 2024


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


@register_dataset("beauty", AMAZON_S3REC_SEQ, BeautyParams)
def build_beauty(raw: Path, params: BeautyParams) -> Built:
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
    tables = leave_one_out(keep + 1, kept)

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
    history = previous_items(kept, source, params.ctr_max_history)
    row_split = np.repeat(split, group)
    for code, table_name in enumerate(("ctr_train", "ctr_valid", "ctr_test")):
        tables[table_name] = ctr_table(columns, history, np.flatnonzero(row_split == code))

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
            "sequence": sequence_view(num_users, num_items),
            "ctr": ctr_view(num_users, num_items, {}, protocol="leave_one_out"),
            "items": items_view,
        },
        counts=counts,
    )
