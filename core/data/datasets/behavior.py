"""Multi-behaviour datasets: Taobao (view, cart, buy; MBCGCN's copy, ``taobao_mb``) and Tmall
(collect, cart, buy; MuLE's copy, ``tmall_mb``). The target behaviour is buy.

**Order.** Neither source has timestamps. A user's items of one behaviour keep the order of the
source file (a stable sort by user). Taobao's file is sorted by user, then item id, so there the
order is item-id order and carries no time; Tmall's ``buy.txt`` keeps its source's order, which
is not documented. Behaviours are ordered as a funnel, view -> cart -> buy (Taobao) and
collect -> cart -> buy (Tmall): the order of the ``history_*`` and ``label_*`` fields. The data
does not nest them (a bought pair need not be carted or viewed): the ``*_in_*`` counts say how
often it does.

**Splits of buy.** Taobao: the given test (one buy per user); validation is one training buy per
user with at least two, drawn with ``valid_seed``, and removed from training. Tmall: the given
valid and test files; every valid row is also in ``train.txt`` (= ``buy.txt``), so it is removed
from training. The auxiliary behaviours are inputs, not targets: every row of them is used (for
Taobao, their own train and test parts alike, as MuLE does).

**Views.**

* ``sequence`` (protocol ``given_split``): ``seq_train`` (``user``, ``items`` = the user's
  training buys); ``seq_valid`` / ``seq_test`` one row per held-out buy (``history`` = the user's
  training buys, for test also the validation buys; ``target`` = the buy). Every table has one
  ``history_<behaviour>`` list column per auxiliary behaviour (all the user's items of it).
* ``ctr``: one row per bought (user, item) pair, followed by ``neg_ratio`` sampled items the
  user never touched with any behaviour, which share its user and history. ``label`` is
  ``label_buy``; ``label_<behaviour>`` say whether the row's pair also has that behaviour (in any
  part of the data). Test buys go to ``ctr_test``, validation buys to ``ctr_valid``, training
  buys to ``ctr_train``, so every split asks the same question: a buy against a never-touched
  item. (Pairs with only a shallow behaviour are not rows: as negatives they would teach that
  an interacted item is unlikely, the opposite of what test asks; models see them through the
  ``users`` view's lists.) ``history`` is the user's training buys (test
  rows: also the validation buys) without the row's own item, the last ``ctr_max_history``.
* ``users``: one row per user id (row ``u`` is user ``u``; row 0, padding, is empty) with the
  ``history_<behaviour>`` lists of the ``sequence`` view. A ``ctr`` recipe joins them to its
  rows by user id (``data.user_columns``), so 1.85M Taobao rows do not each carry a copy.
* ``retrieval`` (``task: multi_objective``): every behaviour is an objective with its own
  held-out items; objective ``k`` is the ``k``-th behaviour of the funnel. Test, Taobao: the
  given test item of each behaviour (one per user). Test, Tmall: the given test buys (one or
  more per user); collect and cart have no given test part, so one item of each per user with at
  least two is drawn with ``objective_test_seed``. Validation: one item of each behaviour per
  user with at least two left after test (buys: the ``sequence`` view's validation buys, for
  Tmall the given ones, several per user; the others drawn with ``objective_valid_seed``),
  removed from training. ``ret_train`` has one row per remaining (user, item, objective);
  ``ret_users`` row ``u`` holds user ``u``'s training items of each behaviour
  (``history_<behaviour>``), which a training row joins by user id; ``ret_valid`` / ``ret_test``
  hold those lists (test: also the validation items) and ``target_<behaviour>`` (0: none held
  out), one row per user and ``k`` with the user's ``k``-th held-out item of each behaviour (so
  one row per user where no user has two; each of a Tmall user's held-out buys is a row, as in
  the ``sequence`` view). No held-out pair is in any list of its split; a held-out item may be
  in another behaviour's list (a bought item was often viewed), as it may at serving time.
  ``retrieval_<behaviour>`` is the same view training on that behaviour's rows only
  (``ret_train_<behaviour>``), for one stage of a cascade. The ``history_*`` lists of the
  ``users`` view above hold every row, test parts included, so they must not feed this task.

**Tmall's cascade.** Collect and cart are parallel steps between a click and a buy (neither
leads to the other: 145 of the 1,996 carted pairs were collected), which is what "collect or cart,
then buy" says. A cascade still needs one order, and the simplest faithful one keeps every
behaviour an objective in the funnel order above, collect -> cart -> buy: collect first, as the
first stage alone trains the item side (``recipes/csmf.yaml``) and collect has 221,514 rows to
cart's 1,996. Dropping collect to an input (cart -> buy) would leave the view's collect objective
untrained, and the baselines train all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from rex.config.errors import DataError
from rex.data.build import (
    Built,
    SequenceCtrParams,
    ctr_table,
    ctr_view,
    read_delimited,
    register_dataset,
    remap,
    sample_negatives,
    sequence_view,
)
from rex.data.lance_io import RaggedColumn
from rex.data.mirror import RawSource, log, members
from rex.data.schema import FieldSpec, ViewSpec

TARGET = "buy"

# A single xz-compressed TSV that MBCGCN's files were merged into (Data/{buy,cart}/{train,test}.txt,
# Data/view/test.txt and the view training edges of Data/view/s_adj_mat.npz at commit 931f9c10 of
# github.com/SS-00-SS/MBCGCN). It is derived, not a byte copy, so it has no members to download.
TAOBAO_MBCGCN = RawSource(
    archive="taobao_multibehavior_mbcgcn.tsv.xz",
    sha256="523e70897ae8d56dbb4333b12affa400f151560c0df8ee38cb58c5807b95e73d",
)

_MULE = "https://github.com/geonwooko/MULE/raw/52bccb53/data/tmall"

TMALL_MULE = RawSource(
    archive="tmall_multibehavior_noview_mule.tar.xz",
    sha256="4fc85f264c10b98cfcd5fecfd0cb9775245975a88a547fcd09f434ba766ff8c3",
    members=members(
        "tmall",
        _MULE,
        {
            "buy.txt": "0c99dcc43a0bcd7470fc30c090faf186318afc1258ba97386dfd7fe162233093",
            "train.txt": "0c99dcc43a0bcd7470fc30c090faf186318afc1258ba97386dfd7fe162233093",
            "valid.txt": "eb78c9e3cf42194cc4903add5947f801e72c3f5c32a7db1d179ea7ef88f252f3",
            "test.txt": "40e02fb0ce7bcc086345f1a1b5c724c29588c5baeaa7f4d740068a8fa02b2878",
            "collect.txt": "f6c82f4581aa6784f239d445d3d630307251a4d8747d4cef803328bb3cf8409d",
            "cart.txt": "a96dd9c68755841762b96aa50a3c3fc6855fb10285a28b0e99971fdbe9c2efbf",
        },
    ),
)

ORDER = (
    "no timestamps: a user's items of one behaviour keep the source file's order; behaviours in "
    "funnel order {funnel}"
)


class TaobaoMbParams(SequenceCtrParams):
    """Params of ``taobao_mb`` (section ``taobao_mb:`` of params.yaml)."""

    valid_seed: int = 2024  # which training buy of each user is held out for validation
    # which training view and cart of each user are held out for the retrieval view's validation
    objective_valid_seed: int = 2024


class TmallMbParams(SequenceCtrParams):
    """Params of ``tmall_mb`` (section ``tmall_mb:`` of params.yaml)."""

    # which collect and cart of each user are held out for the retrieval view's test, then
    # validation (buys have given valid/test files); two seeds, so the draws are not correlated
    objective_test_seed: int = 2025
    objective_valid_seed: int = 2024


@dataclass(frozen=True)
class Pairs:
    """(user, item) rows with rex ids, in the defined order."""

    users: np.ndarray
    items: np.ndarray

    def __getitem__(self, rows: np.ndarray) -> Pairs:
        return Pairs(self.users[rows], self.items[rows])

    def keys(self, width: int) -> np.ndarray:
        return self.users * np.int64(width) + self.items


@dataclass(frozen=True)
class MultiBehavior:
    """A multi-behaviour dataset read from its files.

    ``behaviors`` maps every behaviour, in funnel order with buy last, to all its rows;
    ``buys`` are the given training buys, ``held_out`` the mask of those kept for validation,
    and ``test`` the test buys. ``tested`` marks each behaviour's rows held out for the
    ``retrieval`` view's test (None: no such view).
    """

    name: str
    behaviors: dict[str, Pairs]
    buys: Pairs
    held_out: np.ndarray
    test: Pairs
    num_users: int
    num_items: int
    tested: dict[str, np.ndarray] | None = None


# --------------------------------------------------------------------------------------------
# shared building


def _by_user(pairs: Pairs, num_users: int) -> RaggedColumn:
    """Each user's items (row ``u`` is user ``u``; row 0 is empty), in the rows' order."""
    order = np.argsort(pairs.users, kind="stable")
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs.users, minlength=num_users), out=offsets[1:])
    return RaggedColumn(pairs.items[order], offsets)


def _without_item(seqs: RaggedColumn, rows: np.ndarray, items: np.ndarray, max_len: int) -> RaggedColumn:
    """Row ``r``: the last ``max_len`` items of ``seqs`` row ``rows[r]`` other than ``items[r]``.

    Only the last ``max_len + 1`` items can be kept once one item is taken out, so no more are read.
    """
    lengths = seqs.lengths()[rows]
    window = np.minimum(lengths, max_len + 1)
    tail = RaggedColumn.from_slices(seqs.values, seqs.offsets[rows + 1] - window, window)
    row_of = np.repeat(np.arange(len(rows), dtype=np.int64), window)
    keep = tail.values != items[row_of]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of[keep], minlength=len(rows)), out=offsets[1:])
    kept = np.minimum(np.diff(offsets), max_len)
    return RaggedColumn.from_slices(tail.values[keep], offsets[1:] - kept, kept)


def hold_out_one_per_user(users: np.ndarray, seed: int) -> np.ndarray:
    """A mask over rows owned by ``users``: one row of each user with at least two, drawn with ``seed``."""
    order = np.argsort(users, kind="stable")
    _, starts, counts = np.unique(users[order], return_index=True, return_counts=True)
    eligible = counts >= 2
    pick = np.random.default_rng(seed).integers(0, counts[eligible])
    held_out = np.zeros(len(users), dtype=bool)
    held_out[order[starts[eligible] + pick]] = True
    return held_out


def _containment(behaviors: dict[str, Pairs], width: int) -> dict[str, int]:
    """For each behaviour: its distinct pairs, and how many of them each earlier one also has."""
    keys = {name: np.unique(pairs.keys(width)) for name, pairs in behaviors.items()}
    counts: dict[str, int] = {}
    names = list(keys)
    for at, name in enumerate(names):
        counts[f"{name}_pairs"] = len(keys[name])
        for earlier in names[:at]:
            counts[f"{name}_in_{earlier}"] = int(np.isin(keys[name], keys[earlier]).sum())
    return counts


def _ctr_tables(
    data: MultiBehavior, valid: Pairs, history_of: RaggedColumn, params: SequenceCtrParams
) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """The ``ctr_*`` tables: every bought pair, its labels, and sampled never-touched negatives.

    ``history_of`` row ``u`` holds user ``u``'s training buys, row ``num_users + u`` those and
    the validation buys (what test rows may see).
    """
    num_users, num_items = data.num_users, data.num_items
    anchors = np.unique(data.behaviors[TARGET].keys(num_items))
    users, items = anchors // num_items, anchors % num_items
    is_test, is_valid = np.isin(anchors, data.test.keys(num_items)), np.isin(anchors, valid.keys(num_items))
    split = np.where(is_test, 2, np.where(is_valid, 1, 0))
    touched_keys = np.unique(np.concatenate([pairs.keys(num_items) for pairs in data.behaviors.values()]))
    touched = _by_user(Pairs(touched_keys // num_items, touched_keys % num_items), num_users)
    rng = np.random.default_rng(params.neg_seed)
    negatives = sample_negatives(touched, users, params.neg_ratio, 1, num_items, rng)

    # Each pair's row is followed by its negatives, which share its user and history.
    group = 1 + params.neg_ratio
    history = _without_item(
        history_of, np.where(is_test, users + num_users, users), items, params.ctr_max_history
    )
    zeros = np.zeros((len(anchors), params.neg_ratio), dtype=np.float32)
    columns = {
        "user": np.repeat(users, group),
        "item": np.concatenate([items[:, None], negatives], axis=1).ravel(),
        **{
            f"label_{name}": np.concatenate([np.isin(anchors, pairs.keys(num_items))[:, None], zeros], axis=1)
            .astype(np.float32)
            .ravel()
            for name, pairs in data.behaviors.items()
        },
    }
    columns["label"] = columns[f"label_{TARGET}"]
    history = history.take(np.repeat(np.arange(len(anchors)), group))
    row_split = np.repeat(split, group)
    tables = {
        name: ctr_table(columns, history, np.flatnonzero(row_split == code))
        for code, name in enumerate(("ctr_train", "ctr_valid", "ctr_test"))
    }
    return tables, {"ctr_positives": len(anchors), "ctr_negatives": int(negatives.size)}


def _rank_in_user(users: np.ndarray) -> np.ndarray:
    """Each row's 0-based position among its user's rows, in the rows' order."""
    order = np.argsort(users, kind="stable")
    ordered = users[order]
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users)) - np.searchsorted(ordered, ordered)
    return rank


