"""Preparing the real datasets from the mirror: counts, splits, ctr rows, reuse and errors.

Reference values are recomputed here with plain Python from the raw files, independently of the
vectorised code under test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from rex.config.errors import DataError
from rex.data import prepare as prepare_module
from rex.data.lance_io import RaggedColumn, read_columns
from rex.data.mirror import mirror_dir
from rex.data.prepare import (
    DATASETS,
    BeautyParams,
    Ml100kParams,
    dataset_info,
    ensure_dataset,
    load_params,
    prepare_dataset,
)
from rex.data.schema import data_hash, load_schema

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared copy of both datasets, with default params, shared by this module."""
    path = tmp_path_factory.mktemp("data")
    for name in ("ml-100k", "beauty"):
        prepare_dataset(name, params={}, root=path)
    return path


def _read(root: Path, dataset: str, table: str, columns: list[str]) -> dict:
    return read_columns(root / dataset / f"{table}.lance", columns)


def _lists(col: RaggedColumn) -> list[list[int]]:
    return [col.row(i).tolist() for i in range(len(col))]


# ---------------------------------------------------------------- reference data from raw files


@pytest.fixture(scope="module")
def ml_raw(root: Path) -> list[tuple[int, int, float, float]]:
    lines = (root / "_raw" / "ml-100k_recbole" / "ml-100k" / "ml-100k.inter").read_text().splitlines()
    rows = []
    for line in lines[1:]:
        user, item, rating, ts = line.split("\t")
        rows.append((int(user), int(item), float(rating), float(ts)))
    return rows


@pytest.fixture(scope="module")
def ml_sequences(ml_raw: list[tuple[int, int, float, float]]) -> dict[int, list[int]]:
    per_user: dict[int, list[tuple[float, int, int]]] = defaultdict(list)
    for index, (user, item, _, ts) in enumerate(ml_raw):
        per_user[user].append((ts, index, item))
    return {user: [item for _, _, item in sorted(events)] for user, events in per_user.items()}


@pytest.fixture(scope="module")
def beauty_sequences(root: Path) -> dict[int, list[int]]:
    text = (root / "_raw" / "amazon_s3rec_seq" / "s3rec" / "Beauty.txt").read_text()
    seqs = {}
    for line in text.splitlines():
        user, *items = map(int, line.split())
        seqs[user] = items
    return seqs


# ---------------------------------------------------------------- counts


def test_counts_match_provenance(root: Path) -> None:
    ml = load_schema(root / "ml-100k")
    assert (ml.counts["raw_users"], ml.counts["raw_items"], ml.counts["raw_interactions"]) == (
        943,
        1682,
        100_000,
    )
    assert (ml.num_users, ml.num_items) == (944, 1683)
    beauty = load_schema(root / "beauty")
    assert (beauty.counts["raw_users"], beauty.counts["raw_items"], beauty.counts["raw_interactions"]) == (
        22_363,
        12_101,
        198_502,
    )
    assert (beauty.num_users, beauty.num_items) == (22_364, 12_102)
    for schema in (ml, beauty):
        assert schema.counts["dropped_users_short"] == 0
        assert schema.tables["seq_train"] == schema.counts["users"]
        assert schema.source["sha256"] == DATASETS[schema.name].source.sha256


# ---------------------------------------------------------------- sequence view


@pytest.mark.parametrize("dataset", ["ml-100k", "beauty"])
def test_leave_one_out_invariants(root: Path, dataset: str) -> None:
    train = _read(root, dataset, "seq_train", ["user", "items"])
    valid = _read(root, dataset, "seq_valid", ["user", "history", "target"])
    test = _read(root, dataset, "seq_test", ["user", "history", "target"])
    np.testing.assert_array_equal(train["user"], valid["user"])
    np.testing.assert_array_equal(valid["user"], test["user"])
    # train items == valid history; test history == valid history + valid target.
    np.testing.assert_array_equal(train["items"].values, valid["history"].values)
    np.testing.assert_array_equal(train["items"].offsets, valid["history"].offsets)
    np.testing.assert_array_equal(test["history"].lengths(), valid["history"].lengths() + 1)
    np.testing.assert_array_equal(test["history"].padded(1)[:, 0], valid["target"])
    np.testing.assert_array_equal(
        test["history"].take(np.arange(len(valid["target"]))).padded(400)[:, :-1],
        valid["history"].padded(399),
    )
    assert valid["history"].lengths().min() >= 1
    assert valid["target"].min() >= 1 and test["target"].min() >= 1


