"""Dataset schema: validation, atomic save, errors that say how to rebuild, and the data hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from rex.config.errors import DataError
from rex.data.schema import DatasetSchema, FieldSpec, ViewSpec, data_hash, load_schema, save_schema


def _schema(**changes: object) -> DatasetSchema:
    values: dict[str, object] = {
        "name": "toy",
        "version": 1,
        "protocol": "leave_one_out",
        "num_users": 3,
        "num_items": 5,
        "views": {
            "sequence": ViewSpec(
                tables={"train": "seq_train"},
                fields={
                    "user": FieldSpec(role="user", kind="categorical", vocab_size=3),
                    "history": FieldSpec(role="history", kind="sequence", vocab_size=5, vocab_of="item"),
                },
            )
        },
        "tables": {"seq_train": 2},
        "counts": {"users": 2},
        "params": {"seed": 1},
        "source": {"archive": "toy.tar.xz", "sha256": "0" * 64},
    }
    values.update(changes)
    return DatasetSchema.model_validate(values)


def test_save_load_round_trip_and_hash(tmp_path: Path) -> None:
    directory = tmp_path / "toy"
    directory.mkdir()
    save_schema(directory, _schema())
    assert load_schema(directory) == _schema()
    assert [p.name for p in directory.iterdir()] == ["schema.json"]
    first = data_hash(directory)
    assert len(first) == 64
    save_schema(directory, _schema())
    assert data_hash(directory) == first
    save_schema(directory, _schema(params={"seed": 2}))
    assert data_hash(directory) != first


def test_models_forbid_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        FieldSpec(role="user", kind="categorical", vocab=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        FieldSpec(role="user", kind="embedding")  # type: ignore[arg-type]


def test_missing_schema_says_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"schema.json: .*run `rex data prepare beauty`"):
        load_schema(tmp_path / "beauty")
    with pytest.raises(DataError, match=r"rex data prepare beauty"):
        data_hash(tmp_path / "beauty")


def test_invalid_schema_names_the_file(tmp_path: Path) -> None:
    directory = tmp_path / "ml-100k"
    directory.mkdir()
    (directory / "schema.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"ml-100k/schema.json: not valid JSON.*--force"):
        load_schema(directory)
    broken = json.loads(_schema().model_dump_json())
    broken["views"]["sequence"]["fields"]["user"]["kind"] = "bogus"
    (directory / "schema.json").write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(DataError, match=r"schema.json: invalid schema at views.sequence.fields.user.kind"):
        load_schema(directory)
