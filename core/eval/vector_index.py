"""Item vectors in a Lance table with a vector index: what ``rex export-index`` writes and what
``eval/ranking``'s ``index`` argument ranks from.

The table has one row per item: ``item`` (int64, the model's item id) and ``vector``
(fixed-size float32 list), with an approximate nearest-neighbour index on ``vector`` under the
dot product, the score of every retrieval model (:class:`rex.eval.evaluators.RetrievalModel`).
The settings it was built with, and the search settings that go with them, are kept in the
table's schema metadata, so whoever searches it gets the recall it was built for.

**Defaults, by measurement** (``benchmarks/vector_index.py``; table in the README). On real
item vectors and queries (SASRec on Beauty, 12,101 items, and on Scientific, 4,385; CSMF's fused
queries on Taobao, 11,953; 1,000 test users each), IVF partitions under the dot product lose a
user's top items in the partitions they skip: IVF-PQ finds 0.65 to 0.77 of the exact top-50 with
1/8 of its partitions probed, and PQ codes alone (no exact re-scoring) cap it at 0.68 to 0.79.
With every partition probed and a refine factor of 10 it finds 0.999, 1.000 and 1.000: the
default. A graph (IVF_HNSW_SQ, ``ef`` 300, refine 2) finds 0.993 and 1.000 on SASRec's vectors
but 0.934 on CSMF's, under the 0.95 bar. At these sizes every index is slower than exact
search batched in torch; at 1M synthetic vectors the graph answers 236 queries/s against
IVF-PQ's 45 and exact search's 124, but takes 22 minutes to build against IVF-PQ's 43 s. See
:data:`DEFAULT_KIND` and :func:`default_settings`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa

from rex.config.errors import DataError, RexError
from rex.data.lance_io import swap_into_place, vector_column

ID, VECTOR = "item", "vector"
SETTINGS_METADATA = b"rex.vector_index"
KINDS = {"hnsw": "IVF_HNSW_SQ", "ivf_pq": "IVF_PQ"}


@dataclass(frozen=True)
class IndexSettings:
    """How an index is built (``kind``, ``num_partitions``, ``num_sub_vectors`` for IVF-PQ) and
    searched (``nprobes`` partitions, ``ef`` graph candidates for HNSW, ``refine_factor``: how
    many times ``k`` candidates are re-scored with the exact vectors)."""

    kind: str
    num_partitions: int
    nprobes: int
    refine_factor: int
    num_sub_vectors: int | None = None
    ef: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RexError(f"unknown index {self.kind!r}; choose {' or '.join(KINDS)}")
        for name in ("num_partitions", "nprobes", "refine_factor", "num_sub_vectors", "ef"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RexError(f"{name.replace('_', '-')} must be at least 1, got {value}")

    def build_arguments(self, dim: int) -> dict[str, Any]:
        """Lance's ``create_index`` arguments for vectors of ``dim``."""
        out: dict[str, Any] = {"num_partitions": self.num_partitions}
        if self.kind == "ivf_pq":
            sub = self.num_sub_vectors or 1
            if dim % sub:
                raise RexError(f"num-sub-vectors {sub} must divide the vectors' dimension {dim}")
            out["num_sub_vectors"] = sub
        return out

    def search_arguments(self, k: int) -> dict[str, Any]:
        """Lance's ``nearest`` arguments for the top ``k``."""
        out: dict[str, Any] = {"nprobes": self.nprobes, "refine_factor": self.refine_factor}
        if self.kind == "hnsw":
            # The graph search must keep at least the k * refine_factor candidates it returns.
            out["ef"] = max(self.ef or 0, k * self.refine_factor)
        return out


# HNSW: one partition per 2**20 items: the graph inside a partition does the pruning, so
# partitions only bound a graph's size, and every one is probed (IVF under the dot product misses
# top items in the partitions it skips).
PARTITION_ROWS = 1 << 20
HNSW = IndexSettings(kind="hnsw", num_partitions=1, nprobes=1, refine_factor=2, ef=300)
DEFAULT_KIND = "ivf_pq"