def test_sequences_are_the_raw_chronological_sequences(
    root: Path, ml_sequences: dict[int, list[int]], beauty_sequences: dict[int, list[int]]
) -> None:
    for dataset, reference in (("ml-100k", ml_sequences), ("beauty", beauty_sequences)):
        test = _read(root, dataset, "seq_test", ["user", "history", "target"])
        got = {
            int(u): h + [int(t)]
            for u, h, t in zip(test["user"], _lists(test["history"]), test["target"], strict=True)
        }
        # ml-100k and Beauty ids are already 1..N, and remapping keeps their order.
        assert got == reference, dataset


# ---------------------------------------------------------------- ctr view, ml-100k


def test_ml100k_ctr_rows_labels_and_features(root: Path, ml_raw: list[tuple[int, int, float, float]]) -> None:
    cols = ["user", "item", "label", "age", "gender", "occupation", "zip", "release_year", "genre", "history"]
    tables = {t: _read(root, "ml-100k", t, cols) for t in ("ctr_train", "ctr_valid", "ctr_test")}
    assert [len(t["user"]) for t in tables.values()] == [80_000, 10_000, 10_000]
    pairs = [(int(u), int(i)) for t in tables.values() for u, i in zip(t["user"], t["item"], strict=True)]
    assert len(set(pairs)) == 100_000  # (user, item) is unique in ml-100k: the splits partition the rows
    rating = {(u, i): r for u, i, r, _ in ml_raw}
    for table in tables.values():
        assert table["label"].dtype == np.float32
        expected = [
            float(rating[(int(u), int(i))] >= 4) for u, i in zip(table["user"], table["item"], strict=True)
        ]
        np.testing.assert_array_equal(table["label"], expected)
        for feature in ("gender", "occupation", "zip", "age"):
            assert table[feature].min() >= 1
    schema = load_schema(root / "ml-100k")
    fields = schema.views["ctr"].fields
    for feature in ("age", "gender", "occupation", "zip", "release_year", "genre"):
        assert all(int(t[feature].max()) < fields[feature].vocab_size for t in tables.values())
    assert fields["gender"].vocab_size == 3
    # Item 267 has no usable year and the genre "unknown": both encode as 0.
    train = tables["ctr_train"]
    at = np.flatnonzero(train["item"] == 267)
    assert len(at) and (train["release_year"][at] == 0).all() and (train["genre"][at] == 0).all()
    assert schema.counts["ctr_positives"] == sum(r >= 4 for r in rating.values())


def test_ml100k_ctr_history_is_the_users_earlier_items(
    root: Path, ml_raw: list[tuple[int, int, float, float]], ml_sequences: dict[int, list[int]]
) -> None:
    table = _read(root, "ml-100k", "ctr_valid", ["user", "item", "history"])
    cap = Ml100kParams().ctr_max_history
    for r in range(0, len(table["user"]), 7):
        user, item = int(table["user"][r]), int(table["item"][r])
        seq = ml_sequences[user]
        position = seq.index(item)
        assert table["history"].row(r).tolist() == seq[max(0, position - cap) : position]
    assert table["history"].lengths().max() == cap


# ---------------------------------------------------------------- ctr view, beauty


def _beauty_ctr(root: Path, table: str) -> dict:
    return _read(root, "beauty", table, ["user", "item", "label", "history"])


def test_beauty_ctr_positives_negatives_and_histories(
    root: Path, beauty_sequences: dict[int, list[int]]
) -> None:
    lengths = np.array([len(s) for s in beauty_sequences.values()])
    expected_positives = {"ctr_train": int((lengths - 3).sum()), "ctr_valid": 22_363, "ctr_test": 22_363}
    for table_name, positives in expected_positives.items():
        table = _beauty_ctr(root, table_name)
        labels = table["label"]
        assert int(labels.sum()) == positives and len(labels) == 2 * positives  # neg_ratio 1
        np.testing.assert_array_equal(labels[0::2], 1.0)
        np.testing.assert_array_equal(labels[1::2], 0.0)
        users, items = table["user"], table["item"]
        np.testing.assert_array_equal(users[0::2], users[1::2])
        np.testing.assert_array_equal(table["history"].padded(50)[0::2], table["history"].padded(50)[1::2])
        for r in range(0, len(users), 2):
            seq = beauty_sequences[int(users[r])]
            assert int(items[r + 1]) not in seq, "negative the user interacted with"
            if r % 20 == 0:
                position = seq.index(int(items[r]))  # items never repeat within a Beauty sequence
                assert table["history"].row(r).tolist() == seq[max(0, position - 50) : position]
        if table_name == "ctr_test":
            last = {u: s[-1] for u, s in beauty_sequences.items()}
            assert all(last[int(u)] == int(i) for u, i in zip(users[0::2], items[0::2], strict=True))
        assert items.min() >= 1 and items.max() <= 12_101


