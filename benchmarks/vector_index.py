"""Retrieval from a Lance vector index against exact search: recall@K and queries/s.

For each RUN_DIR (a trained retrieval model: SASRec, BERT4Rec, a two-tower model; a staged run
at its last stage or a stage folder), the index holds the best checkpoint's item vectors and
the queries are the test users' ``user_vectors``, so recall is measured on real vectors and
real queries: the share of the exact top-K (dot product over every item) that the index
returns. Each index setting in the grid is built and searched in turn; the first rows are
``rex export-index``'s defaults. Then the same at ``--synthetic`` Gaussian item vectors (1M by
default), which is for timing only: random vectors have no structure, so their recall says
little about real catalogues.

Queries are searched in one batch through :class:`rex.eval.vector_index.VectorIndex` (Lance's
batched ``nearest``); exact search is one float32 matrix product and a top-K per chunk of
queries, on the same threads.

    python benchmarks/vector_index.py RUN_DIR [RUN_DIR ...]   # table, benchmarks/results/vector_index.json
    python benchmarks/vector_index.py RUN_DIR --synthetic 0 --queries 500
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rex.eval.vector_index import IndexSettings, VectorIndex, default_settings, write_index

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "vector_index.json"


def grid(rows: int, dim: int, full: bool) -> list[IndexSettings]:
    """The two defaults first, then (``full``) the neighbours that show why they were chosen:
    fewer graph candidates, no refinement, IVF partitions left unprobed, PQ codes alone."""
    hnsw, pq = default_settings(rows, dim, "hnsw"), default_settings(rows, dim, "ivf_pq")
    if not full:
        return [hnsw, pq]
    return [
        hnsw,
        pq,
        replace(hnsw, ef=100),
        replace(hnsw, refine_factor=1),
        replace(hnsw, num_partitions=4 * hnsw.num_partitions, nprobes=4 * hnsw.num_partitions),
        replace(hnsw, num_partitions=4 * hnsw.num_partitions, nprobes=2 * hnsw.num_partitions),
        replace(pq, nprobes=max(1, pq.num_partitions // 2)),
        replace(pq, nprobes=max(1, pq.num_partitions // 8)),
        replace(pq, refine_factor=1),
    ]


def exact_top(items: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> tuple[np.ndarray, float]:
    """(Q, k) row numbers of each query's exact top-k by dot product, and queries/s."""
    tensor = torch.from_numpy(items)
    out = []
    start = time.perf_counter()
    for part in torch.from_numpy(queries).split(chunk):
        out.append((part @ tensor.T).topk(k, dim=1).indices)
    seconds = time.perf_counter() - start
    return torch.cat(out).numpy(), len(queries) / seconds


def measure(
    name: str, items: np.ndarray, queries: np.ndarray, k: int, settings: list[IndexSettings], workdir: Path
) -> list[dict[str, Any]]:
    """Recall@k against exact search and queries/s of each setting; ``items`` are ids 1..N."""
    truth, exact_qps = exact_top(items, queries, k)
    truth += 1
    ids = np.arange(1, len(items) + 1)
    rows = []
    for setting in settings:
        path = workdir / "index.lance"
        start = time.perf_counter()
        write_index(path, ids, items, setting)
        build = time.perf_counter() - start
        index = VectorIndex(path)
        index.search(queries[:8], k)  # opens the index files, as a serving process has
        start = time.perf_counter()
        found = index.search(queries, k)
        seconds = time.perf_counter() - start
        recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))
        row = {
            "vectors": name,
            "items": len(items),
            "dim": items.shape[1],
            "queries": len(queries),
            **{key: value for key, value in asdict(setting).items() if value is not None},
            "build_s": round(build, 2),
            f"recall@{k}": round(recall, 4),
            "queries_per_s": round(len(queries) / seconds, 1),
            "exact_queries_per_s": round(exact_qps, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(path, ignore_errors=True)
    return rows


def run_vectors(run_dir: Path, queries: int) -> tuple[str, np.ndarray, np.ndarray]:
    """The run's item vectors (padding row dropped) and its first ``queries`` test users' queries."""
    import rex.builtins  # noqa: F401
    from rex.engine.train import restore

    restored = restore(run_dir)
    model = restored.built.module.model.eval()
    datamodule = restored.built.datamodule
    datamodule.setup("test")
    parts, got = [], 0
    with torch.no_grad():
        items = model.item_vectors()[1:].float().numpy()
        for batch in datamodule.test_dataloader():
            parts.append(model.user_vectors(batch).float().numpy())
            got += len(parts[-1])
            if got >= queries:
                break
    name = f"{restored.recipe.name} on {restored.recipe.data.name}"
    return name, np.ascontiguousarray(items), np.concatenate(parts)[:queries]


def print_table(rows: list[dict[str, Any]], k: int) -> None:
    header = ["vectors", "items", "index", "settings", "build s", f"recall@{k}", "queries/s", "exact q/s"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        settings = ", ".join(
            f"{key}={row[key]}"
            for key in ("num_partitions", "nprobes", "num_sub_vectors", "ef", "refine_factor")
            if key in row
        )
        cells = [
            row["vectors"],
            f"{row['items']:,}",
            row["kind"],
            settings,
            f"{row['build_s']:.1f}",
            f"{row[f'recall@{k}']:.4f}",
            f"{row['queries_per_s']:,.0f}",
            f"{row['exact_queries_per_s']:,.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="*", help="run folders of trained retrieval models")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--queries", type=int, default=1000, help="test users per run")
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="synthetic items (0: none)")
    parser.add_argument("--synthetic-dim", type=int, default=64)
    parser.add_argument("--synthetic-queries", type=int, default=200)
    parser.add_argument("--defaults-only", action="store_true", help="only the two defaults per catalogue")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of exact search")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rex-vector-index-") as tmp:
        for run_dir in args.runs:
            name, items, queries = run_vectors(run_dir, args.queries)
            settings = grid(len(items), items.shape[1], not args.defaults_only)
            rows += measure(name, items, queries, args.k, settings, Path(tmp))
        if args.synthetic:
            rng = np.random.default_rng(0)
            items = rng.standard_normal((args.synthetic, args.synthetic_dim), dtype=np.float32)
            queries = rng.standard_normal((args.synthetic_queries, args.synthetic_dim), dtype=np.float32)
            settings = grid(len(items), items.shape[1], False)
            rows += measure("synthetic (timing only)", items, queries, args.k, settings, Path(tmp))
    print_table(rows, args.k)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": date.today().isoformat(),
        "machine": platform.machine(),
        "threads": args.threads,
        "k": args.k,
        "runs": [str(run) for run in args.runs],
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