def default_settings(rows: int, dim: int, kind: str = DEFAULT_KIND) -> IndexSettings:
    """The measured defaults for ``rows`` vectors of ``dim`` (see the module docstring).

    IVF-PQ: about sqrt(rows) / 4 partitions (28 for Beauty's 12,101 items), all of them probed,
    sub-vectors of 4 dimensions and a refine factor of 10 (0.999 to 1.000 of the top-50 on the
    three real catalogues). Probing half of them found 0.949 and 0.960 on SASRec's vectors,
    short of or close to the 0.95 bar; probing all is a compressed scan of every item. HNSW,
    when asked for: ef 300 and refine 2, one partition per 2**20 items."""
    if kind == "hnsw":
        partitions = max(1, math.ceil(rows / PARTITION_ROWS))
        return replace(HNSW, num_partitions=partitions, nprobes=partitions)
    partitions = max(1, min(rows // 256, round(math.sqrt(rows) / 4)))
    sub = next(s for s in (dim // 4, 16, 8, 4, 2, 1) if s >= 1 and dim % s == 0)
    return IndexSettings(
        kind="ivf_pq",
        num_partitions=partitions,
        nprobes=partitions,
        refine_factor=10,
        num_sub_vectors=sub,
    )


def write_index(path: Path, ids: np.ndarray, vectors: np.ndarray, settings: IndexSettings) -> None:
    """The table of ``ids`` (N,) and ``vectors`` (N, D) with its index, written beside ``path``
    and swapped into place, so ``path`` never holds a table without its index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({ID: np.asarray(ids, dtype=np.int64), VECTOR: vector_column(vectors)})
    table = table.replace_schema_metadata({SETTINGS_METADATA: json.dumps(asdict(settings)).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            dataset = lance.write_dataset(table, str(tmp), mode="create")
            dataset.create_index(
                VECTOR,
                KINDS[settings.kind],
                metric="dot",
                **settings.build_arguments(vectors.shape[1]),
            )
        except Exception as exc:  # noqa: BLE001 - Lance's own message says which setting it refused
            raise RexError(
                f"cannot build the {settings.kind} index ({str(exc).splitlines()[0]})", file=str(path)
            ) from exc
        swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class VectorIndex:
    """A table written by :func:`write_index`, searched with the settings it was built with
    (or ``settings``)."""

    def __init__(self, path: str | Path, settings: IndexSettings | None = None) -> None:
        self.path = str(path)
        if "://" not in self.path and not Path(path).exists():
            raise DataError(f"{path}: no such vector index; write it with `rex export-index RUN`")
        try:
            self.dataset = lance.dataset(self.path)
        except Exception as exc:  # noqa: BLE001 - any failure to open it: the user writes it again
            raise DataError(
                f"{path}: cannot open the vector index ({str(exc).splitlines()[0][:120]}); "
                "write it again with `rex export-index RUN`"
            ) from exc
        missing = {ID, VECTOR} - set(self.dataset.schema.names)
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(sorted(missing))}; write it with `rex export-index RUN`"
            )
        stored = (self.dataset.schema.metadata or {}).get(SETTINGS_METADATA)
        if stored is None or not any(
            VECTOR in index.field_names for index in self.dataset.describe_indices()
        ):
            raise DataError(f"{path}: no vector index on {VECTOR!r}; write it with `rex export-index RUN`")
        self.settings = settings or IndexSettings(**json.loads(stored))

    def __len__(self) -> int:
        return self.dataset.count_rows()

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's ``item`` (N,) and ``vector`` (N, D), in table order."""
        table = self.dataset.to_table(columns=[ID, VECTOR])
        column = table.column(VECTOR).combine_chunks()
        flat = np.array(column.flatten().to_numpy(zero_copy_only=False))  # writable, for torch
        return table.column(ID).to_numpy(), flat.reshape(len(column), column.type.list_size)

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> np.ndarray:
        """(B, k) int64: each query's top ``k`` items by dot product, best first, -1 where the
        index returned fewer. ``exact`` scans every vector instead of the index."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        out = np.full((len(queries), k), -1, dtype=np.int64)
        if not len(queries):
            return out
        nearest = {"column": VECTOR, "q": queries, "k": k, "metric": "dot", "use_index": not exact}
        if not exact:
            nearest.update(self.settings.search_arguments(k))
        found = self.dataset.to_table(
            columns=[ID, "_distance"], nearest=nearest, disable_scoring_autoprojection=True
        )
        query = found.column("query_index").to_numpy().astype(np.int64)
        items = found.column(ID).to_numpy()
        # Best first within each query: the distance under "dot" is the negated dot product.
        order = np.lexsort((found.column("_distance").to_numpy(), query))
        query, items = query[order], items[order]
        starts = np.searchsorted(query, np.arange(len(queries)))
        position = np.arange(len(query)) - starts[query]
        keep = position < k
        out[query[keep], position[keep]] = items[keep]
        return out


def retrieved_ranks(
    retrieved: np.ndarray, target: np.ndarray, excluded: np.ndarray, k: int, miss: int
) -> np.ndarray:
    """(B,) 0-based ranks of each ``target`` among its row of ``retrieved`` (B, k') ids, once the
    row's ``excluded`` (B, S) ids (0: none) are dropped and the first ``k`` remain; ``miss``
    for a target not among them. With ``k' = k + S`` the remaining ``k`` are the index's top-k
    over the items not excluded."""
    valid = retrieved >= 0
    if excluded.size:
        valid &= ~(retrieved[:, :, None] == excluded[:, None, :]).any(axis=2)
    position = np.cumsum(valid, axis=1) - 1
    hit = valid & (position < k) & (retrieved == target[:, None])
    return np.where(hit.any(axis=1), (position * hit).sum(axis=1), miss)
