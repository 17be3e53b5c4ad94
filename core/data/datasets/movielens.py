"""MovieLens datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from rex.data.build import (
    MIN_SEQUENCE,
    Built,
    Params,
    ctr_table,
    ctr_view,
    encode,
    leave_one_out,
    per_id,
    previous_items,
    read_atomic,
    register_dataset,
    remap,
    require_columns,
    sequence_view,
)
from rex.data.lance_io import RaggedColumn
from rex.data.mirror import ML100K_RECBOLE, log


class Ml100kParams(Params):
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


@register_dataset("ml-100k", ML100K_RECBOLE, Ml100kParams)
def build_ml100k(raw: Path, params: Ml100kParams) -> Built:
    base = raw / "ml-100k"
    inter_path, user_path, item_path = (base / f"ml-100k.{s}" for s in ("inter", "user", "item"))
    inter = read_atomic(inter_path)
    require_columns(inter, ["user_id", "item_id", "rating", "timestamp"], inter_path)
    users, user_keys = remap(inter["user_id"])
    items, item_keys = remap(inter["item_id"])
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
    tables = leave_one_out(keep + 1, seqs.take(keep))

    # ctr: each rating is a row; its history is everything the user rated before it in the
    # chronological order above, whichever split the earlier rows fall in.
    position = np.empty(n_rows, dtype=np.int64)
    position[order] = np.arange(n_rows)
    history = previous_items(seqs, position, params.ctr_max_history)

    user_feat = read_atomic(user_path)
    require_columns(user_feat, ["user_id", "age", "gender", "occupation", "zip_code"], user_path)
    item_feat = read_atomic(item_path)
    require_columns(item_feat, ["item_id", "release_year", "class"], item_path)
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
            codes, size = encode(tokens, unknown=unknown)
            columns[column] = per_id(meta_ids, codes, id_keys, path)[ids]
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
        tables[table_name] = ctr_table(columns, history, np.sort(rows))

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
            "sequence": sequence_view(num_users, num_items),
            "ctr": ctr_view(num_users, num_items, features, protocol="random"),
        },
        counts=counts,
    )
