"""Data stages: raw mirror files in, a prepared dataset (Lance tables + schema.json) out.

``prepare_dataset(name)`` fetches the raw source (:mod:`rex.data.mirror`), runs the dataset's
builder (:mod:`rex.data.datasets`) and writes ``<root>/<name>/`` atomically: the whole directory
is built beside the target and swapped in, so the tables and the schema always belong together.
"""

from __future__ import annotations

import difflib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

import rex.data.datasets  # noqa: F401  (registers the built-in datasets)
from rex.config.errors import DataError
from rex.data.build import DATASETS, Built, DatasetDef, Params
from rex.data.datasets.amazon import BeautyParams
from rex.data.datasets.movielens import Ml100kParams
from rex.data.lance_io import RaggedColumn, read_columns, swap_into_place, write_table
from rex.data.mirror import RawSource, fetch, log
from rex.data.schema import (
    SCHEMA_FILE,
    DatasetSchema,
    check_tables,
    data_hash,
    load_schema,
    rebuild_hint,
    save_schema,
)

__all__ = [
    "DATASETS",
    "BeautyParams",
    "Ml100kParams",
    "dataset_info",
    "ensure_dataset",
    "load_params",
    "prepare_dataset",
]

DATA_HOME_ENV = "REX_DATA_HOME"
PARAMS_FILE = "params.yaml"
# Bump when the tables a build writes change for the same raw data and params: an older
# prepared directory is then rebuilt instead of being reused.
PREPARE_VERSION = 1
RAW_DIR = "_raw"


def data_root() -> Path:
    """Where prepared datasets live: ``$REX_DATA_HOME`` or ``<cwd>/data``."""
    env = os.environ.get(DATA_HOME_ENV)
    return Path(env).expanduser() if env else Path.cwd() / "data"


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict (``{}`` when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(f"not valid YAML: {exc}", file=str(path)) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise DataError("expected a mapping of dataset name to params", file=str(path))
    return loaded


def validate_params(name: str, model: type[Params], raw: Any, file: str) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DataError("expected a mapping of params", file=file, key=name)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(first["loc"][0]), list(model.model_fields), n=1)
            message = "unknown param" + (f" (did you mean {close[0]}?)" if close else "")
            message += f"; known: {', '.join(model.model_fields)}"
        raise DataError(message, file=file, key=f"{name}.{loc}" if loc else name) from exc


# --------------------------------------------------------------------------------------------
# entry points


def _lookup(name: str, directory: Path | None = None) -> DatasetDef:
    """The built-in dataset ``name``; ``directory``, where given, is where it would be prepared,
    so that an imported dataset found there is told apart from a misspelt name."""
    try:
        return DATASETS[name]
    except KeyError:
        if directory is not None:
            _refuse_imported(name, directory)
        close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; known: {', '.join(DATASETS)}") from None


def _refuse_imported(name: str, directory: Path) -> None:
    """Raise how to rebuild ``directory`` if it holds a dataset made by ``rex data import``.

    Only a built-in dataset can be prepared; an imported one is rebuilt from its mapping, which
    its schema.json records and whose ``name:`` is the directory's name.
    """
    schema_file = directory / SCHEMA_FILE
    if schema_file.is_file():
        schema = load_schema(directory)
        if schema.source.get("import"):
            raise DataError(
                f"{name!r} was imported, not prepared: {rebuild_hint(schema)}", file=str(schema_file)
            )
    elif any(directory.glob("*.lance")):
        raise DataError(
            f"missing; {name!r} is not a built-in dataset, so the tables beside it came from `rex data "
            f"import`: re-import them with `rex data import MAPPING` (the mapping whose name is {name})",
            file=str(schema_file),
        )


def _is_current(directory: Path, schema: DatasetSchema, params: dict[str, Any], source: RawSource) -> bool:
    return (
        schema.version == PREPARE_VERSION
        and schema.params == params
        and schema.source.get("sha256") == source.sha256
        and all((directory / f"{table}.lance").is_dir() for table in schema.tables)
    )


