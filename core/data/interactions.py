"""The core of an explicit-feedback dataset: an interaction log in, both views out.

An interaction log is one row per (user, item) event with an optional timestamp and an optional
0/1 label, plus categorical side features keyed by raw user/item id. :func:`build_interactions`
turns it into the ``sequence`` view (leave-one-out over chronological sequences) and, when there
are labels, the ``ctr`` view (every event a row, split at random by fractions and a seed). Native
builders (``ml-100k``) and ``rex data import`` both end here, so an import of the same files
with the same params gives the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rex.data.build import (
    CTR_TABLES,
    MIN_SEQUENCE,
    Built,
    ctr_table,
    ctr_view,
    encode,
    leave_one_out,
    per_id,
    previous_items,
    random_split,
    remap,
    sequence_view,
)
from rex.data.lance_io import RaggedColumn
from rex.data.mirror import log
from rex.data.schema import ViewSpec


@dataclass(frozen=True)
class SideFeatures:
    """Categorical features of users or items: one metadata row per raw id.

    ``columns`` maps a feature name to its tokens (one per metadata row); ``unknown`` names the
    tokens that mean "unknown" (encoded 0, as is the empty token) per feature.
    """

    ids: np.ndarray
    columns: dict[str, np.ndarray]
    path: Path
    unknown: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class CtrSplit:
    """How the ctr view is cut: random row fractions (train, valid, test), a seed, history length."""

    fractions: tuple[float, float, float]
    seed: int
    max_history: int


def chronological(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None, num_users: int
) -> tuple[RaggedColumn, np.ndarray]:
    """Per-user item sequences (row u - 1 holds user u), ordered by time, then by input order.

    Returns the sequences and the permutation of the input rows that lists them flat.
    """
    rows = np.arange(len(users))
    keys = (rows, users) if timestamps is None else (rows, timestamps, users)
    order = np.lexsort(keys)
    per_user = np.bincount(users, minlength=num_users)[1:]
    offsets = np.zeros(num_users, dtype=np.int64)
    np.cumsum(per_user, out=offsets[1:])
    return RaggedColumn(items[order], offsets), order


def build_interactions(
    name: str,
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray | None,
    labels: np.ndarray | None,
    split: CtrSplit,
    user_features: SideFeatures | None = None,
    item_features: SideFeatures | None = None,
) -> Built:
    """Both views of an interaction log.

    ``users``/``items`` are raw id tokens, remapped to 1..N (numeric tokens keep their order).
    Equal timestamps keep the input order. ``labels`` (0/1, or None for no ctr view) and the
    side features (user features first, then item features) go into the ctr rows; each row's
    history is every item the user touched before it, whichever split those rows fall in.
    """
    users, user_keys = remap(users)
    items, item_keys = remap(items)
    n_rows, num_users, num_items = len(users), len(user_keys) + 1, len(item_keys) + 1
    log(f"{name}: {n_rows} interactions, {num_users - 1} users, {num_items - 1} items")

    seqs, order = chronological(users, items, timestamps, num_users)
    per_user = seqs.lengths()
    keep = np.flatnonzero(per_user >= MIN_SEQUENCE)
    kept = seqs.take(keep)
    tables = leave_one_out(keep + 1, kept)
    views: dict[str, ViewSpec] = {"sequence": sequence_view(num_users, num_items)}
    counts = {
        "raw_users": num_users - 1,
        "raw_items": num_items - 1,
        "raw_interactions": n_rows,
        "users": len(keep),
        "items": int(np.unique(kept.values).size),
        "interactions": int(per_user[keep].sum()),
        "dropped_users_short": int(num_users - 1 - len(keep)),
    }
    if labels is None:
        return Built(tables, "leave_one_out", num_users, num_items, views, counts)

    position = np.empty(n_rows, dtype=np.int64)
    position[order] = np.arange(n_rows)
    history = previous_items(seqs, position, split.max_history)
    columns: dict[str, np.ndarray] = {"user": users, "item": items, "label": labels.astype(np.float32)}
    features: dict[str, int] = {}
    for meta, id_keys, ids in ((user_features, user_keys, users), (item_features, item_keys, items)):
        if meta is None:
            continue
        for column, tokens in meta.columns.items():
            codes, size = encode(tokens, unknown=meta.unknown.get(column, frozenset()))
            columns[column] = per_id(meta.ids, codes, id_keys, meta.path)[ids]
            features[column] = size

    split_of = random_split(n_rows, split.fractions, split.seed)
    tables.update(
        {
            table: ctr_table(columns, history, np.flatnonzero(split_of == code))
            for code, table in enumerate(CTR_TABLES)
        }
    )
    views["ctr"] = ctr_view(num_users, num_items, features, protocol="random")
    counts["ctr_positives"] = int(columns["label"].sum())
    return Built(tables, "leave_one_out", num_users, num_items, views, counts)