def test_beauty_negatives_are_reproducible_and_follow_neg_ratio(root: Path, tmp_path: Path) -> None:
    prepare_dataset("beauty", params={"neg_ratio": 2}, root=tmp_path / "a")
    prepare_dataset("beauty", params={"neg_ratio": 2}, root=tmp_path / "b")
    prepare_dataset("beauty", params={"neg_ratio": 2, "neg_seed": 7}, root=tmp_path / "c")
    a, b, c = (_beauty_ctr(tmp_path / x, "ctr_valid") for x in "abc")
    np.testing.assert_array_equal(a["item"], b["item"])
    assert data_hash(tmp_path / "a" / "beauty") == data_hash(tmp_path / "b" / "beauty")
    assert not np.array_equal(a["item"], c["item"])
    assert int(a["label"].sum()) * 3 == len(a["label"])
    np.testing.assert_array_equal(a["label"].reshape(-1, 3), np.tile([1.0, 0.0, 0.0], (22_363, 1)))
    base = _beauty_ctr(root, "ctr_valid")
    np.testing.assert_array_equal(a["item"][0::3], base["item"][0::2])  # same positives


def test_beauty_item_attributes(root: Path) -> None:
    table = _read(root, "beauty", "items", ["item", "attributes"])
    np.testing.assert_array_equal(table["item"], np.arange(1, 12_102))
    raw = json.loads(
        (root / "_raw" / "amazon_s3rec_seq" / "s3rec" / "Beauty_item2attributes.json").read_text()
    )
    for item in (1, 4, 83, 12_101):
        assert table["attributes"].row(item - 1).tolist() == raw[str(item)]
    assert load_schema(root / "beauty").views["items"].fields["attributes"].vocab_size == 638


# ---------------------------------------------------------------- reuse, params and errors


def test_up_to_date_dataset_is_reused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fetch(*args: object) -> None:
        raise AssertionError("rebuilt an up-to-date dataset")

    before = data_hash(root / "ml-100k")
    monkeypatch.setattr(prepare_module, "fetch", no_fetch)
    assert prepare_dataset("ml-100k", params={}, root=root).name == "ml-100k"
    assert prepare_dataset("ml-100k", params=Ml100kParams().model_dump(), root=root).name == "ml-100k"
    with pytest.raises(AssertionError, match="rebuilt"):
        prepare_dataset("ml-100k", params={}, root=root, force=True)
    with pytest.raises(AssertionError, match="rebuilt"):
        prepare_dataset("ml-100k", params={"ctr_max_history": 20}, root=root)
    assert data_hash(root / "ml-100k") == before


def test_a_schema_that_disagrees_with_its_tables_is_not_up_to_date(root: Path, tmp_path: Path) -> None:
    shutil.copytree(root / "ml-100k", tmp_path / "ml-100k")
    schema_file = tmp_path / "ml-100k" / "schema.json"
    schema_file.write_text(json.dumps({**json.loads(schema_file.read_text()), "num_items": 1000}))
    with pytest.raises(
        DataError,
        match=r"ml-100k/schema\.json: num_items is 1000 but seq_train\.lance column 'items' holds id 16\d\d: the "
        r"schema does not belong to these tables; rebuild it with `rex data prepare ml-100k --force`",
    ):
        prepare_dataset("ml-100k", params={}, root=tmp_path)


def test_an_up_to_date_prepare_removes_what_killed_prepares_left(root: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    leftovers = [root / f"ml-100k.old-{child.pid}", root / f".ml-100k.tmp-{child.pid}"]
    for leftover in leftovers:
        (leftover / "ctr_train.lance").mkdir(parents=True)  # half deleted
    prepare_dataset("ml-100k", params={}, root=root)
    assert not any(leftover.exists() for leftover in leftovers)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(("ml-100k", ".ml-100k"))) == ["ml-100k"]


