"""The ml-1m, sports, frappe and amazon_multidomain builders on the real mirror data.

Reference values come from PROVENANCE.md or are recomputed here with plain Python from the raw
files, independently of the vectorised builders.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rex.config.errors import DataError
from rex.data.build import random_split
from rex.data.lance_io import read_columns
from rex.data.mirror import fetch, mirror_dir, sha256_file
from rex.data.prepare import DATASETS, prepare_dataset
from rex.data.schema import load_schema
from rex.engine.train import train

REPO = Path(__file__).resolve().parents[1]
NAMES = ("ml-1m", "sports", "frappe", "amazon_multidomain")
CTR = ("ctr_train", "ctr_valid", "ctr_test")

pytestmark = pytest.mark.skipif(
    mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared copy of each dataset, with default params, shared by this module."""
    path = tmp_path_factory.mktemp("data")
    for name in NAMES:
        prepare_dataset(name, params={}, root=path)
    return path


def _ctr(root: Path, dataset: str, columns: list[str]) -> dict[str, dict]:
    return {t: read_columns(root / dataset / f"{t}.lance", columns) for t in CTR}


def _raw(root: Path, dataset: str) -> Path:
    return root / "_raw" / DATASETS[dataset].source.stem


@pytest.mark.parametrize("dataset", ["ml-1m", "frappe", "amazon_multidomain"])
def test_sources_match_their_member_checksums(root: Path, dataset: str) -> None:
    source = DATASETS[dataset].source
    out = fetch(source, root / "_raw")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        m.path for m in source.members
    )
    for member in source.members:
        assert sha256_file(out / member.path) == member.sha256, member.path
        assert member.url.startswith("https://github.com/") and "/raw/" in member.url


# ---------------------------------------------------------------- ml-1m


@pytest.fixture(scope="module")
def ml1m_raw(root: Path) -> list[tuple[int, int]]:
    """The raw (user, movie) pairs in file order, movies renumbered 1..N in id order."""
    table = pq.read_table(_raw(root, "ml-1m") / "ml-1m" / "ratings.parquet").to_pydict()
    users, movies = [int(u) for u in table["userID"]], [int(m) for m in table["movieID"]]
    movie_id = {m: i + 1 for i, m in enumerate(sorted(set(movies)))}
    return [(u, movie_id[m]) for u, m in zip(users, movies, strict=True)]


@pytest.fixture(scope="module")
def ml1m_pairs(ml1m_raw: list[tuple[int, int]]) -> set[tuple[int, int]]:
    return set(ml1m_raw)


def test_ml1m_counts_and_schema(root: Path) -> None:
    schema = load_schema(root / "ml-1m")
    counts = schema.counts
    assert (counts["raw_users"], counts["raw_items"], counts["raw_interactions"]) == (6_040, 3_706, 1_000_209)
    assert (counts["users_metadata"], counts["movies_metadata"]) == (6_040, 3_883)
    assert (counts["users"], counts["items"], counts["interactions"]) == (6_040, 3_706, 1_000_209)
    assert (schema.num_users, schema.num_items) == (6_041, 3_707)
    assert schema.protocol == "random_split" and list(schema.views) == ["ctr"]
    view = schema.views["ctr"]
    assert view.protocol == "random_split"
    assert "history" not in view.fields  # no timestamps, so no order to build a history from
    sizes = {name: spec.vocab_size for name, spec in view.fields.items() if spec.role is None}
    assert sizes == {"age": 8, "gender": 3, "occupation": 22, "zip": 679, "release_year": 82, "genre": 19}
    n = 1_000_209
    n_train, n_valid = round(0.8 * n), round(0.1 * n)  # each positive is followed by one negative
    assert [schema.tables[t] for t in CTR] == [2 * n_train, 2 * n_valid, 2 * (n - n_train - n_valid)]


def test_ml1m_split_partitions_the_pairs_and_negatives_are_unseen(
    root: Path, ml1m_pairs: set[tuple[int, int]]
) -> None:
    tables = _ctr(root, "ml-1m", ["user", "item", "label"])
    positives: list[set[tuple[int, int]]] = []
    for table in tables.values():
        labels, users, items = table["label"], table["user"], table["item"]
        np.testing.assert_array_equal(labels[0::2], 1.0)
        np.testing.assert_array_equal(labels[1::2], 0.0)
        np.testing.assert_array_equal(users[0::2], users[1::2])
        pairs = set(zip(users[0::2].tolist(), items[0::2].tolist(), strict=True))
        assert len(pairs) == len(labels) // 2
        negatives = set(zip(users[1::2].tolist(), items[1::2].tolist(), strict=True))
        assert not negatives & ml1m_pairs, "a negative the user interacted with"
        assert items.min() >= 1 and items.max() <= 3_706
        positives.append(pairs)
    train, valid, test = positives
    assert not (train & valid or train & test or valid & test)
    assert train | valid | test == ml1m_pairs


