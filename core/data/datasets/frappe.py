"""Frappe (context-aware app usage, Baltrunas et al. 2015) in NFM's libFM files.

Only NFM's validation and test parts are in the mirror (the train part is absent), so both are
pooled and cut again by a seeded random split. Every row is ``label f:1 f:1 ...`` with labels
-1/1 (two sampled negatives per logged usage) and one feature of each of the README's ten fields,
in its order; libFM numbers the values of the fields one after another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rex.config.errors import DataError
from rex.data.build import (
    Built,
    Params,
    SplitFractions,
    ctr_view,
    random_split,
    register_dataset,
    split_tables,
)
from rex.data.mirror import Member, RawSource, log

_NFM = "https://github.com/hexiangnan/neural_factorization_machine/raw/ca2a5d11/data/frappe"

FRAPPE_NFM = RawSource(
    archive="frappe_nfm_valid_test.tar.xz",
    sha256="d60d5284b4dcd790bf2f78b4a7f839bbe555583dd15a17961528c1b1c8084dcd",
    members=[
        Member(
            "frappe/README.txt",
            f"{_NFM}/README.txt",
            "8ece0e428ba5c1879f2cf298aa65ab5c6c092d5c9716c8a4d5c4ee209dfdc6e7",
        ),
        Member(
            "frappe/frappe.test.libfm",
            f"{_NFM}/frappe.test.libfm",
            "a2ebaef3a9af8e55f8bb0d08bc4923965e42e43760ebd7635ac2f8c5db99e097",
        ),
        Member(
            "frappe/frappe.validation.libfm",
            f"{_NFM}/frappe.validation.libfm",
            "fdf4be563a7dd9b15f7a6e8b32671e90e6e7a2a2bd3af4e10bf13c5ad7e76e9e",
        ),
    ],
)

# The README's fields and their number of values, in libFM order (7363 features less the 1981
# values of ``cnt``, which the label replaces: 5382).
FIELDS = {
    "user": 957,
    "item": 4082,
    "daytime": 7,
    "weekday": 7,
    "isweekend": 2,
    "homework": 3,
    "cost": 2,
    "weather": 9,
    "country": 80,
    "city": 233,
}
PARTS = ("validation", "test")  # pooled in this order


class FrappeParams(Params):
    """Params of ``frappe`` (section ``frappe:`` of params.yaml)."""

    split_seed: int = 2024
    split_fractions: SplitFractions = (0.8, 0.1, 0.1)


def _read_libfm(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``label f:1 ... f:1`` lines (one feature per field) into (labels 0/1, rows x fields ids)."""
    try:
        lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read: {exc}", file=str(path)) from exc
    width = 1 + len(FIELDS)
    for number, words in enumerate(lines, start=1):
        if len(words) != width:
            raise DataError(
                f"line {number}: expected a label and {len(FIELDS)} features, got {len(words) - 1}",
                file=str(path),
            )
    table = np.array(lines, dtype=str).reshape(-1, width)
    labels = table[:, 0]
    bad = ~np.isin(labels, ["1", "-1"])
    if bad.any():
        raise DataError(f"line {int(np.flatnonzero(bad)[0]) + 1}: label is not -1 or 1", file=str(path))
    parts = np.char.partition(table[:, 1:], ":")
    bad = ~np.char.isdigit(parts[:, :, 0]) | (parts[:, :, 2] != "1")
    if bad.any():
        line = int(np.flatnonzero(bad.any(axis=1))[0]) + 1
        raise DataError(f"line {line}: expected features 'id:1'", file=str(path))
    return (labels == "1").astype(np.float32), parts[:, :, 0].astype(np.int64)


@register_dataset("frappe", FRAPPE_NFM, FrappeParams)
def build_frappe(raw: Path, params: FrappeParams) -> Built:
    """The ``ctr`` view: one row per libFM row, every field remapped to 1..K (its values seen).

    ``user`` and ``item`` (fields 0 and 1) carry the user and item roles; there is no history.
    """
    read = [_read_libfm(raw / "frappe" / f"frappe.{part}.libfm") for part in PARTS]
    labels = np.concatenate([label for label, _ in read])
    ids = np.concatenate([rows for _, rows in read])
    n_rows = len(labels)
    log(f"frappe: {n_rows} rows, {int(labels.sum())} positive")

    # Each field's libFM ids must fall in its own block of the README's numbering.
    sizes = np.array(list(FIELDS.values()))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    outside = (ids < starts) | (ids >= starts + sizes)
    if outside.any():
        row, field = (int(x[0]) for x in np.nonzero(outside))
        raise DataError(
            f"row {row + 1}: feature {ids[row, field]} is not a value of field {list(FIELDS)[field]!r} "
            f"(ids {starts[field]}..{starts[field] + sizes[field] - 1}); the fields are not in the "
            "README's order",
            file=str(raw / "frappe"),
        )
    columns: dict[str, np.ndarray] = {}
    vocab: dict[str, int] = {}
    for index, name in enumerate(FIELDS):
        uniques, inverse = np.unique(ids[:, index], return_inverse=True)
        columns[name] = inverse.astype(np.int64) + 1
        vocab[name] = len(uniques) + 1
    columns["label"] = labels

    view = ctr_view(
        vocab["user"],
        vocab["item"],
        {name: size for name, size in vocab.items() if name not in ("user", "item")},
        protocol="random_split",
    )
    del view.fields["history"]  # rows are contexts, not a user's ordered history
    counts = {
        **{f"raw_rows_{part}": len(label) for part, (label, _) in zip(PARTS, read, strict=True)},
        "raw_rows": n_rows,
        "rows": n_rows,
        "duplicate_rows": n_rows - len(np.unique(np.column_stack([ids, labels]), axis=0)),
        "positives": int(labels.sum()),
        "negatives": int(n_rows - labels.sum()),
        "users": vocab["user"] - 1,
        "items": vocab["item"] - 1,
    }
    return Built(
        tables=split_tables(columns, random_split(n_rows, params.split_fractions, params.split_seed)),
        protocol="random_split",
        num_users=vocab["user"],
        num_items=vocab["item"],
        views={"ctr": view},
        counts=counts,
    )