def _pid_gone(leftover: Path) -> bool:
    """Whether the process whose pid ends ``leftover``'s name (``...-<pid>``) has exited."""
    pid = leftover.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _remove_stale(root: Path, name: str) -> None:
    """Delete what killed writes of ``name`` left (their pid is gone): build directories, and
    previous directories that a swap renamed away (``<name>.old-<pid>``), which a kill during
    their deletion leaves half deleted.

    An old directory is only deleted while ``<name>`` is in place: a kill between the swap's two
    renames leaves it as the one complete copy.
    """
    for leftover in root.glob(f".{name}.tmp-*"):
        if _pid_gone(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    if (root / name).is_dir():
        for old in root.glob(f"{name}.old-*"):
            if _pid_gone(old):
                shutil.rmtree(old, ignore_errors=True)


def write_dataset(
    root: Path, name: str, built: Built, params: dict[str, Any], source: dict[str, Any]
) -> DatasetSchema:
    """Write ``built`` as ``<root>/<name>/`` (Lance tables + schema.json) atomically.

    The whole directory is written beside the target (``.<name>.tmp-<pid>``) and swapped in by
    renames, so the tables and the schema always belong together and a failed or killed write
    leaves the previous directory (or none) in place.
    """
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root, name)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for table_name, table in built.tables.items():
            write_table(tmp / f"{table_name}.lance", table)
        schema = DatasetSchema(
            name=name,
            version=PREPARE_VERSION,
            protocol=built.protocol,
            num_users=built.num_users,
            num_items=built.num_items,
            views=built.views,
            tables={table_name: table.num_rows for table_name, table in built.tables.items()},
            counts=built.counts,
            params=params,
            source=source,
        )
        save_schema(tmp, schema)
        swap_into_place(tmp, root / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return schema


def prepare_dataset(
    name: str, params: dict[str, Any] | None = None, root: Path | None = None, force: bool = False
) -> DatasetSchema:
    """Build ``<root>/<name>/`` (Lance tables + schema.json) from the raw source.

    ``params`` default to the ``<name>:`` section of ``params.yaml`` in the working directory;
    missing keys take the defaults. An existing directory built from the same source, params
    and prepare version is reused unless ``force``.
    """
    root = Path(root) if root is not None else data_root()
    out = root / name
    definition = _lookup(name, out)
    # Also when the dataset is up to date: nothing else would ever clear them.
    _remove_stale(root, name)
    if params is None:
        raw_params, params_file = load_params().get(name), PARAMS_FILE
    else:
        raw_params, params_file = params, "params"
    validated = validate_params(name, definition.params, raw_params, params_file)
    used = validated.model_dump(mode="json")
    if not force and (existing := _current_schema(out, used, definition.source)) is not None:
        return existing
    with _build_lock(root, name):
        # Another process may have built it while this one waited for the lock.
        if not force and (existing := _current_schema(out, used, definition.source)) is not None:
            return existing
        return _build(root, name, definition, validated, used)


def _current_schema(out: Path, params: dict[str, Any], source: RawSource) -> DatasetSchema | None:
    """The schema of ``out`` when it was built from ``source`` with ``params`` by this prepare
    version (its tables checked), else None."""
    if not (out / SCHEMA_FILE).is_file():
        return None
    try:
        existing = load_schema(out)
    except DataError:
        return None
    if not _is_current(out, existing, params, source):
        return None
    check_tables(out, existing)
    log(f"{out.name}: up to date at {out}")
    return existing


@contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    """Holds ``<root>/.locks/<name>`` exclusively: processes that start together on one data home
    (sweep workers, the ranks of a multi-process run, parallel test workers) build a dataset once,
    and the others wait and then find it up to date instead of building it again."""
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / name, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{name}: another process is preparing it; waiting")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(
    root: Path, name: str, definition: DatasetDef, validated: Params, used: dict[str, Any]
) -> DatasetSchema:
    """Fetch ``definition``'s raw source and write the built dataset to ``<root>/<name>/``."""
    out = root / name
    started = time.perf_counter()
    raw = fetch(definition.source, root / RAW_DIR)
    built = definition.build(raw, validated)
    log(f"{name}: built {len(built.tables)} tables in {time.perf_counter() - started:.1f}s; writing")
    schema = write_dataset(
        root,
        name,
        built,
        params=used,
        source={"archive": definition.source.archive, "sha256": definition.source.sha256},
    )
    log(f"{name}: prepared at {out} in {time.perf_counter() - started:.1f}s")
    return schema