def test_a_prepare_that_waited_for_another_uses_its_dataset(root: Path, tmp_path: Path) -> None:
    """While one process builds a dataset (here: holds its lock, then puts a copy in place), a
    second one asked for it waits and then reuses that build instead of building it again."""
    home = tmp_path / "home"
    script = f"from rex.data.prepare import prepare_dataset; prepare_dataset('ml-100k', params={{}}, root={str(home)!r})"
    with prepare_module._build_lock(home, "ml-100k"):
        child = subprocess.Popen(
            [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )
        assert child.stderr is not None
        first = child.stderr.readline()
        assert "another process is preparing it; waiting" in first, first
        shutil.copytree(root / "ml-100k", home / "ml-100k")
    rest = child.stderr.read()
    assert child.wait(timeout=120) == 0, rest
    assert "up to date" in rest and "prepared at" not in rest and "extracting" not in rest


def test_failed_build_keeps_the_old_dataset(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_dataset("ml-100k", params={}, root=tmp_path)
    before = data_hash(tmp_path / "ml-100k")
    real = prepare_module.write_table
    calls = []

    def die_on_third_table(path: Path, table: object) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("killed")
        real(path, table)

    monkeypatch.setattr(prepare_module, "write_table", die_on_third_table)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_dataset("ml-100k", params={"ctr_max_history": 10}, root=tmp_path)
    assert data_hash(tmp_path / "ml-100k") == before
    assert load_schema(tmp_path / "ml-100k").params["ctr_max_history"] == Ml100kParams().ctr_max_history
    # _features holds the MiniLM title vectors, computed before any table is written; .locks the
    # (empty) build lock files
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "_features", "_raw", "ml-100k"]


def test_params_errors_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'beuaty' \(did you mean beauty\?\)"):
        prepare_dataset("beuaty", root=tmp_path)
    with pytest.raises(DataError, match=r"beauty.neg_raito: unknown param \(did you mean neg_ratio\?\)"):
        prepare_dataset("beauty", params={"neg_raito": 2}, root=tmp_path)
    with pytest.raises(DataError, match=r"ml-100k.split_fractions"):
        prepare_dataset("ml-100k", params={"split_fractions": [0.5, 0.1, 0.1]}, root=tmp_path)
    assert not tmp_path.joinpath("beauty").exists()


def test_params_yaml_holds_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    assert Ml100kParams.model_validate(params["ml-100k"]) == Ml100kParams()
    assert BeautyParams.model_validate(params["beauty"]) == BeautyParams()
    monkeypatch.chdir(tmp_path)
    assert load_params() == {}
    (tmp_path / "params.yaml").write_text("beauty: {neg_raito: 1}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^params.yaml: beauty.neg_raito: unknown param"):
        prepare_dataset("beauty", root=tmp_path / "data")
    (tmp_path / "params.yaml").write_text("beauty: [unclosed", encoding="utf-8")
    with pytest.raises(DataError, match=r"params.yaml: not valid YAML"):
        load_params()


def test_dvc_stages_name_existing_files() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    produced = {
        next(iter(out)) if isinstance(out, dict) else out
        for s in stages.values()
        for out in s.get("outs", [])
    }
    for name in DATASETS:
        stage = next(s for s in stages.values() if s.get("outs") == [f"data/{name}"])
        assert stage["cmd"] == f"rex data prepare {name} --force"
        assert stage["params"] == [name]
        for dep in stage["deps"]:
            # a data dependency is another stage's output; anything else is a file in the repo
            assert dep in produced if dep.startswith("data/") else (REPO / dep).exists(), dep


def test_missing_mirror_and_no_network_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("REX_DATA_MIRROR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(
        DataError, match=r"no data mirror at .*nowhere \(set REX_DATA_MIRROR\) and download of .*failed"
    ):
        prepare_dataset("beauty", params={}, root=tmp_path / "data")
    assert not (tmp_path / "data" / "beauty").exists()


def test_info_and_ensure(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REX_DATA_HOME", str(root))
    monkeypatch.chdir(root)  # no params.yaml here: the defaults apply, which root was built with
    assert ensure_dataset("beauty") == root / "beauty"
    text = dataset_info("beauty")
    assert "22,363" in text and "12,101" in text and "198,502" in text and "ctr_train" in text
    with pytest.raises(
        DataError, match=r"schema.json: dataset schema missing; run `rex data prepare ml-100k`"
    ):
        dataset_info("ml-100k", root=root / "elsewhere")


def test_repeat_rate_counts_targets_already_in_the_history(tmp_path, data_home):
    from rex.data.lance_io import write_table
    from rex.data.prepare import dataset_info, repeated_targets

    table = tmp_path / "seq_test.lance"
    history = pa.array([[1, 2, 3], [4], [], [6, 6]], type=pa.list_(pa.int64()))
    write_table(table, pa.table({"history": history, "target": pa.array([2, 5, 7, 6])}))
    assert repeated_targets(table) == (2, 4)  # rows 0 and 3; a repeat inside the history is one row
    # Beauty has none; data info says so for each evaluation split.
    info = dataset_info("beauty", root=data_home)
    assert info.count("repeat rate 0.00% (0 targets already in the history)") == 2
