"""Amazon review datasets (5-core sequences, McAuley's Amazon 2014 reviews).

* ``beauty`` and ``sports``: the S3-Rec versions (integer ids, item attributes as ids).
* ``amazon_multidomain``: the same Beauty and Sports sequences keyed by raw reviewer IDs and
  ASINs (GRAM's copy), joined on the reviewer ID, so a user may have a sequence in each domain.

Every one has a DIN-style ``ctr`` view: each position of a sequence but the first is a positive
whose history is the items before it, followed by sampled negatives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from rex.config.errors import DataError
from rex.data.build import (
    MIN_SEQUENCE,
    Built,
    SequenceCtrParams,
    ctr_view,
    din_ctr,
    leave_one_out,
    register_dataset,
    remap,
    sequence_view,
)
from rex.data.lance_io import RaggedColumn
from rex.data.mirror import AMAZON_S3REC_SEQ, Member, RawSource, log
from rex.data.schema import FieldSpec, ViewSpec

_GRAM = "https://github.com/zhaodong-liu/GRAM/raw/2c168a4c/rec_datasets"

AMAZON_ASIN_SEQ_GRAM = RawSource(
    archive="amazon_asin_seq_gram.tar.xz",
    sha256="18fa680345735901bbc8eddd2ff26c291860e3e32b8d34c01d9d615b0ddfc42f",
    members=[
        Member(
            "gram/Beauty_user_sequence.txt",
            f"{_GRAM}/Beauty/user_sequence.txt",
            "47197cbee7bdc1896926e10d96b807dce0aecb9a1f0c2ccc887c21090237c9b7",
        ),
        Member(
            "gram/Sports_user_sequence.txt",
            f"{_GRAM}/Sports/user_sequence.txt",
            "240fd0484501ca53769c016cb1bc674ac7e420aef562b88cea1439b94a3ba044",
        ),
    ],
)

# The domains of amazon_multidomain: (code of the ``domain`` field, file stem in the archive).
DOMAINS = {"beauty": (1, "Beauty"), "sports": (2, "Sports")}


class BeautyParams(SequenceCtrParams):
    """Params of ``beauty`` (section ``beauty:`` of params.yaml)."""


class SportsParams(SequenceCtrParams):
    """Params of ``sports`` (section ``sports:`` of params.yaml)."""


class AmazonMultiDomainParams(SequenceCtrParams):
    """Params of ``amazon_multidomain`` (section ``amazon_multidomain:`` of params.yaml)."""


# --------------------------------------------------------------------------------------------
# reading


def _read_token_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``head token token ...`` lines (single spaces) into (heads, flat tokens, offsets)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read: {exc}", file=str(path)) from exc
    lines = [line for line in lines if line.strip()]
    lengths = np.fromiter((line.count(" ") for line in lines), dtype=np.int64, count=len(lines))
    words = np.array(" ".join(lines).split(" "))
    if (words == "").any():
        raise DataError("expected tokens separated by single spaces", file=str(path))
    if (lengths < 1).any():
        line = int(np.flatnonzero(lengths < 1)[0]) + 1
        raise DataError(f"line {line}: a user with no items", file=str(path))
    heads = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    is_token = np.ones(len(words), dtype=bool)
    is_token[heads] = False
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return words[heads], words[is_token], offsets


def _read_sequences(path: Path) -> tuple[np.ndarray, RaggedColumn]:
    """Read ``user item item ...`` lines into (users, sequences), checking every token is an id."""
    heads, tokens, offsets = _read_token_lines(path)
    try:
        users, items = heads.astype(np.int64), tokens.astype(np.int64)
    except ValueError as exc:
        raise DataError(
            f"expected lines of integer ids separated by single spaces: {exc}", file=str(path)
        ) from exc
    return users, RaggedColumn(items, offsets)


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


def _check_one_line_per_user(users: np.ndarray, path: Path) -> None:
    repeated = len(users) - len(np.unique(users))
    if repeated:
        raise DataError(f"{repeated} users appear on more than one line", file=str(path))


# --------------------------------------------------------------------------------------------
# beauty, sports (S3-Rec)


def _build_s3rec(name: str, stem: str, raw: Path, params: SequenceCtrParams) -> Built:
    """An S3-Rec dataset: ``<stem>.txt`` sequences and ``<stem>_item2attributes.json``."""
    seq_path = raw / "s3rec" / f"{stem}.txt"
    attr_path = raw / "s3rec" / f"{stem}_item2attributes.json"
    users, seqs = _read_sequences(seq_path)
    n_users = _check_contiguous(users, "user", seq_path)
    _check_one_line_per_user(users, seq_path)
    n_items = _check_contiguous(seqs.values, "item", seq_path)
    # Row r holds user r + 1, so a user id indexes its row directly.
    seqs = seqs.take(np.argsort(users, kind="stable"))
    num_users, num_items = n_users + 1, n_items + 1
    log(f"{name}: {len(seqs.values)} interactions, {n_users} users, {n_items} items")

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

    ctr_tables, ctr_counts = din_ctr(kept, keep + 1, params, candidates=(1, num_items))
    tables.update(ctr_tables)
    counts = {
        "raw_users": n_users,
        "raw_items": n_items,
        "raw_interactions": int(lengths.sum()),
        "users": len(keep),
        "items": int(np.unique(kept.values).size),
        "interactions": int(kept.lengths().sum()),
        "dropped_users_short": int(n_users - len(keep)),
        "num_attributes": num_attributes,
        **ctr_counts,
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


@register_dataset("beauty", AMAZON_S3REC_SEQ, BeautyParams)
def build_beauty(raw: Path, params: BeautyParams) -> Built:
    return _build_s3rec("beauty", "Beauty", raw, params)


@register_dataset("sports", AMAZON_S3REC_SEQ, SportsParams)
def build_sports(raw: Path, params: SportsParams) -> Built:
    return _build_s3rec("sports", "Sports_and_Outdoors", raw, params)


# --------------------------------------------------------------------------------------------
# amazon_multidomain (GRAM's raw-id copy of Beauty + Sports)


@register_dataset("amazon_multidomain", AMAZON_ASIN_SEQ_GRAM, AmazonMultiDomainParams)
def build_amazon_multidomain(raw: Path, params: AmazonMultiDomainParams) -> Built:
    """One sequence per (user, domain), users joined across domains on the reviewer ID.

    Items are keyed by (domain, ASIN), so the domains' item ids are disjoint ranges (Beauty's
    first). Leave-one-out and the ctr history stay inside one domain's sequence; negatives are
    drawn from the same domain's items. ``domain`` (1 beauty, 2 sports) has the role scenario.
    """
    reviewers, tokens, lengths, domain, asins = [], [], [], [], []
    counts: dict[str, int] = {}
    for label, (code, stem) in DOMAINS.items():
        path = raw / "gram" / f"{stem}_user_sequence.txt"
        heads, items, offsets = _read_token_lines(path)
        _check_one_line_per_user(heads, path)
        reviewers.append(heads)
        tokens.append(np.char.add(f"{code}:", items))
        lengths.append(np.diff(offsets))
        domain.append(np.full(len(heads), code, dtype=np.int64))
        asins.append(np.unique(items))
        counts[f"raw_{label}_users"] = len(heads)
        counts[f"raw_{label}_items"] = len(asins[-1])
        counts[f"raw_{label}_interactions"] = len(items)
    user_ids, user_keys = remap(np.concatenate(reviewers))
    item_ids, item_keys = remap(np.concatenate(tokens))
    seq_domain = np.concatenate(domain)
    per_seq = np.concatenate(lengths)
    seqs = RaggedColumn(item_ids, np.concatenate([[0], np.cumsum(per_seq)]).astype(np.int64))
    num_users, num_items = len(user_keys) + 1, len(item_keys) + 1
    log(f"amazon_multidomain: {len(item_ids)} interactions, {num_users - 1} users, {num_items - 1} items")

    # Item keys are "<domain code>:<ASIN>" and sort by the (one-digit) code first, so each
    # domain's items are one contiguous id range low..high - 1.
    item_domain = np.zeros(num_items, dtype=np.int64)
    item_domain[item_ids] = np.repeat(seq_domain, per_seq)
    codes = np.array([code for code, _ in DOMAINS.values()])
    low = np.searchsorted(item_domain, codes, side="left")
    high = np.searchsorted(item_domain, codes, side="right")

    # Sequences ordered by user, then domain.
    order = np.lexsort((seq_domain, user_ids))
    seqs, user_ids, seq_domain = seqs.take(order), user_ids[order], seq_domain[order]
    keep = np.flatnonzero(seqs.lengths() >= MIN_SEQUENCE)
    kept, kept_users, kept_domain = seqs.take(keep), user_ids[keep], seq_domain[keep]
    at = np.searchsorted(codes, kept_domain)
    ctr_tables, ctr_counts = din_ctr(
        kept, kept_users, params, candidates=(low[at], high[at]), features={"domain": kept_domain}
    )
    counts.update(
        {
            "raw_users": num_users - 1,
            "raw_items": num_items - 1,
            "raw_interactions": len(item_ids),
            "raw_users_in_both_domains": int((np.bincount(user_ids) == len(DOMAINS)).sum()),
            "asins_in_both_domains": len(np.intersect1d(asins[0], asins[1])),
            "sequences": len(keep),
            "users": len(np.unique(kept_users)),
            "items": int(np.unique(kept.values).size),
            "interactions": int(kept.lengths().sum()),
            "dropped_sequences_short": int(len(seqs) - len(keep)),
            "users_in_both_domains": int((np.bincount(kept_users) == len(DOMAINS)).sum()),
            **ctr_counts,
        }
    )
    view = ctr_view(num_users, num_items, {"domain": len(DOMAINS) + 1}, protocol="leave_one_out")
    view.fields["domain"] = FieldSpec(role="scenario", kind="categorical", vocab_size=len(DOMAINS) + 1)
    return Built(
        tables=ctr_tables,
        protocol="leave_one_out",
        num_users=num_users,
        num_items=num_items,
        views={"ctr": view},
        counts=counts,
    )
