"""benchmarks/peers/export_frappe.py writes exactly rex's Frappe CTR splits as the peer's CSV files.

Correctness only (never timing): same rows, same order, same split, same labels, same vocabularies.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from rex.data.lance_io import read_columns
from rex.data.mirror import mirror_dir
from rex.data.prepare import prepare_dataset
from rex.data.schema import load_schema

REPO = Path(__file__).resolve().parents[1]
FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]

pytestmark = pytest.mark.skipif(
    mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)"
)


def _load_exporter() -> ModuleType:
    # benchmarks/ is not a package: load the script as a module, as the test of a script.
    path = REPO / "benchmarks" / "peers" / "export_frappe.py"
    spec = importlib.util.spec_from_file_location("export_frappe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int]]:
    """Frappe prepared from the mirror with default params, then exported; (dataset, out, rows)."""
    root = tmp_path_factory.mktemp("data")
    prepare_dataset("frappe", params={}, root=root)
    out = tmp_path_factory.mktemp("peer") / "frappe"
    rows = _load_exporter().export(root / "frappe", out)
    return root / "frappe", out, rows


def test_csv_rows_are_rex_rows_in_order(exported: tuple[Path, Path, dict[str, int]]) -> None:
    dataset, out, rows = exported
    schema = load_schema(dataset)
    view = schema.views["ctr"]
    for split in ("train", "valid", "test"):
        path = out / f"{split}.csv"
        assert path.read_text().splitlines()[0] == ",".join([*FIELDS, "label"])
        csv = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64)
        table = view.tables[split]
        columns = read_columns(dataset / f"{table}.lance", [*FIELDS, "label"])
        assert csv.shape == (schema.tables[table], len(FIELDS) + 1) and rows[split] == csv.shape[0]
        for i, name in enumerate(FIELDS):
            np.testing.assert_array_equal(csv[:, i], columns[name], err_msg=f"{split}.{name}")
        label = np.asarray(columns["label"])
        np.testing.assert_array_equal(csv[:, -1].astype(label.dtype), label, err_msg=f"{split}.label")
        assert set(np.unique(csv[:, -1])) <= {0, 1}


def test_the_three_splits_hold_every_prepared_row(exported: tuple[Path, Path, dict[str, int]]) -> None:
    dataset, _, rows = exported
    counts = load_schema(dataset).counts
    assert sum(rows.values()) == counts["rows"]


def test_fields_json_has_rex_vocabularies(exported: tuple[Path, Path, dict[str, int]]) -> None:
    dataset, out, rows = exported
    written = json.loads((out / "fields.json").read_text())
    view = load_schema(dataset).views["ctr"]
    assert list(written["fields"]) == FIELDS
    assert written["fields"] == {name: view.fields[name].vocab_size for name in FIELDS}
    assert written["rows"] == rows
    assert sorted(p.name for p in out.iterdir()) == ["fields.json", "test.csv", "train.csv", "valid.csv"]