def _retrieval(
    data: MultiBehavior, valid_seed: int
) -> tuple[dict[str, pa.Table], dict[str, ViewSpec], dict[str, int]]:
    """The ``retrieval`` views' tables, views and counts (see the module docstring)."""
    assert data.tested is not None
    num_users, num_items = data.num_users, data.num_items
    names = list(data.behaviors)
    parts: dict[str, tuple[Pairs, Pairs, Pairs]] = {}  # behaviour -> (train, valid, test)
    for name, pairs in data.behaviors.items():
        given = pairs[~data.tested[name]]
        held = data.held_out if name == TARGET else hold_out_one_per_user(given.users, valid_seed)
        parts[name] = (given[~held], given[held], pairs[data.tested[name]])
    lists = {name: _by_user(train, num_users) for name, (train, _, _) in parts.items()}
    # What test rows may see: the training and the validation items.
    seen = {
        name: _by_user(
            Pairs(np.concatenate([t.users, v.users]), np.concatenate([t.items, v.items])), num_users
        )
        for name, (t, v, _) in parts.items()
    }
    users = np.arange(num_users, dtype=np.int64)

    def held_out_table(split: int, histories: dict[str, RaggedColumn]) -> pa.Table:
        held = {name: part[split] for name, part in parts.items()}
        for name, pairs in held.items():
            listed = Pairs(*_pairs_of(histories[name])).keys(num_items)
            if np.isin(pairs.keys(num_items), listed).any():
                raise DataError(
                    f"{data.name}: a held-out {name} pair is also a known {name} pair of its split "
                    "(a repeated row?); its retrieval view would leak it"
                )
        # A row per (user, k): the user's k-th held-out item of each behaviour.
        width = 1 + max(len(pairs.users) for pairs in held.values())
        keys = {name: pairs.users * width + _rank_in_user(pairs.users) for name, pairs in held.items()}
        rows = np.unique(np.concatenate(list(keys.values())))
        users = rows // width
        targets = {name: np.zeros(len(rows), dtype=np.int64) for name in names}
        for name, pairs in held.items():
            targets[name][np.searchsorted(rows, keys[name])] = pairs.items
        return pa.table(
            {
                "user": pa.array(users),
                **{f"history_{n}": histories[n].take(users).to_arrow() for n in names},
                **{f"target_{n}": pa.array(targets[n]) for n in names},
            }
        )

    def train_table(chosen: list[str]) -> pa.Table:
        trains = [parts[n][0] for n in chosen]
        objective = [
            np.full(len(t.users), names.index(n) + 1, dtype=np.int64)
            for n, t in zip(chosen, trains, strict=True)
        ]
        return pa.table(
            {
                "user": pa.array(np.concatenate([t.users for t in trains])),
                "item": pa.array(np.concatenate([t.items for t in trains])),
                "objective": pa.array(np.concatenate(objective)),
            }
        )

    tables = {
        "ret_train": train_table(names),
        **{f"ret_train_{n}": train_table([n]) for n in names},
        "ret_users": pa.table(
            {"user": pa.array(users), **{f"history_{n}": lists[n].to_arrow() for n in names}}
        ),
        "ret_valid": held_out_table(1, lists),
        "ret_test": held_out_table(2, seen),
    }
    item = {"vocab_size": num_items, "vocab_of": "item"}
    fields = {
        "user": FieldSpec(role="user", kind="categorical", vocab_size=num_users),
        "item": FieldSpec(role="item", kind="categorical", vocab_size=num_items),
        "objective": FieldSpec(role="objective", kind="categorical", vocab_size=len(names) + 1),
        **{f"history_{n}": FieldSpec(role=f"history:{n}", kind="sequence", **item) for n in names},
        **{f"target_{n}": FieldSpec(role=f"target:{n}", kind="categorical", **item) for n in names},
    }
    order = ORDER.format(funnel=" -> ".join(names))

    def view(train: str) -> ViewSpec:
        splits = {"train": train, "valid": "ret_valid", "test": "ret_test", "users": "ret_users"}
        return ViewSpec(tables=splits, fields=fields, protocol="given_split", order=order)

    views = {"retrieval": view("ret_train"), **{f"retrieval_{n}": view(f"ret_train_{n}") for n in names}}
    counts: dict[str, int] = {}
    for name, (train, valid, test) in parts.items():
        counts.update({f"ret_{name}_train": len(train.users), f"ret_{name}_valid": len(valid.users)})
        # How many test items each other behaviour's lists already hold (legitimate inputs, e.g.
        # a bought item that was viewed), so a reader sees what the user tower can draw on.
        for other in names:
            if other != name:
                keys = Pairs(*_pairs_of(seen[other])).keys(num_items)
                counts[f"ret_test_{name}_in_{other}"] = int(np.isin(test.keys(num_items), keys).sum())
    return tables, views, counts


