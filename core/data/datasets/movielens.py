"""MovieLens datasets.

* ``ml-100k``: RecBole's atomic files (ratings with timestamps, user and item features), plus
  an ``items`` view whose ``text_minilm`` vectors are MiniLM embeddings of each movie's title and
  genres (:mod:`rex.data.features`, cached under ``_features/ml-100k_minilm``).
* ``ml-1m``: all 1,000,209 (user, movie) pairs, without rating or timestamp, plus users.dat
  and movies.dat. With no order and no labels, its ``ctr`` view is a seeded random split of the
  pairs (protocol ``random_split``), each followed by sampled negatives, and has no history.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from rex.config.errors import DataError
from rex.data.build import (
    Built,
    Params,
    SplitFractions,
    ctr_view,
    encode,
    per_id,
    random_split,
    read_atomic,
    register_dataset,
    remap,
    require_columns,
    sample_negatives,
    split_tables,
    with_negatives,
)
from rex.data.features import TextParams, features_root, items_view, minilm_features, register_texts
from rex.data.interactions import CtrSplit, SideFeatures, build_interactions
from rex.data.lance_io import RaggedColumn
from rex.data.mirror import ML100K_RECBOLE, Member, RawSource, log


class Ml100kParams(TextParams):
    """Params of ``ml-100k`` (section ``ml-100k:`` of params.yaml)."""

    label_threshold: float = 4.0
    split_seed: int = 2024
    split_fractions: SplitFractions = (0.8, 0.1, 0.1)
    # Long enough for DMGIN's grouped lifelong histories (the longest ml-100k user has 737
    # ratings); recipes cut it back with data.max_len.
    ctr_max_history: int = Field(256, ge=1)


def _ml100k_items(raw: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """(path, columns, order): the item file and the row order that sorts it by numeric item id."""
    item_path = raw / "ml-100k" / "ml-100k.item"
    item_feat = read_atomic(item_path)
    require_columns(item_feat, ["item_id", "movie_title", "release_year", "class"], item_path)
    _, keys = remap(item_feat["item_id"])
    if len(keys) != len(item_feat["item_id"]):
        raise DataError("item ids are not unique", file=str(item_path))
    return item_path, item_feat, np.argsort(keys)


@register_texts("ml-100k", ML100K_RECBOLE)
def ml100k_texts(raw: Path) -> list[str]:
    """``"<title>. Genres: <g1>, <g2>"`` per movie, in numeric item id order."""
    _, item_feat, order = _ml100k_items(raw)
    titles, genres = item_feat["movie_title"][order], item_feat["class"][order]
    return [f"{t}. Genres: {', '.join(str(g).split())}" for t, g in zip(titles, genres, strict=True)]


@register_dataset("ml-100k", ML100K_RECBOLE, Ml100kParams)
def build_ml100k(raw: Path, params: Ml100kParams) -> Built:
    base = raw / "ml-100k"
    inter_path, user_path = (base / f"ml-100k.{s}" for s in ("inter", "user"))
    inter = read_atomic(inter_path)
    require_columns(inter, ["user_id", "item_id", "rating", "timestamp"], inter_path)
    user_feat = read_atomic(user_path)
    require_columns(user_feat, ["user_id", "age", "gender", "occupation", "zip_code"], user_path)
    item_path, item_feat, order = _ml100k_items(raw)
    # Two items carry no usable year ("unkonwn" for item 267, "V" for item 1412); "unknown" is
    # MovieLens's own genre for a movie without one. Equal timestamps (half the rows share one
    # with another row of the same user) keep the file's order.
    year = item_feat["release_year"].astype(str)
    year = np.where((np.char.str_len(year) == 4) & np.char.isdigit(year), year, "")
    genre = np.char.partition(item_feat["class"].astype(str), " ")[:, 0]
    built = build_interactions(
        "ml-100k",
        inter["user_id"],
        inter["item_id"],
        inter["timestamp"],
        (inter["rating"] >= params.label_threshold).astype(np.float32),
        CtrSplit(params.split_fractions, params.split_seed, params.ctr_max_history),
        user_features=SideFeatures(
            user_feat["user_id"],
            {
                "age": user_feat["age"],
                "gender": user_feat["gender"],
                "occupation": user_feat["occupation"],
                "zip": user_feat["zip_code"],
            },
            user_path,
        ),
        item_features=SideFeatures(
            item_feat["item_id"],
            {"release_year": year, "genre": genre},
            item_path,
            unknown={"genre": frozenset({"unknown"})},
        ),
    )
    # Text row j belongs to the j-th smallest raw item id; rex item ids are the rated items'
    # raw ids remapped in numeric order, so each id finds its row by its raw key.
    text = minilm_features("ml-100k", ml100k_texts(raw), features_root(raw), params.text_batch_size)
    _, item_keys = remap(inter["item_id"])
    raw_sorted = item_feat["item_id"][order].astype(np.int64)
    rows = np.searchsorted(raw_sorted, item_keys)
    if (rows >= len(raw_sorted)).any() or not np.array_equal(
        raw_sorted[np.minimum(rows, len(raw_sorted) - 1)], item_keys
    ):
        raise DataError("rated items missing from the item file", file=str(item_path))
    table, view = items_view(built.num_items, {"text_minilm": ("modality:text_minilm", text[rows])})
    return replace(built, tables={**built.tables, "items": table}, views={**built.views, "items": view})


# --------------------------------------------------------------------------------------------
# ml-1m

_AURA = "https://github.com/bigdataguide/AuraSparkTraining/raw/03ebfaf1/data/ml-1m"

ML1M_PAIRS_META = RawSource(
    archive="ml-1m_pairs_meta.tar.xz",
    sha256="7a99834f48d7ddfefdf4470436859a3bc89c1fdb57ac0684dba52676d7eeca64",
    members=[
        Member(
            "ml-1m/README",
            f"{_AURA}/README",
            "416e0b06d0ce900fb5a31f50941f05074f65b855fda9c4f4f1f8da2c56593439",
        ),
        Member(
            "ml-1m/movies.dat",
            f"{_AURA}/movies.dat",
            "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
        ),
        Member(
            "ml-1m/ratings.parquet",
            f"{_AURA}/ratings.parquet",
            "b354c7081dd0a6ca6b2711d6ae48d057ade864332ae90e28856372997d88994f",
        ),
        Member(
            "ml-1m/users.dat",
            f"{_AURA}/users.dat",
            "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
        ),
    ],
)

ZIP_PREFIX = 3  # the zip feature keeps a zip code's first 3 digits (its US sectional centre)
_YEAR = re.compile(r"\((\d{4})\)\s*$")


class Ml1mParams(Params):
    """Params of ``ml-1m`` (section ``ml-1m:`` of params.yaml)."""

    split_seed: int = 2024
    split_fractions: SplitFractions = (0.8, 0.1, 0.1)
    neg_ratio: int = Field(1, ge=1)
    neg_seed: int = 2024


def _read_dat(path: Path, names: list[str], encoding: str) -> dict[str, np.ndarray]:
    """Read a MovieLens ``a::b::c`` file into string columns."""
    try:
        lines = path.read_text(encoding=encoding).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read: {exc}", file=str(path)) from exc
    rows = [line.split("::") for line in lines if line]
    for number, row in enumerate(rows, start=1):
        if len(row) != len(names):
            raise DataError(
                f"line {number}: expected {len(names)} '::'-separated fields ({', '.join(names)}), "
                f"got {len(row)}",
                file=str(path),
            )
    return {
        name: np.array(column, dtype=str) for name, column in zip(names, zip(*rows, strict=True), strict=True)
    }


@register_dataset("ml-1m", ML1M_PAIRS_META, Ml1mParams)
def build_ml1m(raw: Path, params: Ml1mParams) -> Built:
    """The ``ctr`` view of ml-1m: every pair a positive, in a seeded random split, followed by
    ``neg_ratio`` negatives the user never interacted with, with user and movie features.

    The pairs carry no timestamp, so there is no order: no sequence view and no history.
    """
    base = raw / "ml-1m"
    pairs_path, user_path, movie_path = base / "ratings.parquet", base / "users.dat", base / "movies.dat"
    try:
        pairs = pq.read_table(pairs_path, columns=["userID", "movieID"])
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read the userID and movieID columns: {exc}", file=str(pairs_path)) from exc
    users, user_keys = remap(pairs.column("userID").to_numpy(zero_copy_only=False))
    items, item_keys = remap(pairs.column("movieID").to_numpy(zero_copy_only=False))
    n_rows, num_users, num_items = len(users), len(user_keys) + 1, len(item_keys) + 1
    log(f"ml-1m: {n_rows} interactions, {num_users - 1} users, {num_items - 1} items")

    # Each user's items (row u - 1 holds user u), to draw negatives outside them.
    per_user = np.bincount(users, minlength=num_users)[1:]
    seqs = RaggedColumn(items[np.argsort(users, kind="stable")], np.concatenate([[0], np.cumsum(per_user)]))
    rng = np.random.default_rng(params.neg_seed)
    negatives = sample_negatives(seqs, users - 1, params.neg_ratio, 1, num_items, rng)
    # Each positive row is followed by its negatives, which share its user.
    item_col, label = with_negatives(items, negatives)
    user_col = np.repeat(users, 1 + params.neg_ratio)
    columns: dict[str, np.ndarray] = {"user": user_col, "item": item_col, "label": label}

    user_meta = _read_dat(user_path, ["user_id", "gender", "age", "occupation", "zip"], "utf-8")
    # movies.dat is Latin-1 (accented titles).
    movie_meta = _read_dat(movie_path, ["item_id", "title", "genres"], "latin-1")
    user_features = {
        "age": user_meta["age"],
        "gender": user_meta["gender"],
        "occupation": user_meta["occupation"],
        "zip": np.array([code[:ZIP_PREFIX] for code in user_meta["zip"]]),
    }
    years = [match.group(1) if (match := _YEAR.search(title)) else "" for title in movie_meta["title"]]
    item_features = {
        "release_year": np.array(years),
        "genre": np.array([genres.split("|")[0] for genres in movie_meta["genres"]]),
    }
    features: dict[str, int] = {}
    for meta, meta_ids, id_keys, ids, path in (
        (user_features, user_meta["user_id"], user_keys, user_col, user_path),
        (item_features, movie_meta["item_id"], item_keys, item_col, movie_path),
    ):
        for column, tokens in meta.items():
            codes, size = encode(tokens)
            columns[column] = per_id(meta_ids, codes, id_keys, path)[ids]
            features[column] = size

    split = np.repeat(random_split(n_rows, params.split_fractions, params.split_seed), 1 + params.neg_ratio)
    view = ctr_view(num_users, num_items, features, protocol="random_split")
    del view.fields["history"]  # no timestamps: the order of a user's items is unknown
    counts = {
        "raw_users": num_users - 1,
        "raw_items": num_items - 1,
        "raw_interactions": n_rows,
        "users_metadata": len(user_meta["user_id"]),
        "movies_metadata": len(movie_meta["item_id"]),
        "users": num_users - 1,
        "items": num_items - 1,
        "interactions": n_rows,
        "ctr_positives": n_rows,
        "ctr_negatives": int(negatives.size),
    }
    return Built(
        tables=split_tables(columns, split),
        protocol="random_split",
        num_users=num_users,
        num_items=num_items,
        views={"ctr": view},
        counts=counts,
    )