def fetch_dataset(name: str, root: Path | None = None) -> Path:
    """Fetch and verify the raw source of ``name`` into ``<root>/_raw/`` (the ``fetch`` stage)."""
    source = _lookup(name).source
    root = Path(root) if root is not None else data_root()
    return fetch(source, root / RAW_DIR)


def ensure_dataset(name: str, root: Path | None = None) -> Path:
    """The prepared directory of ``name``, preparing it first if missing or out of date.

    A dataset written by ``rex data import`` (not a registered name) has no raw source to
    rebuild from: its directory is used as it is.
    """
    directory = (Path(root) if root is not None else data_root()) / name
    if name not in DATASETS and (directory / SCHEMA_FILE).is_file():
        check_tables(directory, load_schema(directory))
        return directory
    prepare_dataset(name, root=root)
    return directory


def dataset_info(name: str, root: Path | None = None) -> str:
    """A text summary of a prepared dataset: source, sizes, counts, views and fields."""
    directory = (Path(root) if root is not None else data_root()) / name
    if not (directory / SCHEMA_FILE).is_file():
        _lookup(name, directory)
    schema = load_schema(directory)
    check_tables(directory, schema)
    lines = [
        f"{schema.name} (prepare v{schema.version}, protocol {schema.protocol}) at {directory}",
        f"  data hash  {data_hash(directory)[:16]}",
        f"  source     {schema.source.get('archive') or schema.source.get('import')} sha256 {str(schema.source.get('sha256'))[:16]}",
        f"  users      {schema.num_users - 1:,} (ids 1..N, num_users {schema.num_users})",
        f"  items      {schema.num_items - 1:,} (ids 1..N, num_items {schema.num_items})",
        "  params     " + ", ".join(f"{k}={v}" for k, v in schema.params.items()),
        "  counts     " + ", ".join(f"{k}={v:,}" for k, v in schema.counts.items()),
    ]
    for view_name, view in schema.views.items():
        protocol = f", protocol {view.protocol}" if view.protocol else ""
        lines.append(f"  view {view_name}{protocol}")
        for split, table in view.tables.items():
            line = f"    {split:<6} {table} ({schema.tables.get(table, 0):,} rows)"
            if view.protocol == "leave_one_out" and split != "train" and view_name == "sequence":
                repeats, rows = repeated_targets(directory / f"{table}.lance")
                line += (
                    f", repeat rate {repeats / max(rows, 1):.2%} ({repeats:,} targets already in the history)"
                )
            lines.append(line)
        for field_name, spec in view.fields.items():
            extra = f" vocab {spec.vocab_size}" if spec.vocab_size is not None else ""
            extra += f" (shares {spec.vocab_of})" if spec.vocab_of else ""
            lines.append(f"    field {field_name}: {spec.kind}, role {spec.role or '-'}{extra}")
    return "\n".join(lines)


def repeated_targets(table: Path) -> tuple[int, int]:
    """How many rows of a ``history``/``target`` table have a target already in their history,
    and how many rows there are. Masking the history at evaluation makes those certain misses."""
    columns = read_columns(table, ["history", "target"])
    history, target = columns["history"], np.asarray(columns["target"])
    assert isinstance(history, RaggedColumn)
    rows = np.repeat(np.arange(len(history)), history.lengths())
    hit = history.values == target[rows]
    return int((np.bincount(rows[hit], minlength=len(history)) > 0).sum()), len(history)