def _pairs_of(lists: RaggedColumn) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) of the per-user lists (row ``u`` = user ``u``)."""
    return np.repeat(np.arange(len(lists), dtype=np.int64), lists.lengths()), lists.values


def _views(data: MultiBehavior, aux: list[str]) -> dict[str, ViewSpec]:
    """The ``sequence`` view with a ``history_<behaviour>`` field per auxiliary behaviour, the
    ``ctr`` view with a ``label_<behaviour>`` field per behaviour, and the ``users`` view."""
    num_users, num_items = data.num_users, data.num_items
    order = ORDER.format(funnel=" -> ".join(data.behaviors))
    sequence = sequence_view(num_users, num_items)
    behavior_lists = {
        f"history_{name}": FieldSpec(role="behavior", kind="sequence", vocab_size=num_items, vocab_of="item")
        for name in aux
    }
    ctr = ctr_view(num_users, num_items, {}, protocol="given_split")
    labels = {f"label_{name}": FieldSpec(role=f"label:{name}", kind="label") for name in data.behaviors}
    users = ViewSpec(
        tables={"all": "users"},
        fields={"user": FieldSpec(role="user", kind="categorical", vocab_size=num_users), **behavior_lists},
    )
    return {
        "users": users,
        "sequence": sequence.model_copy(
            update={
                "protocol": "given_split",
                "order": order,
                "fields": {**sequence.fields, **behavior_lists},
            }
        ),
        "ctr": ctr.model_copy(update={"order": order, "fields": {**ctr.fields, **labels}}),
    }


def _build(data: MultiBehavior, params: SequenceCtrParams, objective_valid_seed: int) -> Built:
    num_users, num_items = data.num_users, data.num_items
    aux = [name for name in data.behaviors if name != TARGET]
    train, valid = data.buys[~data.held_out], data.buys[data.held_out]
    train_seqs = _by_user(train, num_users)
    full_seqs = _by_user(data.buys, num_users)  # training and validation buys
    aux_seqs = {name: _by_user(data.behaviors[name], num_users) for name in aux}

    def table(users: np.ndarray, columns: dict[str, pa.Array]) -> pa.Table:
        extra = {f"history_{name}": aux_seqs[name].take(users).to_arrow() for name in aux}
        return pa.table({"user": pa.array(users), **columns, **extra})

    def held_out_table(pairs: Pairs, history: RaggedColumn) -> pa.Table:
        rows = np.argsort(pairs.users, kind="stable")
        users = pairs.users[rows]
        return table(
            users, {"history": history.take(users).to_arrow(), "target": pa.array(pairs.items[rows])}
        )

    train_users = np.flatnonzero(train_seqs.lengths() > 0)
    tables = {
        "seq_train": table(train_users, {"items": train_seqs.take(train_users).to_arrow()}),
        "seq_valid": held_out_table(valid, train_seqs),
        "seq_test": held_out_table(data.test, full_seqs),
    }
    tables["users"] = pa.table(
        {
            "user": pa.array(np.arange(num_users, dtype=np.int64)),
            **{f"history_{name}": aux_seqs[name].to_arrow() for name in aux},
        }
    )
    ctr, ctr_counts = _ctr_tables(data, valid, RaggedColumn.concat([train_seqs, full_seqs]), params)
    tables.update(ctr)
    counts = {
        "users": num_users - 1,
        "items": num_items - 1,
        **{f"{name}_rows": len(pairs.users) for name, pairs in data.behaviors.items()},
        "train_buys": len(train.users),
        "valid_buys": len(valid.users),
        "test_buys": len(data.test.users),
        **_containment(data.behaviors, num_items),
        **ctr_counts,
    }
    views = _views(data, aux)
    if data.tested is not None:
        ret_tables, ret_views, ret_counts = _retrieval(data, objective_valid_seed)
        tables.update(ret_tables)
        views.update(ret_views)
        counts.update(ret_counts)
    log(f"{data.name}: {', '.join(f'{k}={v}' for k, v in counts.items())}")
    return Built(
        tables=tables,
        protocol="given_split",
        num_users=num_users,
        num_items=num_items,
        views=views,
        counts=counts,
    )


def _ids(tokens: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Raw id tokens of several files as one id space 1..N; returns (ids per file, N + 1)."""
    ids, keys = remap(np.concatenate(tokens))
    bounds = np.cumsum([len(t) for t in tokens])[:-1]
    return np.split(ids, bounds), len(keys) + 1


