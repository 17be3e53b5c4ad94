"""`rex data import`: CSV / Parquet / RecBole files + a YAML mapping -> a prepared dataset.

The round trip imports the mirror's own RecBole export of ml-100k and checks it against the
native ``ml-100k`` build table for table. Malformed inputs must fail with a DataError naming the
file (and line and column for data problems) and leave nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rex.config.errors import DataError
from rex.data.importer import import_dataset, load_mapping
from rex.data.lance_io import read_columns
from rex.data.mirror import ML100K_RECBOLE, fetch, mirror_dir
from rex.data.prepare import Ml100kParams, dataset_info, ensure_dataset, prepare_dataset
from rex.data.schema import load_schema
from tests.conftest import REPO, run_rex

# 4 users; user 4 has only 2 events (dropped from the sequence view). Rows are in file order;
# user 1's two events at t=30 keep that order (item 13 before item 12).
ROWS = [
    ("u1", "i11", 5.0, 10),
    ("u2", "i12", 3.0, 50),
    ("u1", "i13", 4.0, 30),
    ("u1", "i12", 2.0, 30),
    ("u2", "i11", 4.0, 20),
    ("u3", "i14", 1.0, 70),
    ("u2", "i13", 5.0, 60),
    ("u1", "i14", 4.0, 40),
    ("u3", "i11", 5.0, 71),
    ("u3", "i12", 4.0, 72),
    ("u4", "i11", 3.0, 5),
    ("u4", "i12", 3.0, 6),
]
CSV_TEXT = "user,item,rating,ts\n" + "".join(f"{u},{i},{r:g},{t}\n" for u, i, r, t in ROWS)
ITEMS_CSV = "item,genre,year\ni11,Drama Comedy,1995\ni12,Comedy,1996\ni13,unknown,1997\ni14,Drama,\n"


def _mapping(**changes: object) -> dict:
    mapping: dict = {
        "name": "tiny",
        "interactions": {"path": "log.csv"},
        "columns": {"user": "user", "item": "item", "timestamp": "ts", "rating": "rating"},
        "label": {"threshold": 4},
        "item_features": {
            "path": "items.csv",
            "columns": {
                "genre": {"column": "genre", "first_token": True, "unknown": ["unknown"]},
                "year": "year",
            },
        },
        "split": {"fractions": [0.5, 0.25, 0.25], "seed": 7},
    }
    mapping.update(changes)
    return {k: v for k, v in mapping.items() if v is not None}


def _write(directory: Path, files: dict[str, str | bytes], mapping: dict | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = directory / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    path = directory / "mapping.yaml"
    path.write_text(mapping if isinstance(mapping, str) else yaml.safe_dump(mapping), encoding="utf-8")
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return _write(tmp_path / "in", {"log.csv": CSV_TEXT, "items.csv": ITEMS_CSV}, _mapping())


# ---------------------------------------------------------------- valid imports


def test_csv_import_builds_both_views(tiny: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    imported = import_dataset(tiny, root=home)
    schema = load_schema(home / "tiny")
    assert imported.directory == home / "tiny"
    assert (schema.num_users, schema.num_items) == (5, 5)  # u1..u4 -> 1..4, i11..i14 -> 1..4
    assert set(schema.views) == {"sequence", "ctr"}
    assert schema.counts["dropped_users_short"] == 1
    train = read_columns(home / "tiny" / "seq_train.lance", ["user", "items"])
    test = read_columns(home / "tiny" / "seq_test.lance", ["user", "history", "target"])
    # u1 chronological: i11 (10), i13 (30, earlier in the file), i12 (30), i14 (40)
    assert train["user"].tolist() == [1, 2, 3]
    assert train["items"].row(0).tolist() == [1, 3]
    assert test["history"].row(0).tolist() == [1, 3, 2] and test["target"][0] == 4
    assert test["history"].row(1).tolist() == [1, 2] and test["target"][1] == 3
    ctr = {
        split: read_columns(home / "tiny" / f"ctr_{split}.lance", ["user", "item", "label", "genre", "year"])
        for split in ("train", "valid", "test")
    }
    assert [len(ctr[s]["user"]) for s in ("train", "valid", "test")] == [6, 3, 3]
    items = np.concatenate([ctr[s]["item"] for s in ctr])
    genre = np.concatenate([ctr[s]["genre"] for s in ctr])
    year = np.concatenate([ctr[s]["year"] for s in ctr])
    # genre: first token, "unknown" -> 0 (Comedy=1, Drama=2); an empty year -> 0
    assert dict(zip(items.tolist(), genre.tolist(), strict=True)) == {1: 2, 2: 1, 3: 0, 4: 2}
    assert dict(zip(items.tolist(), year.tolist(), strict=True)) == {1: 1, 2: 2, 3: 3, 4: 0}
    labels = np.concatenate([ctr[s]["label"] for s in ctr])
    assert labels.sum() == sum(r >= 4 for _, _, r, _ in ROWS)
    assert "tiny" in dataset_info("tiny", root=home)
    assert ensure_dataset("tiny", root=home) == home / "tiny"


def test_parquet_and_recbole_give_the_same_tables_as_csv(tiny: Path, tmp_path: Path) -> None:
    import_dataset(tiny, root=tmp_path / "csv")
    data = tiny.parent
    users, items, ratings, stamps = zip(*ROWS, strict=True)
    pq.write_table(
        pa.table({"user": users, "item": items, "rating": ratings, "ts": pa.array(stamps, pa.int64())}),
        data / "log.parquet",
    )
    (data / "log.inter").write_text(
        "user:token\titem:token\trating:float\tts:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS)
    )
    for name in ("log.parquet", "log.inter"):
        mapping = _write(data, {}, _mapping(interactions={"path": name}))
        import_dataset(mapping, root=tmp_path / name)
        for table in load_schema(tmp_path / "csv" / "tiny").tables:
            got = lance.dataset(str(tmp_path / name / "tiny" / f"{table}.lance")).to_table()
            assert got.equals(lance.dataset(str(tmp_path / "csv" / "tiny" / f"{table}.lance")).to_table())


def test_without_a_label_rule_there_is_only_the_sequence_view(tmp_path: Path) -> None:
    mapping = _write(
        tmp_path / "in",
        {"log.csv": CSV_TEXT},
        _mapping(label=None, item_features=None, columns={"user": "user", "item": "item"}),
    )
    schema = import_dataset(mapping, root=tmp_path / "home").schema
    assert list(schema.views) == ["sequence"]
    # without a timestamp the file order is the chronology: u1 = i11, i13, i12, i14
    test = read_columns(tmp_path / "home" / "tiny" / "seq_test.lance", ["history", "target"])
    assert test["history"].row(0).tolist() == [1, 3, 2] and test["target"][0] == 4


# ---------------------------------------------------------------- malformed input

RECBOLE_OK = "u:token\ti:token\tr:float\tt:float\n" + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS)
RECBOLE_MAPPING = {
    "name": "bad",
    "interactions": {"path": "log.inter"},
    "columns": {"user": "u", "item": "i", "timestamp": "t", "rating": "r"},
    "label": {"threshold": 4},
}


def _recbole(**changes: object) -> dict:
    return {**RECBOLE_MAPPING, **changes}


MALFORMED: dict[str, tuple[dict[str, str | bytes], dict | str, str]] = {
    "missing column": (
        {"log.inter": RECBOLE_OK},
        _recbole(columns={"user": "u", "item": "i", "timestamp": "time", "rating": "r"}),
        r"log\.inter: no column 'time' \(mapped in interactions\); columns: u, i, r, t",
    ),
    "non-numeric rating": (
        {"log.inter": RECBOLE_OK.replace("u1\ti13\t4.0", "u1\ti13\tfour")},
        _recbole(),
        r"log\.inter: line 4, column 'r': 'four' is not a number",
    ),
    "non-numeric timestamp after a blank line": (
        {"log.csv": CSV_TEXT.replace("u2,i11,4,20\n", "\nu2,i11,4,2020-01-01\n")},
        _mapping(item_features=None),
        r"log\.csv: line 7, column 'ts': '2020-01-01' is not a number",
    ),
    "empty timestamp": (
        {"log.csv": CSV_TEXT.replace("u3,i14,1,70", "u3,i14,1,")},
        _mapping(item_features=None),
        r"log\.csv: line 7, column 'ts': an empty value is not a number",
    ),
    "infinite rating": (
        {"log.inter": RECBOLE_OK.replace("u3\ti14\t1.0", "u3\ti14\tinf")},
        _recbole(),
        r"log\.inter: line 7, column 'r': 'inf' is not a number",
    ),
    "empty file": ({"log.inter": ""}, _recbole(), r"log\.inter: empty file"),
    "header only": (
        {"log.inter": RECBOLE_OK.splitlines()[0]},
        _recbole(),
        r"log\.inter: header only: no data rows",
    ),
    "header only with newline": (
        {"log.inter": RECBOLE_OK.splitlines()[0] + "\n\n"},
        _recbole(),
        r"log\.inter: header only: no data rows",
    ),
    "duplicate header": (
        {"log.inter": RECBOLE_OK.replace("t:float\n", "u:float\n", 1)},
        _recbole(),
        r"log\.inter: line 1: duplicate column 'u' \(fields 1 and 4\)",
    ),
    "comma file declared recbole": (
        {"log.inter": RECBOLE_OK.replace("\t", ",")},
        _recbole(),
        r"log\.inter: line 1 has a single column .*wrong separator\? It contains ',' but is read with "
        r"'\\t' \(RecBole atomic files are tab-separated",
    ),
    "tab file read as csv": (
        {"log.csv": CSV_TEXT.replace(",", "\t")},
        _mapping(item_features=None),
        r"log\.csv: line 1 has a single column .*It contains '\\t' but is read with ','",
    ),
    "recbole header without types": (
        {"log.inter": RECBOLE_OK.replace("r:float", "r", 1)},
        _recbole(),
        r"log\.inter: line 1, field 3 'r': a RecBole header field is name:type",
    ),
    "ragged row": (
        {"log.inter": RECBOLE_OK.replace("u3\ti11\t5.0\t71\n", "u3\ti11\t5.0\n")},
        _recbole(),
        r"log\.inter: line 10: 3 field\(s\) where the header has 4 \(separator '\\t'\): 'u3\\ti11\\t5\.0'",
    ),
    "unknown role": (
        {"log.inter": RECBOLE_OK},
        _recbole(columns={"user": "u", "item": "i", "timestmp": "t"}),
        r"mapping\.yaml: columns\.timestmp: unknown role \(did you mean timestamp\?\); "
        r"known: user, item, timestamp, rating",
    ),
    "unknown key": (
        {"log.inter": RECBOLE_OK},
        {**_recbole(), "splits": {}},
        r"mapping\.yaml: splits: unknown key \(did you mean split\?\)",
    ),
    "yaml syntax error": (
        {"log.inter": RECBOLE_OK},
        "name: bad\ninteractions: {path: log.inter\ncolumns: {user: u}\n",
        r"mapping\.yaml: not valid YAML: line 3, column 8",
    ),
    "mapping is not a mapping": ({}, "- just\n- a list\n", r"mapping\.yaml: expected a mapping"),
    "missing file": (
        {},
        _recbole(),
        r"log\.inter: file not found \(named by interactions\.path in .*mapping\.yaml\)",
    ),
    "unknown format": (
        {"log.inter": RECBOLE_OK},
        _recbole(interactions={"path": "log.inter", "format": "xlsx"}),
        r"mapping\.yaml: interactions\.format: Input should be 'csv', 'parquet' or 'recbole'",
    ),
    "unknown suffix": (
        {"log.dat": RECBOLE_OK},
        _recbole(interactions={"path": "log.dat"}),
        r"mapping\.yaml: interactions\.format: cannot tell the format of log\.dat from its suffix",
    ),
    "not a parquet file": (
        {"log.parquet": RECBOLE_OK},
        _recbole(interactions={"path": "log.parquet"}),
        r"log\.parquet: not a readable Parquet file",
    ),
    "label not 0/1": (
        {"log.inter": RECBOLE_OK},
        _recbole(label={"column": "r"}),
        r"log\.inter: line 2, column 'r': label 5 is not 0 or 1 \(set label\.threshold",
    ),
    "label without a column": (
        {"log.inter": RECBOLE_OK},
        _recbole(columns={"user": "u", "item": "i"}),
        r"mapping\.yaml: label: name its column, or map a rating column",
    ),
    "duplicate feature id": (
        {"log.csv": CSV_TEXT, "items.csv": ITEMS_CSV + "i12,Drama,1990\n"},
        _mapping(name="bad"),
        r"items\.csv: line 6, column 'item': id 'i12' already has a row \(line 3\)",
    ),
    "reserved feature name": (
        {"log.csv": CSV_TEXT, "items.csv": ITEMS_CSV},
        _mapping(item_features={"path": "items.csv", "columns": {"label": "genre"}}),
        r"mapping\.yaml: feature name\(s\) label clash",
    ),
    "fractions": (
        {"log.inter": RECBOLE_OK},
        _recbole(split={"fractions": [0.8, 0.3, 0.1]}),
        r"mapping\.yaml: split\.fractions: train/valid/test fractions must be >= 0 and sum to 1",
    ),
    "built-in name": (
        {"log.inter": RECBOLE_OK},
        _recbole(name="ml-100k"),
        r"mapping\.yaml: name: 'ml-100k' is a built-in dataset",
    ),
    "not utf-8": (
        {"log.inter": RECBOLE_OK.encode().replace(b"u3\ti14", b"\xff\xfe\ti14")},
        _recbole(),
        r"log\.inter: line 7: not UTF-8 text",
    ),
    # numpy strips a trailing NUL: 'u1\0' would silently become user u1
    "NUL byte in a user id": (
        {"log.csv": CSV_TEXT.replace("u1,i13", "u1\x00,i13")},
        _mapping(item_features=None),
        r"log\.csv: line 4, column 'user': id 'u1\\x00' holds a NUL byte; remove it",
    ),
    "an empty user id": (
        {"log.csv": CSV_TEXT.replace("u1,i13", ",i13")},
        _mapping(item_features=None),
        r"log\.csv: line 4, column 'user': the id is empty; every row needs one \(1 row lacks it\)",
    ),
    "a blank item id": (
        {"log.csv": CSV_TEXT.replace("u1,i13", "u1,  ")},
        _mapping(item_features=None),
        r"log\.csv: line 4, column 'item': the id is empty",
    ),
    "NUL byte in a feature file's id": (
        {"log.csv": CSV_TEXT, "items.csv": ITEMS_CSV.replace("i13,", "i\x0013,")},
        _mapping(),
        r"items\.csv: line 4, column 'item': id 'i\\x0013' holds a NUL byte",
    ),
    "every user has too few interactions": (
        {"log.csv": "user,item,rating,ts\n" + "".join(f"u{n},i{n % 3},4,{n}\n" for n in range(8))},
        _mapping(item_features=None),
        r"log\.csv: the sequence view would be empty: all 8 users have fewer than 3 interactions",
    ),
    "empty ctr split": (
        {"log.csv": CSV_TEXT},
        _mapping(item_features=None, split={"fractions": [0.9, 0.1, 0.0]}),
        r"mapping\.yaml: split\.fractions: the ctr test split is empty \(0 of 12 rows\)",
    ),
    "a single class in ctr train": (
        {"log.csv": CSV_TEXT},
        _mapping(item_features=None, label={"threshold": 6}),
        r"mapping\.yaml: label: every label of the ctr train split of log\.csv is 0: there is nothing to learn",
    ),
    "unknown duplicates policy": (
        {"log.csv": CSV_TEXT},
        _mapping(item_features=None, duplicates="remove"),
        r"mapping\.yaml: duplicates: Input should be 'drop' or 'keep'",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_a_located_data_error_and_writes_nothing(case: str, tmp_path: Path) -> None:
    files, mapping, message = MALFORMED[case]
    path = _write(tmp_path / "in", files, mapping)
    home = tmp_path / "home"
    with pytest.raises(DataError, match=message):
        import_dataset(path, root=home)
    assert not home.exists() or not any(home.iterdir())


def test_malformed_parquet_value_names_the_row(tmp_path: Path) -> None:
    directory = tmp_path / "in"
    directory.mkdir()
    pq.write_table(
        pa.table({"u": ["a", "b", "c"], "i": ["x", "y", "z"], "t": ["1", "2", "soon"]}),
        directory / "log.parquet",
    )
    mapping = _write(directory, {}, _recbole(interactions={"path": "log.parquet"}, label=None))
    with pytest.raises(DataError, match=r"log\.parquet: row 3, column 't': 'soon' is not a number"):
        import_dataset(mapping, root=tmp_path / "home")


def test_a_list_id_column_in_parquet_must_be_a_scalar(tmp_path: Path) -> None:
    directory = tmp_path / "in"
    directory.mkdir()
    pq.write_table(
        pa.table({"u": [["a"], ["b", "c"], ["a"]], "i": ["x", "y", "z"], "t": [1, 2, 3]}),
        directory / "log.parquet",
    )
    mapping = _write(directory, {}, _recbole(interactions={"path": "log.parquet"}, label=None))
    home = tmp_path / "home"
    with pytest.raises(
        DataError,
        match=r"log\.parquet: column 'u' holds list<.*> values: an id column must be a scalar \(string or integer\)",
    ):
        import_dataset(mapping, root=home)
    assert not home.exists()


def _tables(directory: Path) -> dict[str, pa.Table]:
    return {
        table: lance.dataset(str(directory / f"{table}.lance")).to_table()
        for table in load_schema(directory).tables
    }


def test_exact_duplicate_rows_are_reported_and_dropped(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import_dataset(tiny, root=tmp_path / "once")
    (tiny.parent / "log.csv").write_text(CSV_TEXT + CSV_TEXT.split("\n", 1)[1], encoding="utf-8")
    capsys.readouterr()
    schema = import_dataset(tiny, root=tmp_path / "twice").schema
    assert "warning: 12 of 24 rows of " in capsys.readouterr().err
    assert schema.counts["raw_interactions"] == 12
    assert _tables(tmp_path / "twice" / "tiny") == _tables(tmp_path / "once" / "tiny")


def test_duplicates_keep_keeps_them(tiny: Path, tmp_path: Path) -> None:
    mapping = _write(
        tiny.parent, {"log.csv": CSV_TEXT + CSV_TEXT.split("\n", 1)[1]}, _mapping(duplicates="keep")
    )
    schema = import_dataset(mapping, root=tmp_path / "home").schema
    assert schema.counts["raw_interactions"] == 24
    assert schema.params["duplicates"] == "keep"


def test_a_single_class_in_valid_or_test_is_a_warning_naming_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With this seed the 3 valid rows are all positive and the 3 test rows all negative.
    mapping = _write(
        tmp_path / "in",
        {"log.csv": CSV_TEXT},
        _mapping(item_features=None, split={"fractions": [0.5, 0.25, 0.25], "seed": 4}),
    )
    import_dataset(mapping, root=tmp_path / "home")
    err = capsys.readouterr().err
    for split, label in (("valid", 1), ("test", 0)):
        labels = read_columns(tmp_path / "home" / "tiny" / f"ctr_{split}.lance", ["label"])["label"]
        assert set(labels.tolist()) == {label}
        assert (
            f"warning: every label of the ctr {split} split of log.csv is {label}: its AUC will be NaN" in err
        )
    assert "ctr train split" not in err


def test_missing_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.yaml: mapping file not found"):
        load_mapping(tmp_path / "nope.yaml")


def test_failed_reimport_keeps_the_previous_dataset(tiny: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    import_dataset(tiny, root=home)
    before = (home / "tiny" / "schema.json").read_bytes()
    (tiny.parent / "log.csv").write_text(CSV_TEXT.replace("u1,i11,5,10", "u1,i11,5"))
    with pytest.raises(DataError, match=r"log\.csv: line 2: 3 field\(s\) where the header has 4"):
        import_dataset(tiny, root=home)
    assert (home / "tiny" / "schema.json").read_bytes() == before
    assert sorted(p.name for p in home.iterdir()) == ["tiny"]


def test_cli_exit_code_and_message(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "in", {"log.inter": RECBOLE_OK.replace("u1\ti13\t4.0", "u1\ti13\tfour")}, _recbole()
    )
    result = run_rex("data", "import", str(path), env={"REX_DATA_HOME": str(tmp_path / "home")})
    assert result.returncode == 2
    assert "line 4, column 'r': 'four' is not a number" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "bad").exists()


# ---------------------------------------------------------------- round trip against the native build

ML100K_MAPPING = """\
name: ml100k-import
interactions: {{path: ml-100k.inter, format: recbole}}
columns: {{user: user_id, item: item_id, timestamp: timestamp, rating: rating}}
label: {{column: rating, threshold: {threshold}}}
user_features:
  path: ml-100k.user
  columns: {{age: age, gender: gender, occupation: occupation, zip: zip_code}}
