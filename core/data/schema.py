"""The dataset schema: what a prepared dataset directory holds and how models should read it.

A prepared dataset is ``<root>/<name>/`` with ``schema.json`` and one ``<table>.lance`` per
table. The schema names the views (``sequence``, ``ctr`` ...), the tables of each split and the
fields with their role and vocabulary size, so models ask for fields by role and never by a
dataset's column names. It also records the source archive's sha256 and the prepare params, so
its bytes identify the data version (:func:`data_hash`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from rex.config.base import Strict
from rex.config.errors import DataError
from rex.data.lance_io import column_maxima

SCHEMA_FILE = "schema.json"


class FieldSpec(Strict):
    """One column as a model sees it.

    ``role`` is what the field means to a model (``user``, ``item``, ``history``, ``label``,
    ``target``, ``sequence``, ``behavior``, ``label:<behavior>``, ``modality:<name>``) or None for
    a plain feature. ``vocab_size`` is the embedding table size of an id field (ids run
    1..vocab_size-1; 0 is padding/unknown). ``vocab_of`` names the id space whose embedding table
    the field shares (``item`` for a history of item ids). A ``vector`` field is a fixed-size
    float32 vector per row (``dim`` entries), read as a ``rows x dim`` array.
    """

    role: str | None
    kind: Literal["categorical", "sequence", "label", "float", "vector"]
    vocab_size: int | None = None
    vocab_of: str | None = None
    dim: int | None = None


class ViewSpec(Strict):
    """A way to train on the dataset: tables per split (``train``/``valid``/``test``) and fields.

    ``order`` says how the items of a sequence are ordered where that is not chronological
    (None: by time).
    """

    tables: dict[str, str]
    fields: dict[str, FieldSpec]
    protocol: str | None = None
    order: str | None = None


class DatasetSchema(Strict):
    """Everything recorded about a prepared dataset (the contents of ``schema.json``)."""

    name: str
    version: int
    protocol: str
    num_users: int
    num_items: int
    views: dict[str, ViewSpec]
    tables: dict[str, int]
    counts: dict[str, int]
    params: dict[str, Any]
    source: dict[str, Any]


def save_schema(directory: Path, schema: DatasetSchema) -> Path:
    """Write ``<directory>/schema.json`` atomically (temporary file, then rename)."""
    path = Path(directory) / SCHEMA_FILE
    tmp = path.with_name(f"{SCHEMA_FILE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(schema.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_schema(directory: Path) -> DatasetSchema:
    """Read and validate ``<directory>/schema.json``."""
    directory = Path(directory)
    path = directory / SCHEMA_FILE
    if not path.is_file():
        raise DataError(f"dataset schema missing; run `rex data prepare {directory.name}`", file=str(path))
    try:
        return DatasetSchema.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"not valid JSON ({exc}); rebuild with `rex data prepare {directory.name} --force`",
            file=str(path),
        ) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(
            f"invalid schema at {where or '(root)'}: {first['msg']}; "
            f"rebuild with `rex data prepare {directory.name} --force`",
            file=str(path),
        ) from exc


def rebuild_hint(schema: DatasetSchema) -> str:
    """How to rebuild a dataset: an imported one from its recorded mapping, a built-in one by prepare."""
    mapping = schema.source.get("import")
    if mapping:
        return f"re-import it with `rex data import {mapping}` (the mapping recorded in schema.json)"
    return f"rebuild it with `rex data prepare {schema.name} --force`"


def check_tables(directory: Path, schema: DatasetSchema) -> None:
    """Check that ``<directory>/schema.json`` describes the tables beside it.

    Each table must have the rows the schema records, and every user and item id must be below
    ``num_users`` / ``num_items``: models size their embedding tables by those, so a schema that
    does not belong to its tables would otherwise fail mid-training with an IndexError. Only the
    id columns are read.
    """
    directory = Path(directory)
    bounds: dict[str, dict[str, tuple[str, int]]] = {}  # table -> id column -> (size name, size)
    for view in schema.views.values():
        for name, spec in view.fields.items():
            if spec.role == "user":
                bound = ("num_users", schema.num_users)
            elif spec.role == "item" or spec.vocab_of == "item":
                bound = ("num_items", schema.num_items)
            else:
                continue
            for table in view.tables.values():
                bounds.setdefault(table, {})[name] = bound
    path = str(directory / SCHEMA_FILE)
    for table, recorded in schema.tables.items():
        columns = bounds.get(table, {})
        rows, maxima = column_maxima(directory / f"{table}.lance", list(columns))
        if rows != recorded:
            raise DataError(
                f"records {recorded:,} rows for table {table} but {table}.lance has {rows:,}: the schema "
                f"does not belong to these tables; {rebuild_hint(schema)}",
                file=path,
            )
        for name, largest in maxima.items():
            size_name, size = columns[name]
            if largest is not None and largest >= size:
                raise DataError(
                    f"{size_name} is {size} but {table}.lance column {name!r} holds id {largest}: the "
                    f"schema does not belong to these tables; {rebuild_hint(schema)}",
                    file=path,
                )


def data_hash(directory: Path) -> str:
    """The sha256 of ``schema.json``: it records the source sha256, params and row counts."""
    path = Path(directory) / SCHEMA_FILE
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError as exc:
        raise DataError(
            f"dataset schema missing; run `rex data prepare {Path(directory).name}`", file=str(path)
        ) from exc
