"""tmall_mb's retrieval views on the real data: buy's held-out items are MuLE's given valid/test
buys (several per user, a row each); collect and cart hold out one seeded item per user for test
and another for validation; no held-out pair is trained on or in a list of its split. Reference
pairs come from the raw files, read here with plain Python."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from rex.data.lance_io import read_columns
from rex.data.mirror import mirror_dir
from rex.data.prepare import prepare_dataset
from tests.test_two_tower import _keys, _list_keys

pytestmark = pytest.mark.skipif(
    mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)"
)

BEHAVIORS = ("collect", "cart", "buy")


@pytest.fixture(scope="module")
def tables(data_home: Path) -> dict[str, dict]:
    """The retrieval tables of tmall_mb, prepared in the session's data home."""
    prepare_dataset("tmall_mb", root=data_home)
    directory = data_home / "tmall_mb"
    lists = [f"history_{b}" for b in BEHAVIORS]
    targets = [f"target_{b}" for b in BEHAVIORS]
    return {
        "train": read_columns(directory / "ret_train.lance", ["user", "item", "objective"]),
        "users": read_columns(directory / "ret_users.lance", ["user", *lists]),
        "valid": read_columns(directory / "ret_valid.lance", ["user", *lists, *targets]),
        "test": read_columns(directory / "ret_test.lance", ["user", *lists, *targets]),
        **{
            b: read_columns(directory / f"ret_train_{b}.lance", ["user", "item", "objective"])
            for b in BEHAVIORS
        },
    }


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Each raw file's (user, item) keys in rex ids (Tmall's items are already 1..N; its users
    become 1..N in id order), extracted independently of rex.data.mirror."""
    mirror = mirror_dir()
    assert mirror is not None
    path = tmp_path_factory.mktemp("tmall_raw")
    with tarfile.open(mirror / "tmall_multibehavior_noview_mule.tar.xz") as tar:
        tar.extractall(path, filter="data")
    files = {
        name: np.loadtxt(path / "tmall" / f"{name}.txt", dtype=np.int64).reshape(-1, 2)
        for name in ("collect", "cart", "train", "valid", "test")
    }
    users = np.unique(np.concatenate([pairs[:, 0] for pairs in files.values()]))
    return {
        name: _keys(np.searchsorted(users, pairs[:, 0]) + 1, pairs[:, 1]) for name, pairs in files.items()
    }


def _held(split: dict, behavior: str) -> np.ndarray:
    has = split[f"target_{behavior}"] > 0
    return _keys(split["user"][has], split[f"target_{behavior}"][has])


def _users_with(keys: np.ndarray, at_least: int) -> np.ndarray:
    users, counts = np.unique(keys // 100_000, return_counts=True)
    return users[counts >= at_least]


def test_buy_holds_out_the_given_valid_and_test_buys(tables: dict, raw: dict) -> None:
    valid, test = _held(tables["valid"], "buy"), _held(tables["test"], "buy")
    np.testing.assert_array_equal(np.sort(test), np.sort(raw["test"]))
    np.testing.assert_array_equal(np.sort(valid), np.sort(raw["valid"]))
    train = tables["buy"]
    np.testing.assert_array_equal(
        np.sort(_keys(train["user"], train["item"])), np.setdiff1d(raw["train"], raw["valid"])
    )
    # Several test buys of a user are rows of their own, each with the user's same lists.
    assert len(tables["test"]["user"]) > len(np.unique(tables["test"]["user"]))


@pytest.mark.parametrize("behavior", ["collect", "cart"])
def test_collect_and_cart_hold_out_one_seeded_item_per_user(tables: dict, raw: dict, behavior: str) -> None:
    valid, test = _held(tables["valid"], behavior), _held(tables["test"], behavior)
    train = tables[behavior]
    train_keys = _keys(train["user"], train["item"])
    # Test: one item of every user with two or more; validation: one of every user with two or
    # more left, i.e. three or more; together with training, exactly the file's pairs.
    np.testing.assert_array_equal(np.sort(test // 100_000), _users_with(raw[behavior], 2))
    np.testing.assert_array_equal(np.sort(valid // 100_000), _users_with(raw[behavior], 3))
    np.testing.assert_array_equal(np.sort(np.concatenate([train_keys, valid, test])), np.sort(raw[behavior]))


def test_no_held_out_pair_is_trained_on_or_listed_in_its_split(tables: dict) -> None:
    train, users = tables["train"], tables["users"]
    np.testing.assert_array_equal(users["user"], np.arange(len(users["user"])))
    for k, behavior in enumerate(BEHAVIORS, start=1):
        rows = train["objective"] == k
        train_keys = _keys(train["user"][rows], train["item"][rows])
        one = tables[behavior]
        np.testing.assert_array_equal(_keys(one["user"], one["item"]), train_keys)
        assert (one["objective"] == k).all()
        lists = users[f"history_{behavior}"]
        np.testing.assert_array_equal(np.sort(_list_keys(lists, users["user"])), np.sort(train_keys))
        held = {split: _held(tables[split], behavior) for split in ("valid", "test")}
        for split, keys in held.items():
            table = tables[split]
            listed = np.unique(_list_keys(table[f"history_{behavior}"], table["user"]))
            assert not np.isin(keys, train_keys).any()
            assert not np.isin(keys, listed).any()
            # Validation rows see the training items; test rows also the validation items.
            seen = train_keys if split == "valid" else np.concatenate([train_keys, held["valid"]])
            np.testing.assert_array_equal(listed, np.unique(seen[np.isin(seen // 100_000, table["user"])]))
        assert not np.isin(held["test"], held["valid"]).any()