def _pairs(users: list[np.ndarray], items: list[np.ndarray]) -> tuple[list[Pairs], int, int]:
    """Rows of several files as :class:`Pairs` in shared id spaces; returns (pairs, num_users, num_items)."""
    user_ids, num_users = _ids(users)
    item_ids, num_items = _ids(items)
    return [Pairs(u, i) for u, i in zip(user_ids, item_ids, strict=True)], num_users, num_items


# --------------------------------------------------------------------------------------------
# taobao


@register_dataset("taobao_mb", TAOBAO_MBCGCN, TaobaoMbParams)
def build_taobao_mb(raw: Path, params: TaobaoMbParams) -> Built:
    path = raw / "taobao_multibehavior_mbcgcn.tsv"
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={"user_id": pa.string(), "item_id": pa.string()},
                include_columns=["user_id", "item_id", "behavior", "split"],
            ),
        )
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise DataError(
            f"expected a TSV with user_id, item_id, behavior, split: {exc}", file=str(path)
        ) from exc
    column = {
        name: table.column(name).to_numpy(zero_copy_only=False).astype(str) for name in table.column_names
    }
    behavior, part = column["behavior"], column["split"]
    funnel = ("view", "cart", TARGET)
    unknown = sorted(set(np.unique(behavior)) - set(funnel)) + sorted(
        set(np.unique(part)) - {"train", "test"}
    )
    if unknown:
        raise DataError(f"unexpected behaviour/split values: {', '.join(unknown)}", file=str(path))
    rows = {name: np.flatnonzero(behavior == name) for name in funnel}
    (all_pairs,), num_users, num_items = _pairs([column["user_id"]], [column["item_id"]])
    behaviors = {name: all_pairs[at] for name, at in rows.items()}
    buy_part = part[rows[TARGET]]
    buys, test = behaviors[TARGET][buy_part == "train"], behaviors[TARGET][buy_part == "test"]

    held_out = hold_out_one_per_user(buys.users, params.valid_seed)
    tested = {name: part[at] == "test" for name, at in rows.items()}
    data = MultiBehavior("taobao_mb", behaviors, buys, held_out, test, num_users, num_items, tested)
    return _build(data, params, params.objective_valid_seed)