def test_ml1m_features_are_the_metadata(root: Path) -> None:
    raw = _raw(root, "ml-1m") / "ml-1m"
    users = [line.split("::") for line in (raw / "users.dat").read_text().splitlines()]
    movies = [line.split("::") for line in (raw / "movies.dat").read_text(encoding="latin-1").splitlines()]
    gender = {int(u[0]): u[1] for u in users}
    zips = sorted({u[4][:3] for u in users})
    zip_code = {int(u[0]): zips.index(u[4][:3]) + 1 for u in users}
    genres = sorted({m[2].split("|")[0] for m in movies})
    table = read_columns(
        root / "ml-1m" / "ctr_test.lance", ["user", "item", "gender", "zip", "genre", "release_year"]
    )
    for r in range(0, len(table["user"]), 997):
        user = int(table["user"][r])
        assert table["gender"][r] == (1 if gender[user] == "F" else 2)
        assert table["zip"][r] == zip_code[user]
        assert 1 <= table["genre"][r] < len(genres) + 1 and table["release_year"][r] >= 1
    # Movie 1 (Toy Story, 1995) is item 1: Animation is the first genre of the sorted list.
    at = np.flatnonzero(table["item"] == 1)
    assert len(at) and (table["genre"][at] == genres.index("Animation") + 1).all()


def test_random_split_is_seeded() -> None:
    split = random_split(1_000_209, (0.8, 0.1, 0.1), seed=2024)
    assert np.bincount(split).tolist() == [800_167, 100_021, 100_021]
    np.testing.assert_array_equal(split, random_split(1_000_209, (0.8, 0.1, 0.1), seed=2024))
    other = random_split(1_000_209, (0.8, 0.1, 0.1), seed=7)
    assert np.bincount(other).tolist() == [800_167, 100_021, 100_021] and (other != split).mean() > 0.2
    assert np.bincount(random_split(10, (0.5, 0.5, 0.0), seed=1), minlength=3).tolist() == [5, 5, 0]


def test_ml1m_split_is_the_seeded_split_of_the_pairs(root: Path, ml1m_raw: list[tuple[int, int]]) -> None:
    split = random_split(len(ml1m_raw), (0.8, 0.1, 0.1), seed=2024)
    for code, table in enumerate(_ctr(root, "ml-1m", ["user", "item"]).values()):
        expected = np.array(ml1m_raw)[split == code]
        np.testing.assert_array_equal(table["user"][0::2], expected[:, 0])
        np.testing.assert_array_equal(table["item"][0::2], expected[:, 1])


# ---------------------------------------------------------------- sports


def test_sports_counts_sequences_and_negatives(root: Path) -> None:
    schema = load_schema(root / "sports")
    counts = schema.counts
    assert (counts["raw_users"], counts["raw_items"], counts["raw_interactions"]) == (35_598, 18_357, 296_337)
    assert (counts["users"], counts["items"], counts["interactions"]) == (35_598, 18_357, 296_337)
    assert (schema.num_users, schema.num_items) == (35_599, 18_358)
    sequences = {}
    for line in (_raw(root, "sports") / "s3rec" / "Sports_and_Outdoors.txt").read_text().splitlines():
        user, *items = map(int, line.split())
        sequences[user] = items
    test = read_columns(root / "sports" / "seq_test.lance", ["user", "history", "target"])
    got = {
        int(u): test["history"].row(r).tolist() + [int(test["target"][r])] for r, u in enumerate(test["user"])
    }
    assert got == sequences
    lengths = np.array([len(s) for s in sequences.values()])
    tables = _ctr(root, "sports", ["user", "item", "label", "history"])
    expected = {"ctr_train": int((lengths - 3).sum()), "ctr_valid": 35_598, "ctr_test": 35_598}
    for name, table in tables.items():
        users, items = table["user"], table["item"]
        assert int(table["label"].sum()) == expected[name] == len(users) // 2
        assert not any(int(i) in sequences[int(u)] for u, i in zip(users[1::2], items[1::2], strict=True))
    attributes = json.loads(
        (_raw(root, "sports") / "s3rec" / "Sports_and_Outdoors_item2attributes.json").read_text()
    )
    assert counts["num_attributes"] == max(a for v in attributes.values() for a in v) + 1


# ---------------------------------------------------------------- frappe


FRAPPE_VOCAB = {
    "user": 914,
    "item": 4_083,
    "daytime": 8,
    "weekday": 8,
    "isweekend": 3,
    "homework": 4,
    "cost": 3,
    "weather": 10,
    "country": 77,
    "city": 228,
}


