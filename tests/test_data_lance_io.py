"""Lance table I/O: ragged columns, atomic writes, and errors for missing or corrupt tables."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from rex.config.errors import DataError
from rex.data.lance_io import RaggedColumn, read_columns, write_table


def _ragged() -> RaggedColumn:
    return RaggedColumn.from_lists([[1, 2, 3], [], [4], [5, 6, 7, 8, 9]])


def test_padded_keeps_the_last_elements_right_aligned() -> None:
    col = _ragged()
    expected = np.array([[1, 2, 3], [0, 0, 0], [0, 0, 4], [7, 8, 9]])
    np.testing.assert_array_equal(col.padded(3), expected)
    assert col.padded(3).dtype == np.int64
    np.testing.assert_array_equal(col.padded(6)[3], [0, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(col.padded(1)[:, 0], [3, 0, 4, 9])
    assert col.padded(0).shape == (4, 0)
    with pytest.raises(ValueError):
        col.padded(-1)


def test_padded_matches_a_plain_loop_on_random_rows() -> None:
    rng = np.random.default_rng(0)
    lists = [list(rng.integers(1, 100, size=rng.integers(0, 12))) for _ in range(200)]
    col = RaggedColumn.from_lists(lists)
    for max_len in (1, 5, 12, 20):
        loop = np.zeros((len(lists), max_len), dtype=np.int64)
        for r, row in enumerate(lists):
            tail = row[-max_len:]
            if tail:
                loop[r, max_len - len(tail) :] = tail
        np.testing.assert_array_equal(col.padded(max_len), loop)


def test_lengths_take_and_rows() -> None:
    col = _ragged()
    np.testing.assert_array_equal(col.lengths(), [3, 0, 1, 5])
    assert len(col) == 4
    taken = col.take(np.array([3, 1, 0, 3]))
    assert [taken.row(i).tolist() for i in range(len(taken))] == [
        [5, 6, 7, 8, 9],
        [],
        [1, 2, 3],
        [5, 6, 7, 8, 9],
    ]
    assert taken.offsets[0] == 0 and len(taken.values) == taken.offsets[-1]
    empty = col.take(np.array([], dtype=np.int64))
    assert len(empty) == 0 and empty.padded(2).shape == (0, 2)


def _table() -> pa.Table:
    return pa.table(
        {
            "user": pa.array([1, 2, 3, 4], pa.int64()),
            "label": pa.array([1.0, 0.0, 1.0, 0.0], pa.float32()),
            "history": _ragged().to_arrow(),
        }
    )


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "demo" / "t.lance"
    path.parent.mkdir()
    write_table(path, _table())
    cols = read_columns(path, ["user", "label", "history"])
    np.testing.assert_array_equal(cols["user"], [1, 2, 3, 4])
    assert cols["label"].dtype == np.float32
    history = cols["history"]
    assert isinstance(history, RaggedColumn)
    np.testing.assert_array_equal(history.values, _ragged().values)
    np.testing.assert_array_equal(history.offsets, _ragged().offsets)
    # Overwriting replaces the table in place.
    write_table(path, _table().slice(1, 2))
    np.testing.assert_array_equal(read_columns(path, ["user"])["user"], [2, 3])
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.lance"]


def test_missing_table_and_column_are_data_errors(tmp_path: Path) -> None:
    path = tmp_path / "beauty" / "seq_train.lance"
    with pytest.raises(DataError, match=r"seq_train.lance: table missing; run `rex data prepare beauty`"):
        read_columns(path, ["user"])
    path.parent.mkdir()
    write_table(path, _table())
    with pytest.raises(DataError, match=r"no column nope .*seq_train.lance|seq_train.lance.*no column nope"):
        read_columns(path, ["user", "nope"])


def test_corrupt_table_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "ml-100k" / "ctr_train.lance"
    path.parent.mkdir()
    write_table(path, _table())
    data_files = list((path / "data").iterdir())
    assert data_files
    for file in data_files:
        file.write_bytes(b"not a lance file" * 8)
    with pytest.raises(DataError, match=r"ctr_train.lance.*rex data prepare ml-100k --force"):
        read_columns(path, ["user", "history"])


def test_corrupt_manifest_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "ml-100k" / "ctr_train.lance"
    path.parent.mkdir()
    write_table(path, _table())
    for file in (path / "_versions").iterdir():
        file.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match=r"ctr_train.lance.*rex data prepare ml-100k"):
        read_columns(path, ["user"])


def test_failed_write_leaves_old_table_and_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d" / "t.lance"
    path.parent.mkdir()
    write_table(path, _table())
    real_write = lance.write_dataset

    def write_half_then_die(table: pa.Table, uri: str, **kwargs: object) -> None:
        real_write(table.slice(0, 1), uri, **kwargs)
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(lance, "write_dataset", write_half_then_die)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_table(path, _table().slice(0, 3))
    with pytest.raises(RuntimeError):
        write_table(tmp_path / "d" / "new.lance", _table())
    monkeypatch.undo()

    np.testing.assert_array_equal(read_columns(path, ["user"])["user"], [1, 2, 3, 4])
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.lance"]