item_features:
  path: ml-100k.item
  columns:
    release_year: {{column: release_year, unknown: [unkonwn, V]}}   # sic: ml-100k's own token
    genre: {{column: class, first_token: true, unknown: [unknown]}}
split: {{protocol: leave_one_out, fractions: {fractions}, seed: {seed}}}
ctr_max_history: {history}
"""


@pytest.mark.skipif(mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)")
def test_recbole_export_of_ml100k_round_trips_to_the_native_dataset(tmp_path: Path) -> None:
    params = Ml100kParams(split_seed=11, ctr_max_history=20)
    native = prepare_dataset("ml-100k", params=params.model_dump(), root=tmp_path / "native")
    export = fetch(ML100K_RECBOLE, tmp_path / "raw") / "ml-100k"
    mapping = export / "mapping.yaml"
    mapping.write_text(
        ML100K_MAPPING.format(
            threshold=params.label_threshold,
            fractions=list(params.split_fractions),
            seed=params.split_seed,
            history=params.ctr_max_history,
        )
    )
    home = tmp_path / "home"
    result = run_rex("data", "import", str(mapping), env={"REX_DATA_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    imported = load_schema(home / "ml100k-import")
    assert (imported.num_users, imported.num_items) == (native.num_users, native.num_items) == (944, 1683)
    assert imported.counts == native.counts
    # The native dataset also has an items view of MiniLM title vectors (`rex data features`),
    # which an import of interactions alone does not make; everything else must be identical.
    assert set(native.tables) - set(imported.tables) == {"items"}
    assert imported.tables == {name: rows for name, rows in native.tables.items() if name != "items"}
    assert imported.views == {name: view for name, view in native.views.items() if name != "items"}
    for table in imported.tables:
        got = lance.dataset(str(home / "ml100k-import" / f"{table}.lance")).to_table()
        want = lance.dataset(str(tmp_path / "native" / "ml-100k" / f"{table}.lance")).to_table()
        assert got.equals(want), table

    # ... and trains like any prepared dataset.
    trained = run_rex(
        "train",
        str(REPO / "recipes" / "deepfm.yaml"),
        "data.name=ml100k-import",
        "train.max_epochs=1",
        "train.limit_train_batches=2",
        "train.limit_eval_batches=1",
        f"logging.run_root={tmp_path / 'runs'}",
        env={"REX_DATA_HOME": str(home)},
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