@pytest.fixture(scope="module")
def frappe_rows(root: Path) -> Counter[tuple[int, ...]]:
    """The raw rows of both files, each field renumbered 1..K in id order, label last (0/1)."""
    parsed = []
    for part in ("validation", "test"):
        for line in (_raw(root, "frappe") / "frappe" / f"frappe.{part}.libfm").read_text().splitlines():
            label, *features = line.split()
            parsed.append(([int(f.split(":")[0]) for f in features], int(label == "1")))
    per_field = [sorted({ids[j] for ids, _ in parsed}) for j in range(10)]
    index = [{v: i + 1 for i, v in enumerate(values)} for values in per_field]
    return Counter(tuple(index[j][ids[j]] for j in range(10)) + (label,) for ids, label in parsed)


def test_frappe_counts_fields_and_labels(root: Path) -> None:
    schema = load_schema(root / "frappe")
    counts = schema.counts
    assert (counts["raw_rows_validation"], counts["raw_rows_test"], counts["raw_rows"]) == (
        57_722,
        28_860,
        86_582,
    )
    assert (counts["positives"], counts["negatives"], counts["duplicate_rows"]) == (28_599, 57_983, 2)
    view = schema.views["ctr"]
    assert {n: s.vocab_size for n, s in view.fields.items() if s.kind == "categorical"} == FRAPPE_VOCAB
    assert (view.fields["user"].role, view.fields["item"].role, view.fields["label"].role) == (
        "user",
        "item",
        "label",
    )
    assert "history" not in view.fields and view.protocol == schema.protocol == "random_split"
    assert (schema.num_users, schema.num_items) == (914, 4_083)
    assert [schema.tables[t] for t in CTR] == [
        round(0.8 * 86_582),
        round(0.1 * 86_582),
        86_582 - 69_266 - 8_658,
    ]
    for table in _ctr(root, "frappe", [*FRAPPE_VOCAB, "label"]).values():
        assert table["label"].dtype == np.float32 and set(np.unique(table["label"])) == {0.0, 1.0}
        for name, size in FRAPPE_VOCAB.items():
            assert table[name].min() >= 1 and table[name].max() < size


def test_frappe_splits_partition_the_raw_rows(root: Path, frappe_rows: Counter[tuple[int, ...]]) -> None:
    got: Counter[tuple[int, ...]] = Counter()
    for table in _ctr(root, "frappe", [*FRAPPE_VOCAB, "label"]).values():
        matrix = np.column_stack([table[n] for n in FRAPPE_VOCAB] + [table["label"].astype(np.int64)])
        got.update(map(tuple, matrix.tolist()))
    assert got == frappe_rows


def test_frappe_split_is_seeded(root: Path, tmp_path: Path) -> None:
    prepare_dataset("frappe", params={"split_seed": 2024}, root=tmp_path / "same")
    prepare_dataset("frappe", params={"split_seed": 1}, root=tmp_path / "other")
    columns = ["user", "item", "city", "label"]
    base, same, other = (
        _ctr(r, "frappe", columns)["ctr_test"] for r in (root, tmp_path / "same", tmp_path / "other")
    )
    for name in columns:
        np.testing.assert_array_equal(base[name], same[name])
    assert not all(np.array_equal(base[n], other[n]) for n in columns)
    with pytest.raises(DataError, match=r"frappe.split_fractions"):
        prepare_dataset("frappe", params={"split_fractions": [0.9, 0.2, 0.0]}, root=tmp_path / "bad")


# ---------------------------------------------------------------- amazon_multidomain


@pytest.fixture(scope="module")
def gram(root: Path) -> dict[int, dict[str, list[str]]]:
    """Domain code -> reviewer ID -> chronological ASINs, from the raw files."""
    out = {}
    for code, stem in ((1, "Beauty"), (2, "Sports")):
        text = (_raw(root, "amazon_multidomain") / "gram" / f"{stem}_user_sequence.txt").read_text()
        out[code] = {words[0]: words[1:] for words in (line.split() for line in text.splitlines())}
    return out


