"""Faults in a dataset on disk: a schema.json that does not match its tables or is gone, folders
left by killed writes, and damaged Lance files. Each ends in a DataError that says how to fix it
(through the CLI: exit code 2 and at most 3 lines), and nothing written is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rex.config.errors import DataError
from rex.data import prepare as prepare_module
from rex.data.importer import import_dataset
from rex.data.lance_io import read_columns
from rex.data.prepare import dataset_info, ensure_dataset, prepare_dataset
from rex.data.schema import SCHEMA_FILE, load_schema
from tests.conftest import run_rex
from tests.test_data_import import CSV_TEXT, _mapping, _write


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A data root holding ``tiny``, imported from small CSV files by ``mapping.yaml``."""
    mapping = _write(tmp_path / "in", {"log.csv": CSV_TEXT}, _mapping(item_features=None))
    root = tmp_path / "home"
    import_dataset(mapping, root=root)
    return root


def _edit_schema(directory: Path, **changes: object) -> None:
    path = directory / SCHEMA_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")


# ---------------------------------------------------------------- schema.json against its tables


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param(
            {"num_items": 3}, r"num_items is 3 but seq_\w+\.lance column '\w+' holds id 4", id="num_items"
        ),
        pytest.param(
            {"num_users": 2}, r"num_users is 2 but seq_\w+\.lance column 'user' holds id 3", id="num_users"
        ),
        pytest.param(
            {
                "tables": {
                    "seq_train": 3,
                    "seq_valid": 3,
                    "seq_test": 3,
                    "ctr_train": 7,
                    "ctr_valid": 3,
                    "ctr_test": 3,
                }
            },
            r"records 7 rows for table ctr_train but ctr_train\.lance has 6",
            id="rows",
        ),
    ],
)
def test_a_schema_that_disagrees_with_its_tables_is_refused(home: Path, changes: dict, message: str) -> None:
    assert load_schema(home / "tiny").num_items == 5  # items i11..i14 are ids 1..4
    _edit_schema(home / "tiny", **changes)
    fix = r": the schema does not belong to these tables; re-import it with `rex data import mapping\.yaml`"
    for opened_by in (ensure_dataset, dataset_info):
        with pytest.raises(DataError, match=r"tiny/schema\.json: " + message + fix):
            opened_by("tiny", root=home)


def test_a_schema_that_matches_its_tables_is_accepted(home: Path) -> None:
    assert ensure_dataset("tiny", root=home) == home / "tiny"
    assert "num_items 5" in dataset_info("tiny", root=home)


# ---------------------------------------------------------------- an imported dataset without schema.json


def test_an_imported_dataset_without_its_schema_says_to_reimport(home: Path) -> None:
    (home / "tiny" / SCHEMA_FILE).unlink()
    message = (
        r"tiny/schema\.json: missing; 'tiny' is not a built-in dataset, so the tables beside it came from "
        r"`rex data import`: re-import them with `rex data import MAPPING` \(the mapping whose name is tiny\)"
    )
    for opened_by in (ensure_dataset, dataset_info, prepare_dataset):
        with pytest.raises(DataError, match=message):
            opened_by("tiny", root=home)
    # a name with no folder is still unknown
    with pytest.raises(DataError, match=r"unknown dataset 'tinny'"):
        ensure_dataset("tinny", root=home)


def test_preparing_an_imported_dataset_says_to_reimport(home: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"tiny/schema\.json: 'tiny' was imported, not prepared: re-import it with `rex data import mapping\.yaml`",
    ):
        prepare_dataset("tiny", root=home, force=True)


# ---------------------------------------------------------------- folders left by killed writes


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _half_deleted(path: Path) -> Path:
    (path / "seq_train.lance").mkdir(parents=True)
    return path


def test_folders_of_killed_writes_are_removed_by_the_next_one(home: Path, tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = [_half_deleted(home / f"tiny.old-{dead}"), _half_deleted(home / f".tiny.tmp-{dead}")]
    running = _half_deleted(home / f"tiny.old-{os.getppid()}")  # a live writer's: not ours to touch
    other = _half_deleted(home / f"tiny2.old-{dead}")  # another dataset's
    before = (home / "tiny" / SCHEMA_FILE).read_bytes()
    import_dataset(tmp_path / "in" / "mapping.yaml", root=home)
    assert not any(path.exists() for path in stale)
    assert running.exists() and other.exists()
    assert (home / "tiny" / SCHEMA_FILE).read_bytes() == before


def test_an_old_folder_is_kept_while_it_is_the_only_copy(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # killed between the swap's two renames: the dataset is only in its old folder
    old = home / f"tiny.old-{_dead_pid()}"
    (home / "tiny").rename(old)

    def killed(*args: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(prepare_module, "write_table", killed)
    with pytest.raises(RuntimeError, match="killed"):
        import_dataset(tmp_path / "in" / "mapping.yaml", root=home)
    assert load_schema(old).name == "tiny"
    assert (old / "seq_train.lance").is_dir()


# ---------------------------------------------------------------- a damaged Lance file through the CLI


def test_a_damaged_lance_file_is_a_clean_cli_error_without_the_rust_panic_report(home: Path) -> None:
    (data_file,) = (home / "tiny" / "seq_train.lance" / "data").iterdir()
    damaged = bytearray(data_file.read_bytes())
    # A byte of a buffer size in the file: Lance's decoder panics on it. The file is the same
    # for the same rows and the pinned Lance version.
    damaged[66] ^= 0xFF
    data_file.write_bytes(bytes(damaged))
    # RUST_BACKTRACE=1 makes the report longer still; it must not show either way.
    result = run_rex("data", "info", "tiny", env={"REX_DATA_HOME": str(home), "RUST_BACKTRACE": "1"})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, result.stderr
    assert "seq_train.lance: cannot read table" in result.stderr
    assert "panicked with message" in result.stderr  # the damage did make Lance panic ...
    assert "panicked at" not in result.stderr and "Traceback" not in result.stderr  # ... unreported


def test_a_damaged_table_of_an_imported_dataset_says_to_reimport(home: Path) -> None:
    table = home / "tiny" / "seq_train.lance"
    for file in (table / "data").iterdir():
        file.write_bytes(b"not a lance file" * 8)
    with pytest.raises(
        DataError, match=r"seq_train\.lance.*re-import it with `rex data import mapping\.yaml`"
    ):
        read_columns(table, ["user", "items"])