# --------------------------------------------------------------------------------------------
# tmall


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A ``user item`` file (single spaces, no header) as two token arrays."""
    table = read_delimited(path, {"user": pa.string(), "item": pa.string()}, " ", "'user item'")
    users, items = (table.column(c).to_numpy(zero_copy_only=False).astype(str) for c in ("user", "item"))
    return users, items


@register_dataset("tmall_mb", TMALL_MULE, TmallMbParams)
def build_tmall_mb(raw: Path, params: TmallMbParams) -> Built:
    names = ("collect", "cart", "train", "valid", "test")
    files = [_read_pairs(raw / "tmall" / f"{name}.txt") for name in names]
    pairs, num_users, num_items = _pairs([f[0] for f in files], [f[1] for f in files])
    read = dict(zip(names, pairs, strict=True))
    buys, valid, test = read["train"], read["valid"], read["test"]
    held_out = np.isin(buys.keys(num_items), valid.keys(num_items))
    if held_out.sum() != len(np.unique(valid.keys(num_items))):
        raise DataError("valid.txt rows are not all in train.txt", file=str(raw / "tmall" / "valid.txt"))
    behaviors = {
        "collect": read["collect"],
        "cart": read["cart"],
        TARGET: Pairs(np.concatenate([buys.users, test.users]), np.concatenate([buys.items, test.items])),
    }
    # Only buy has a given test part; collect and cart hold out a seeded item per user instead.
    tested = {
        name: hold_out_one_per_user(behaviors[name].users, params.objective_test_seed)
        for name in ("collect", "cart")
    }
    tested[TARGET] = np.arange(len(behaviors[TARGET].users)) >= len(buys.users)
    data = MultiBehavior("tmall_mb", behaviors, buys, held_out, test, num_users, num_items, tested)
    return _build(data, params, params.objective_valid_seed)
