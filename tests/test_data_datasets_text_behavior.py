"""The text and multi-behaviour datasets from the real mirror, and the MiniLM feature cache.

``scientific``, ``scientific_mm``, ``taobao_mb`` and ``tmall_mb`` are prepared once per module.
The MiniLM encoder is replaced there by a fast deterministic stand-in (the real one takes about a
minute and a half per dataset on 2 cores); the real encoder runs on a handful of texts, and on
one whole dataset in ``test_minilm_embeds_a_whole_dataset``. Reference values come from the raw
files, read here with plain Python.
"""

from __future__ import annotations

import json
import lzma
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rex.config.errors import DataError
from rex.data import features
from rex.data.datasets.behavior import hold_out_one_per_user
from rex.data.features import DIM, cache_paths, minilm_features, prepare_features
from rex.data.lance_io import RaggedColumn, read_columns, vector_column, write_table
from rex.data.mirror import RawSource, fetch, mirror_dir
from rex.data.prepare import prepare_dataset
from rex.data.schema import load_schema
from tests.conftest import run_rex

pytestmark = pytest.mark.skipif(
    mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)"
)

NAMES = ("scientific", "scientific_mm", "taobao_mb", "tmall_mb")


def _fake_encode(texts: list[str], batch_size: int) -> np.ndarray:
    """Unit vectors seeded by each text: deterministic and fast, as the real encoder's shape."""
    out = np.empty((len(texts), DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        seed = int.from_bytes(text.encode("utf-8")[:64].ljust(8, b"\0")[:8], "little") + len(text)
        out[row] = np.random.default_rng(seed).standard_normal(DIM)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "_encode", _fake_encode)
        for name in NAMES:
            prepare_dataset(name, params={}, root=path)
    yield path


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw mirror files, extracted independently of rex.data.mirror."""
    mirror = mirror_dir()
    assert mirror is not None
    path = tmp_path_factory.mktemp("raw")
    for archive in (
        "amazon_scientific_text_unisrec.tar.xz",
        "amazon_scientific_mm_decorec.tar.xz",
        "tmall_multibehavior_noview_mule.tar.xz",
    ):
        with tarfile.open(mirror / archive) as tar:
            tar.extractall(path, filter="data")
    with lzma.open(mirror / "taobao_multibehavior_mbcgcn.tsv.xz", "rt") as handle:
        (path / "taobao.tsv").write_text(handle.read())
    return path


def _table(root: Path, dataset: str, table: str, columns: list[str]) -> dict:
    return read_columns(root / dataset / f"{table}.lance", columns)


def _lists(column: RaggedColumn) -> list[list[int]]:
    return [column.row(i).tolist() for i in range(len(column))]


def _recbole_rows(path: Path) -> list[tuple[int, list[int], int]]:
    """(user id, history ids, target id) of a RecBole .inter file, ids = index + 1."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        user, history, target = line.split("\t")
        rows.append((int(user) + 1, [int(x) + 1 for x in history.split()], int(target) + 1))
    return rows


# ---------------------------------------------------------------- scientific (text)


@pytest.mark.parametrize(
    ("name", "folder", "users", "items", "interactions", "file_interactions"),
    [
        ("scientific", "scientific", 8442, 4385, 59427, 59384),
        ("scientific_mm", "scientific_mm", 2928, 1585, 19712, 19712),
    ],
)
def test_scientific_counts_and_the_given_split(
    root: Path,
    raw: Path,
    name: str,
    folder: str,
    users: int,
    items: int,
    interactions: int,
    file_interactions: int,
) -> None:
    schema = load_schema(root / name)
    assert (schema.num_users, schema.num_items) == (users + 1, items + 1)
    assert schema.counts["interactions"] == interactions
    # PROVENANCE counts the test file's rows, whose histories RecBole cut to 50 items.
    assert schema.counts["test_file_interactions"] == file_interactions

    for split in ("valid", "test"):
        given = _recbole_rows(raw / folder / f"Scientific.{split}.inter")
        got = _table(root, name, f"seq_{split}", ["user", "history", "target"])
        assert got["user"].tolist() == [u for u, _, _ in given]
        assert got["target"].tolist() == [t for _, _, t in given]
        cap = max(len(h) for _, h, _ in given)
        assert [h[-cap:] for h in _lists(got["history"])] == [h for _, h, _ in given]

    # Training rows: every given (history, target) is a prefix step of the user's train sequence.
    train = _table(root, name, "seq_train", ["user", "items"])
    sequences = dict(zip(train["user"].tolist(), _lists(train["items"]), strict=True))
    given_train = _recbole_rows(raw / folder / "Scientific.train.inter")
    steps = defaultdict(int)
    for user, history, target in given_train:
        steps[user] += 1
        position = len(sequences[user]) - steps[user]  # newest first in the file
        assert sequences[user][position] == target
        assert sequences[user][:position][-len(history) :] == history
    assert all(steps[u] == len(s) - 1 for u, s in sequences.items())


def test_scientific_items_hold_unit_text_vectors(root: Path, raw: Path) -> None:
    schema = load_schema(root / "scientific")
    field = schema.views["items"].fields["text_minilm"]
    assert (field.kind, field.dim, field.role) == ("vector", DIM, "modality:text")
    got = _table(root, "scientific", "items", ["item", "text_minilm"])
    vectors = got["text_minilm"]
    assert vectors.shape == (4385, DIM) and vectors.dtype == np.float32
    assert got["item"].tolist() == list(range(1, 4386))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Row of item id i is the text of item index i - 1 (ASIN via item2index).
    asins = [
        line.split("\t")[0] for line in (raw / "scientific/Scientific.item2index").read_text().splitlines()
    ]
    texts = dict(
        line.split("\t", 1) for line in (raw / "scientific/Scientific.text").read_text().splitlines()[1:]
    )
    expected = _fake_encode([texts[asins[i]].strip() for i in (0, 17, 4384)], 8)
    np.testing.assert_allclose(vectors[[0, 17, 4384]], expected, atol=1e-6)


def test_scientific_mm_modalities_and_ctr(root: Path, raw: Path) -> None:
    schema = load_schema(root / "scientific_mm")
    fields = schema.views["items"].fields
    assert {n: (f.kind, f.dim) for n, f in fields.items() if f.kind == "vector"} == {
        "text": ("vector", 512),
        "image": ("vector", 512),
        "text_minilm": ("vector", DIM),
    }
    got = _table(root, "scientific_mm", "items", ["item", "text", "image", "text_minilm"])
    for column, suffix in (("text", "feat1CLS"), ("image", "feat3CLS")):
        shipped = np.fromfile(raw / f"scientific_mm/Scientific.{suffix}", dtype=np.float32).reshape(1585, 512)
        assert got[column].dtype == np.float32
        np.testing.assert_array_equal(got[column], shipped)
    assert got["text_minilm"].shape == (1585, DIM)

    # DIN-style ctr: each position >= 1 is a positive, with one sampled negative never touched.
    whole = _table(root, "scientific_mm", "seq_test", ["user", "history", "target"])
    touched = {
        u: set(h) | {t}
        for u, h, t in zip(whole["user"], _lists(whole["history"]), whole["target"], strict=True)
    }
    total = 0
    for split in ("train", "valid", "test"):
        ctr = _table(root, "scientific_mm", f"ctr_{split}", ["user", "item", "label", "history"])
        label = ctr["label"]
        assert label[::2].tolist() == [1.0] * (len(label) // 2) and not label[1::2].any()
        negatives = zip(ctr["user"][1::2].tolist(), ctr["item"][1::2].tolist(), strict=True)
        assert all(item not in touched[user] for user, item in negatives)
        total += len(label) // 2
    assert total == 19712 - 2928 == schema.counts["ctr_positives"]


# ---------------------------------------------------------------- MiniLM and its cache


def test_minilm_gives_deterministic_unit_vectors(tmp_path: Path) -> None:
    texts = ["Gorilla Glue, waterproof, 8 ounce.", "Sanding roll, 80 grit.", "3D printer filament, 1.75mm"]
    first = features._encode(texts, batch_size=2)
    assert first.shape == (3, DIM) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(features._encode(texts, batch_size=3), first, atol=1e-6)
    cached = minilm_features("toy", texts, tmp_path)
    np.testing.assert_allclose(cached, first, atol=1e-6)


def test_feature_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def counting(texts: list[str], batch_size: int) -> np.ndarray:
        calls.append(texts)
        return _fake_encode(texts, batch_size)

    monkeypatch.setattr(features, "_encode", counting)
    texts = ["a red pen", "a blue pen"]
    first = minilm_features("toy", texts, tmp_path, batch_size=1)
    array_path, key_path = cache_paths("toy", tmp_path)
    assert array_path.is_file() and key_path.is_file() and len(calls) == 1
    key = json.loads(key_path.read_text())
    assert key["model"] == "sentence-transformers/all-MiniLM-L6-v2" and key["rows"] == 2

    def failing(texts: list[str], batch_size: int) -> np.ndarray:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(features, "_encode", failing)
    np.testing.assert_array_equal(minilm_features("toy", texts, tmp_path, batch_size=7), first)

    monkeypatch.setattr(features, "_encode", counting)
    changed = minilm_features("toy", ["a red pen", "a green pen"], tmp_path)
    assert len(calls) == 2 and not np.array_equal(changed, first)
    # A key that no longer matches its array (a write cut between the two renames) is no cache.
    np.save(array_path, first)
    minilm_features("toy", ["a red pen", "a green pen"], tmp_path)
    assert len(calls) == 3
    minilm_features("toy", ["a red pen", "a green pen"], tmp_path, force=True)
    assert len(calls) == 4
    assert not list(tmp_path.glob("*.tmp-*"))


def test_features_of_a_dataset_without_text_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no item texts"):
        prepare_features("taobao_mb", root=tmp_path)
    result = run_rex("data", "features", "nope", env={"REX_DATA_HOME": str(tmp_path)})
    assert result.returncode == 2 and "has no item texts" in result.stderr


def test_minilm_embeds_a_whole_dataset(tmp_path: Path) -> None:
    """The real encoder over scientific_mm's 1,585 texts (about 40 s on 2 cores), twice: once encoded."""
    path = prepare_features("scientific_mm", root=tmp_path)
    vectors = np.load(path)
    assert vectors.shape == (1585, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    stamp = path.stat().st_mtime_ns
    assert prepare_features("scientific_mm", root=tmp_path) == path and path.stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- multi-behaviour


def _pairs_of(table: dict) -> set[tuple[int, int]]:
    return set(zip(table["user"].tolist(), table["target"].tolist(), strict=True))


def test_taobao_counts_splits_and_containment(root: Path, raw: Path) -> None:
    rows: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for line in (raw / "taobao.tsv").read_text().splitlines()[1:]:
        user, item, behavior, split = line.split("\t")
        rows[behavior, split].append((int(user) + 1, int(item) + 1))
    schema = load_schema(root / "taobao_mb")
    counts = schema.counts
    assert (schema.num_users, schema.num_items) == (15449 + 1, 11953 + 1)
    assert (counts["view_rows"], counts["cart_rows"], counts["buy_rows"]) == (
        858505 + 15449,
        180027 + 15449,
        92180 + 15449,
    )
    # The data does not nest buy in cart in view: these are the real overlaps.
    assert (counts["buy_in_view"], counts["buy_in_cart"], counts["cart_in_view"]) == (87508, 22542, 127978)
    pairs = {b: set(rows[b, "train"]) | set(rows[b, "test"]) for b in ("view", "cart", "buy")}
    assert counts["buy_in_view"] == len(pairs["buy"] & pairs["view"])

    test = _table(root, "taobao_mb", "seq_test", ["user", "history", "target"])
    valid = _table(root, "taobao_mb", "seq_valid", ["user", "history", "target"])
    train = _table(root, "taobao_mb", "seq_train", ["user", "items"])
    assert _pairs_of(test) == set(rows["buy", "test"])
    train_pairs = {
        (u, i) for u, items in zip(train["user"], _lists(train["items"]), strict=True) for i in items
    }
    valid_pairs = _pairs_of(valid)
    assert len(valid_pairs) == 15449 == len(set(valid["user"].tolist()))
    assert not valid_pairs & train_pairs and train_pairs | valid_pairs == set(rows["buy", "train"])
    # Histories: valid sees the training buys, test also the validation buy; file (item-id) order.
    by_user = dict(zip(train["user"].tolist(), _lists(train["items"]), strict=True))
    assert all(h == by_user[u] for u, h in zip(valid["user"].tolist(), _lists(valid["history"]), strict=True))
    full = {
        u: sorted(set(by_user[u]) | {t})
        for u, t in zip(valid["user"].tolist(), valid["target"].tolist(), strict=True)
    }
    assert all(h == full[u] for u, h in zip(test["user"].tolist(), _lists(test["history"]), strict=True))
    seq_fields = schema.views["sequence"].fields
    assert seq_fields["history_view"].role == seq_fields["history_cart"].role == "behavior"
    assert "no timestamps" in (schema.views["sequence"].order or "")
    aux = _table(root, "taobao_mb", "seq_test", ["user", "history_view"])
    user = int(aux["user"][0])
    assert aux["history_view"].row(0).tolist() == [i for u, i in sorted(pairs["view"]) if u == user]


def test_validation_hold_out_is_seeded() -> None:
    users = np.array([3, 1, 3, 2, 3, 1, 4, 3, 1, 2] * 50 + [5])
    first = hold_out_one_per_user(users, seed=7)
    np.testing.assert_array_equal(hold_out_one_per_user(users, seed=7), first)
    assert any(not np.array_equal(hold_out_one_per_user(users, seed=s), first) for s in (8, 9, 10))
    # Exactly one row of each user with two or more; none of user 5, who has one.
    assert sorted(users[first].tolist()) == [1, 2, 3, 4]


def test_taobao_ctr_labels_and_histories(root: Path) -> None:
    schema = load_schema(root / "taobao_mb")
    labels = ["label_view", "label_cart", "label_buy"]
    assert [f for f in schema.views["ctr"].fields if f.startswith("label_")] == labels
    seq_test = _table(root, "taobao_mb", "seq_test", ["user", "history", "target"])
    seq_valid = _table(root, "taobao_mb", "seq_valid", ["user", "history", "target"])
    positives = 0
    for split, held_out in (("test", seq_test), ("valid", seq_valid), ("train", None)):
        ctr = _table(root, "taobao_mb", f"ctr_{split}", ["user", "item", "history", "label", *labels])
        np.testing.assert_array_equal(ctr["label"], ctr["label_buy"])
        anchors, negatives = slice(0, None, 2), slice(1, None, 2)
        assert not any(ctr[name][negatives].any() for name in labels)
        assert all(ctr[name][anchors].dtype == np.float32 for name in labels)
        # Every split asks the same question: each anchor is a buy. No history holds its row's item.
        assert ctr["label_buy"][anchors].all()
        item, history = ctr["item"], ctr["history"]
        row_of = np.repeat(np.arange(len(item)), history.lengths())
        assert not (history.values == item[row_of]).any()
        if held_out is not None:
            anchor_pairs = set(zip(ctr["user"][anchors].tolist(), item[anchors].tolist(), strict=True))
            assert anchor_pairs == _pairs_of(held_out)
        positives += len(item) // 2
    # Some buys were also viewed: the shallow labels of anchors are kept, not forced to 0.
    assert ctr["label_view"][anchors].any()
    assert positives == schema.counts["ctr_positives"] == schema.counts["buy_pairs"] == 107629


def test_tmall_counts_and_given_valid_test(root: Path, raw: Path) -> None:
    def read(name: str) -> list[tuple[int, int]]:
        return [
            tuple(map(int, line.split())) for line in (raw / "tmall" / f"{name}.txt").read_text().splitlines()
        ]

    schema = load_schema(root / "tmall_mb")
    counts = schema.counts
    assert (counts["collect_rows"], counts["cart_rows"]) == (221514, 1996)
    assert (counts["train_buys"], counts["valid_buys"], counts["test_buys"]) == (255586 - 74158, 74158, 31572)
    assert (counts["buy_in_collect"], counts["buy_in_cart"], counts["cart_in_collect"]) == (28961, 345, 145)
    # Tmall's ids are already 1..N over the users and items that occur: rex keeps them.
    everything = [p for name in ("train", "valid", "test", "collect", "cart") for p in read(name)]
    assert schema.num_items == max(i for _, i in everything) + 1
    users = sorted({u for u, _ in everything})
    assert schema.num_users == len(users) + 1
    rex_user = {u: k + 1 for k, u in enumerate(users)}

    valid = _table(root, "tmall_mb", "seq_valid", ["user", "target"])
    test = _table(root, "tmall_mb", "seq_test", ["user", "target"])
    train = _table(root, "tmall_mb", "seq_train", ["user", "items"])
    assert _pairs_of(valid) == {(rex_user[u], i) for u, i in read("valid")}
    assert _pairs_of(test) == {(rex_user[u], i) for u, i in read("test")}
    train_pairs = {
        (u, i) for u, items in zip(train["user"], _lists(train["items"]), strict=True) for i in items
    }
    assert not train_pairs & _pairs_of(valid) and not train_pairs & _pairs_of(test)
    assert train_pairs | _pairs_of(valid) == {(rex_user[u], i) for u, i in read("train")}
    fields = schema.views["sequence"].fields
    assert {n for n, f in fields.items() if f.role == "behavior"} == {"history_collect", "history_cart"}


def test_single_compressed_file_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    payload = b"user_id\titem_id\n1\t2\n"
    (mirror / "toy.tsv.xz").write_bytes(lzma.compress(payload))
    monkeypatch.setenv("REX_DATA_MIRROR", str(mirror))
    source = RawSource("toy.tsv.xz", hashlib.sha256((mirror / "toy.tsv.xz").read_bytes()).hexdigest())
    assert (source.stem, source.single_file) == ("toy", "toy.tsv")
    out = fetch(source, tmp_path / "cache")
    assert out == tmp_path / "cache" / "toy" and (out / "toy.tsv").read_bytes() == payload
    # Without the mirror a derived file has nothing to download.
    monkeypatch.setenv("REX_DATA_MIRROR", str(tmp_path / "none"))
    with pytest.raises(DataError, match="no upstream files to download"):
        fetch(source, tmp_path / "other")


def test_vector_columns_round_trip_as_2d_arrays(tmp_path: Path) -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    write_table(tmp_path / "t.lance", pa.table({"item": pa.array([1, 2, 3, 4]), "v": vector_column(vectors)}))
    got = read_columns(tmp_path / "t.lance", ["v"])["v"]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, vectors)
    with pytest.raises(ValueError, match="rows x dim"):
        vector_column(np.zeros(3))


def test_ragged_columns_concatenate() -> None:
    joined = RaggedColumn.concat([RaggedColumn.from_lists([[1], [2, 3]]), RaggedColumn.from_lists([[], [4]])])
    assert _lists(joined) == [[1], [2, 3], [], [4]]
