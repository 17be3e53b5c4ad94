"""Export rex's prepared Frappe CTR splits as CSV files for the CTR peer (torch-rechub).

Run with the rex venv, from the repository root::

    .venv/bin/python benchmarks/peers/export_frappe.py [--out benchmarks/.peers/data/frappe]

It prepares ``frappe`` if it is missing or stale (as ``rex train`` would), then writes
``train.csv``, ``valid.csv`` and ``test.csv``: one row per row of rex's ``ctr_train``,
``ctr_valid`` and ``ctr_test`` tables, in the same order, with the ``ctr`` view's categorical
fields (rex's integer ids, 0 = unknown) and the 0/1 ``label``. ``fields.json`` beside them holds
each field's vocabulary size, so the peer's embedding tables have the same rows as rex's.
Same rows and the same split on both sides, so the two test AUCs are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from rex.data.lance_io import read_columns
from rex.data.prepare import ensure_dataset
from rex.data.schema import load_schema

DEFAULT_OUT = Path(__file__).resolve().parents[1] / ".peers" / "data" / "frappe"
SPLITS = ("train", "valid", "test")


def field_sizes(dataset_dir: Path) -> dict[str, int]:
    """The ``ctr`` view's categorical fields, in schema order, with their vocabulary sizes."""
    view = load_schema(dataset_dir).views["ctr"]
    return {
        name: int(spec.vocab_size)
        for name, spec in view.fields.items()
        if spec.kind == "categorical" and spec.vocab_size is not None
    }


def split_matrix(dataset_dir: Path, split: str, fields: list[str]) -> np.ndarray:
    """One split as an int64 (rows, fields + 1) matrix: the field ids, then the label."""
    view = load_schema(dataset_dir).views["ctr"]
    columns = read_columns(dataset_dir / f"{view.tables[split]}.lance", [*fields, "label"])
    label = np.asarray(columns["label"])
    # Labels are stored as float 0.0/1.0; written as integers, they read back exactly.
    if not np.isin(label, (0.0, 1.0)).all():
        raise ValueError(f"{split}: labels must be 0 or 1")
    ids = [np.asarray(columns[name], dtype=np.int64) for name in fields]
    return np.column_stack([*ids, label.astype(np.int64)])


def export(dataset_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write ``{train,valid,test}.csv`` and ``fields.json`` under ``out_dir``; rows per split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = field_sizes(dataset_dir)
    fields = list(sizes)
    rows = {}
    for split in SPLITS:
        matrix = split_matrix(dataset_dir, split, fields)
        path = out_dir / f"{split}.csv"
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        # Written beside the target and renamed: a killed export never leaves a short file.
        np.savetxt(tmp, matrix, fmt="%d", delimiter=",", header=",".join([*fields, "label"]), comments="")
        os.replace(tmp, path)
        rows[split] = int(matrix.shape[0])
    (out_dir / "fields.json").write_text(json.dumps({"fields": sizes, "rows": rows}, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the CSV files")
    args = parser.parse_args(argv)
    rows = export(ensure_dataset("frappe"), args.out)
    print(f"frappe -> {args.out}: " + ", ".join(f"{split} {n:,} rows" for split, n in rows.items()))


if __name__ == "__main__":
    main()
