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


def data_hash(directory: Path) -> str:
    """The sha256 of ``schema.json``: it records the source sha256, params and row counts."""
    path = Path(directory) / SCHEMA_FILE
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError as exc:
        raise DataError(
            f"dataset schema missing; run `rex data prepare {Path(directory).name}`", file=str(path)
        ) from exc
