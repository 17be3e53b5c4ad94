"""Amazon 2018 "Industrial & Scientific": with item text (UniSRec/CoWPiRec, ``scientific``) and with
text and image features (DecoRec, ``scientific_mm``).

Both ship RecBole leave-one-out files. ``.train.inter`` holds one row per training target
(``item_id_list`` = the items before it, at most 50, and ``item_id`` = the target); a user's rows
are contiguous, newest first. ``.valid.inter`` and ``.test.inter`` hold one row per user: the
second-to-last and the last item with the items before them. User and item tokens are 0-based
indices into ``.user2index`` / ``.item2index`` (whose first column is the reviewer ID / ASIN);
rex ids are index + 1.

The given split is kept exactly: a user's sequence is rebuilt from its rows (the oldest
training row's history, then every target in order, then the valid and the test target) and
every given row is checked against it, so the ``sequence`` view's tables hold the same
(history, target) pairs as the files. RecBole cut histories to their last 50 items; the rebuilt
sequences are whole (3 ``scientific`` users have more than 52 items: 59,427 interactions in all,
59,384 counted in the test file's truncated rows).

``.text`` is the item text (title, categories and brand, keyed by ASIN), embedded with MiniLM
(:mod:`rex.data.features`) into the ``items`` table's ``text_minilm`` column. ``scientific_mm``
also ships ``.feat1CLS`` (text) and ``.feat3CLS`` (image): raw float32 ``items x 512`` arrays
whose row ``i`` is item index ``i`` (as DecoRec's loader reads them; their encoder is not
documented), stored as the ``text`` and ``image`` columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from rex.config.errors import DataError
from rex.data.build import (
    Built,
    SequenceCtrParams,
    ctr_view,
    din_ctr,
    leave_one_out,
    read_atomic,
    read_delimited,
    register_dataset,
    require_columns,
    sequence_view,
)
from rex.data.features import TextParams, features_root, minilm_features, register_texts
from rex.data.lance_io import RaggedColumn, vector_column
from rex.data.mirror import RawSource, log, members
from rex.data.schema import FieldSpec, ViewSpec

_COWPIREC = "https://github.com/ysh-1998/CoWPiRec/raw/db47560c/dataset/Scientific"
_DECOREC = "https://github.com/KIKIENAO/decorec/raw/3d93ec58/dataset/downstream/Scientific"

SCIENTIFIC_TEXT = RawSource(
    archive="amazon_scientific_text_unisrec.tar.xz",
    sha256="4c004827ed38e46aa55865f98a401e9b41e0df2f257a0134f541845bd5402a32",
    members=members(
        "scientific",
        _COWPIREC,
        {
            "Scientific.item2index": "896ab1017508cf20834d3d0537da9f8f624324223a835af272a98ba16f8c087a",
            "Scientific.user2index": "f0162b1a3a0c6b7e816f86208e7b36f65d6787923126f9558fbc6d368e4c4974",
            "Scientific.text": "95887e6bda76e54f59b71b566320520d5da74e21d3b6ff8f20bfb6e8e84aa831",
            "Scientific.train.inter": "7284f6489d956fa20c9b64ffc84569264320edba5c3bc2fcb22db2ea083a1163",
            "Scientific.valid.inter": "5f37c84d3b54617cdc46638c89dfe8741c7efc4987acd5eb64de2cbd4311f46c",
            "Scientific.test.inter": "546da7e5f44002b4518d7fd58066684bc09613f76c240914e16976d57cfe7083",
        },
    ),
)

SCIENTIFIC_MM = RawSource(
    archive="amazon_scientific_mm_decorec.tar.xz",
    sha256="c4f44ebea16a2d953c2f437202961725259ba77133ace8b16c17264590ce4a13",
    members=members(
        "scientific_mm",
        _DECOREC,
        {
            "Scientific.item2index": "e689059637092e6dfaf6161ab71c5a3e54d96dc6a401a285c534cfc41516c022",
            "Scientific.user2index": "417271f5886f37761b9e7e0da8e80e189aac034922491ade408101bc31270642",
            "Scientific.text": "2989b83daab4624c7adc289d17baea0d09f85c20545e1635f7614926ae489167",
            "Scientific.feat1CLS": "45fc2f23e1cd621f67ffc8584aa0cc30adae6eb5d7a354f79a2f93e6b94f8ae2",
            "Scientific.feat3CLS": "20cb8a751cbc1a84c785bc4acdd13a3f1003d4be0c3c8d4034cd1de834b43389",
            "Scientific.train.inter": "ad7a8cc23499cdbc3a0ba3650a438f946da433131e786b4ce4dfeae1c5590c5f",
            "Scientific.valid.inter": "46b3f988b4f12ed05de4ba518e48744d7680eda42146138ffb416445d191cafb",
            "Scientific.test.inter": "46077666a7e26f6f3a0b8929c15b66af83b4a21859fb0a6c25692403fd703611",
        },
    ),
)

MM_DIM = 512


class ScientificParams(TextParams):
    """Params of ``scientific`` (section ``scientific:`` of params.yaml)."""


class ScientificMmParams(SequenceCtrParams, TextParams):
    """Params of ``scientific_mm`` (section ``scientific_mm:`` of params.yaml)."""


# --------------------------------------------------------------------------------------------
# reading the RecBole files


def _read_index(path: Path) -> np.ndarray:
    """The tokens of a ``token<TAB>index`` file, ordered by index (which must be 0..N-1)."""
    table = read_delimited(path, {"token": pa.string(), "index": pa.int64()}, "\t", "token<TAB>index")
    tokens = table.column("token").to_numpy(zero_copy_only=False).astype(str)
    index = table.column("index").to_numpy()
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        raise DataError("indices are not exactly 0..N-1", file=str(path))
    ordered = np.empty_like(tokens)
    ordered[index] = tokens
    return ordered


def _ids(tokens: np.ndarray, size: int, what: str, path: Path) -> np.ndarray:
    """0-based index tokens as rex ids 1..size."""
    tokens = np.asarray(tokens).astype(str)
    if len(tokens) and not np.char.isdigit(tokens).all():
        raise DataError(f"non-numeric {what} tokens", file=str(path))
    ids = tokens.astype(np.int64) + 1
    if len(ids) and (ids.min() < 1 or ids.max() > size):
        raise DataError(f"{what} index outside 0..{size - 1}", file=str(path))
    return ids


def _ragged_ids(token_seqs: np.ndarray, size: int, path: Path) -> RaggedColumn:
    """Space-separated 0-based item indices, one string per row, as rex item ids."""
    strings = np.asarray(token_seqs).astype(str)
    lengths = np.where(np.char.str_len(strings) > 0, np.char.count(strings, " ") + 1, 0).astype(np.int64)
    joined = " ".join(s for s in strings.tolist() if s)
    tokens = np.array(joined.split(" ") if joined else [], dtype=str)
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(tokens) != offsets[-1]:
        raise DataError("item lists are not single-space separated", file=str(path))
    return RaggedColumn(_ids(tokens, size, "item", path), offsets)


def _read_inter(path: Path, num_users: int, num_items: int) -> tuple[np.ndarray, RaggedColumn, np.ndarray]:
    """(user ids, histories, target ids) of a RecBole ``.inter`` file with item_id_list."""
    columns = read_atomic(path)
    require_columns(columns, ["user_id", "item_id_list", "item_id"], path)
    return (
        _ids(columns["user_id"], num_users, "user", path),
        _ragged_ids(columns["item_id_list"], num_items, path),
        _ids(columns["item_id"], num_items, "item", path),
    )


def _sequences(raw: Path, num_users: int, num_items: int) -> tuple[RaggedColumn, int]:
    """Every user's whole sequence (row ``u - 1`` is user ``u``), rebuilt from the given rows,
    and the files' history cap.

    The rows of a user, oldest first, are its training rows in reverse file order, then its
    valid row and its test row: the row at position ``p`` (1-based) has target ``s[p]`` and
    history ``s[:p]`` cut to its last ``cap`` items. ``s[0]`` is the oldest row's history.
    """
    parts = [
        _read_inter(raw.with_name(f"{raw.name}.{s}.inter"), num_users, num_items)
        for s in ("train", "valid", "test")
    ]
    for split, (users, _, _) in zip(("valid", "test"), parts[1:], strict=True):
        if not np.array_equal(np.sort(users), np.arange(1, num_users + 1)):
            raise DataError(f"expected exactly one {split} row per user", file=f"{raw}.{split}.inter")
    users = np.concatenate([p[0] for p in parts])
    targets = np.concatenate([p[2] for p in parts])
    part = np.repeat(np.arange(3), [len(p[0]) for p in parts])
    within = np.concatenate([np.arange(len(p[0])) for p in parts])
    order = np.lexsort((-within, part, users))
    users, targets = users[order], targets[order]
    history = RaggedColumn.concat([p[1] for p in parts]).take(order)

    rows_per_user = np.bincount(users, minlength=num_users + 1)[1:]
    first_row = np.concatenate([[0], np.cumsum(rows_per_user)[:-1]])
    position = np.arange(len(users)) - np.repeat(first_row, rows_per_user) + 1
    lengths = history.lengths()
    if (lengths[first_row] != 1).any():
        raise DataError("a user's oldest row does not have a one-item history", file=f"{raw}.train.inter")
    seq_offsets = np.concatenate([[0], np.cumsum(rows_per_user + 1)]).astype(np.int64)
    values = np.empty(seq_offsets[-1], dtype=np.int64)
    values[seq_offsets[:-1]] = history.values[history.offsets[first_row]]
    at = seq_offsets[users - 1] + position
    values[at] = targets
    seqs = RaggedColumn(values, seq_offsets)

    # Every given row must be the sequence's own (history, target) at its position.
    cap = int(lengths.max())
    expected = RaggedColumn.from_slices(values, at - lengths, lengths)
    if (lengths != np.minimum(position, cap)).any() or not np.array_equal(expected.values, history.values):
        raise DataError(
            "the train/valid/test rows are not the prefixes of one sequence per user",
            file=f"{raw}.train.inter",
        )
    return seqs, cap


def _item_texts(raw: Path) -> list[str]:
    """Item texts in item id order (the ``.text`` file keyed by ASIN, mapped by ``.item2index``)."""
    asins = _read_index(raw.with_name(f"{raw.name}.item2index"))
    path = raw.with_name(f"{raw.name}.text")
    columns = read_atomic(path)
    require_columns(columns, ["item_id", "text"], path)
    keys = columns["item_id"].astype(str)
    sorter = np.argsort(asins)
    at = sorter[np.minimum(np.searchsorted(asins, keys, sorter=sorter), len(asins) - 1)]
    found = asins[at] == keys
    texts = np.full(len(asins), "", dtype=object)
    texts[at[found]] = np.char.strip(columns["text"][found].astype(str))
    has_text = np.zeros(len(asins), dtype=bool)
    has_text[at[found]] = True
    if not has_text.all():
        raise DataError(f"{int((~has_text).sum())} items have no text", file=str(path))
    return [str(t) for t in texts]


def _prefix(raw: Path, folder: str) -> Path:
    """``<raw>/<folder>/Scientific``: the common prefix of the RecBole files."""
    return raw / folder / "Scientific"


@register_texts("scientific", SCIENTIFIC_TEXT)
def scientific_texts(raw: Path) -> list[str]:
    return _item_texts(_prefix(raw, "scientific"))


@register_texts("scientific_mm", SCIENTIFIC_MM)
def scientific_mm_texts(raw: Path) -> list[str]:
    return _item_texts(_prefix(raw, "scientific_mm"))


# --------------------------------------------------------------------------------------------
# shared pieces


def _read_common(raw: Path, folder: str) -> tuple[Path, int, int, RaggedColumn, dict[str, int]]:
    """(file prefix, users, items, sequences, counts) of one of the two RecBole layouts."""
    prefix = _prefix(raw, folder)
    n_users = len(_read_index(prefix.with_name(f"{prefix.name}.user2index")))
    n_items = len(_read_index(prefix.with_name(f"{prefix.name}.item2index")))
    seqs, cap = _sequences(prefix, n_users, n_items)
    log(f"{folder}: {len(seqs.values)} interactions, {n_users} users, {n_items} items")
    history = seqs.lengths() - 1  # the test row's history, before the files' cap
    counts = {
        "users": n_users,
        "items": int(np.unique(seqs.values).size),
        "interactions": len(seqs.values),
        "test_file_interactions": int((np.minimum(history, cap) + 1).sum()),
        "users_longer_than_history_cap": int((history > cap).sum()),
    }
    return prefix, n_users, n_items, seqs, counts


def _built(
    tables: dict[str, pa.Table],
    num_users: int,
    num_items: int,
    vectors: dict[str, tuple[str, np.ndarray]],
    views: dict[str, ViewSpec],
    counts: dict[str, int],
) -> Built:
    """A builder's result: ``tables`` plus an ``items`` table of ``vectors`` (name -> role and an
    ``items x dim`` array, row ``i`` = item id ``i + 1``), and the ``sequence`` and ``items`` views
    plus ``views``."""
    tables["items"] = pa.table(
        {
            "item": pa.array(np.arange(1, num_items, dtype=np.int64)),
            **{name: vector_column(array) for name, (_, array) in vectors.items()},
        }
    )
    items = ViewSpec(
        tables={"all": "items"},
        fields={
            "item": FieldSpec(role="item", kind="categorical", vocab_size=num_items),
            **{
                name: FieldSpec(role=role, kind="vector", dim=array.shape[1])
                for name, (role, array) in vectors.items()
            },
        },
    )
    return Built(
        tables=tables,
        protocol="leave_one_out",
        num_users=num_users,
        num_items=num_items,
        views={"sequence": sequence_view(num_users, num_items), **views, "items": items},
        counts=counts,
    )


# --------------------------------------------------------------------------------------------
# builders


@register_dataset("scientific", SCIENTIFIC_TEXT, ScientificParams)
def build_scientific(raw: Path, params: ScientificParams) -> Built:
    _, n_users, n_items, seqs, counts = _read_common(raw, "scientific")
    num_users, num_items = n_users + 1, n_items + 1
    tables = leave_one_out(np.arange(1, num_users), seqs)
    text = minilm_features("scientific", scientific_texts(raw), features_root(raw), params.text_batch_size)
    return _built(tables, num_users, num_items, {"text_minilm": ("modality:text", text)}, {}, counts)


def _read_features(path: Path, rows: int) -> np.ndarray:
    """A raw float32 ``rows x 512`` array file."""
    try:
        array = np.fromfile(path, dtype=np.float32)
    except OSError as exc:
        raise DataError(f"cannot read: {exc}", file=str(path)) from exc
    if array.size != rows * MM_DIM:
        raise DataError(
            f"expected {rows} x {MM_DIM} float32 values ({rows * MM_DIM}), found {array.size}", file=str(path)
        )
    if not np.isfinite(array).all():
        raise DataError("non-finite feature values", file=str(path))
    return array.reshape(rows, MM_DIM)


@register_dataset("scientific_mm", SCIENTIFIC_MM, ScientificMmParams)
def build_scientific_mm(raw: Path, params: ScientificMmParams) -> Built:
    prefix, n_users, n_items, seqs, counts = _read_common(raw, "scientific_mm")
    num_users, num_items = n_users + 1, n_items + 1
    users = np.arange(1, num_users)
    tables = leave_one_out(users, seqs)
    ctr, ctr_counts = din_ctr(seqs, users, params, (1, num_items))
    tables.update(ctr)
    texts = scientific_mm_texts(raw)
    vectors = {
        "text": ("modality:text", _read_features(prefix.with_name(f"{prefix.name}.feat1CLS"), n_items)),
        "image": ("modality:image", _read_features(prefix.with_name(f"{prefix.name}.feat3CLS"), n_items)),
        "text_minilm": (
            "modality:text_minilm",
            minilm_features("scientific_mm", texts, features_root(raw), params.text_batch_size),
        ),
    }
    ctr_spec = ctr_view(num_users, num_items, {}, protocol="leave_one_out")
    return _built(tables, num_users, num_items, vectors, {"ctr": ctr_spec}, {**counts, **ctr_counts})