def test_multidomain_counts(root: Path, gram: dict[int, dict[str, list[str]]]) -> None:
    counts = load_schema(root / "amazon_multidomain").counts
    for label, code, expected in (
        ("beauty", 1, (22_363, 12_101, 198_502)),
        ("sports", 2, (35_598, 18_357, 296_337)),
    ):
        got = (
            counts[f"raw_{label}_users"],
            counts[f"raw_{label}_items"],
            counts[f"raw_{label}_interactions"],
        )
        assert got == expected
        seqs = gram[code]
        assert (
            len(seqs),
            len({a for s in seqs.values() for a in s}),
            sum(map(len, seqs.values())),
        ) == expected
    both = set(gram[1]) & set(gram[2])
    assert counts["users_in_both_domains"] == counts["raw_users_in_both_domains"] == len(both) == 1_625
    assert counts["raw_users"] == len(set(gram[1]) | set(gram[2])) == 56_336
    assert counts["raw_items"] == 12_101 + 18_357 and counts["asins_in_both_domains"] == 0
    assert counts["sequences"] == 22_363 + 35_598 and counts["dropped_sequences_short"] == 0


def test_multidomain_ctr_rows(root: Path, gram: dict[int, dict[str, list[str]]]) -> None:
    schema = load_schema(root / "amazon_multidomain")
    view = schema.views["ctr"]
    assert (view.fields["domain"].role, view.fields["domain"].vocab_size) == ("scenario", 3)
    user_id = {r: i + 1 for i, r in enumerate(sorted(set(gram[1]) | set(gram[2])))}
    keys = sorted(
        f"{code}:{asin}" for code, seqs in gram.items() for asin in {a for s in seqs.values() for a in s}
    )
    item_id = {key: i + 1 for i, key in enumerate(keys)}
    seqs = {
        (user_id[r], code): [item_id[f"{code}:{a}"] for a in asins]
        for code, per_user in gram.items()
        for r, asins in per_user.items()
    }
    tables = _ctr(root, "amazon_multidomain", ["user", "item", "domain", "label", "history"])
    n_seqs = len(seqs)
    expected = {"ctr_train": sum(len(s) - 3 for s in seqs.values()), "ctr_valid": n_seqs, "ctr_test": n_seqs}
    for name, table in tables.items():
        users, items, domain, history = table["user"], table["item"], table["domain"], table["history"]
        assert int(table["label"].sum()) == expected[name] == len(users) // 2
        np.testing.assert_array_equal(table["label"][1::2], 0.0)
        np.testing.assert_array_equal(domain[0::2], domain[1::2])
        in_beauty = (items >= 1) & (items <= 12_101)
        np.testing.assert_array_equal(in_beauty, domain == 1)  # negatives from the positive's domain
        for r in range(0, len(users), 2):
            seq = seqs[(int(users[r]), int(domain[r]))]
            assert int(items[r + 1]) not in seq
            if r % 50 == 0:
                position = seq.index(int(items[r]))
                assert history.row(r).tolist() == seq[max(0, position - 50) : position]
                assert history.row(r + 1).tolist() == history.row(r).tolist()
        if name != "ctr_train":
            back = 1 if name == "ctr_test" else 2
            got = {
                (int(u), int(d)): int(i)
                for u, d, i in zip(users[0::2], domain[0::2], items[0::2], strict=True)
            }
            assert got == {key: s[-back] for key, s in seqs.items()}


def test_multidomain_negatives_follow_neg_ratio_and_seed(root: Path, tmp_path: Path) -> None:
    prepare_dataset("amazon_multidomain", params={"neg_ratio": 2, "neg_seed": 5}, root=tmp_path)
    base = _ctr(root, "amazon_multidomain", ["item"])["ctr_test"]["item"]
    got = _ctr(tmp_path, "amazon_multidomain", ["item", "label"])["ctr_test"]
    np.testing.assert_array_equal(got["item"][0::3], base[0::2])  # the same positives
    np.testing.assert_array_equal(got["label"].reshape(-1, 3), np.tile([1.0, 0.0, 0.0], (len(base) // 2, 1)))
    assert (got["item"][1::3] != base[1::2]).mean() > 0.9  # other negatives


# ---------------------------------------------------------------- the training path


SMOKE = [
    "train.max_epochs=1",
    "train.limit_train_batches=3",
    "train.limit_eval_batches=2",
    "logging.progress_bar=false",
]


@pytest.mark.parametrize(
    ("recipe", "dataset", "extra"),
    [
        ("deepfm", "ml-1m", []),  # ml-1m has ml-100k's feature names
        ("deepfm", "frappe", ["model.use_fields=null"]),
        ("din", "sports", []),
        ("din", "amazon_multidomain", []),
    ],
)
def test_trains_on_a_slice(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str, dataset: str, extra: list[str]
) -> None:
    monkeypatch.setenv("REX_DATA_HOME", str(root))
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults apply, which root was built with
    run_dir = train(
        REPO / "recipes" / f"{recipe}.yaml",
        [f"data.name={dataset}", *extra, *SMOKE, f"logging.run_root={tmp_path / 'runs'}"],
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"] and all(math.isfinite(v) for v in metrics["test"].values())
