"""Loader benchmark: rex's Lance-backed loader against a pandas-in-memory baseline.

Both loaders serve the same train table of a prepared dataset view, in the same epoch-seeded
order, as the same dict-of-tensor batches:

* ``rex``: what training does (``RexDataModule``): Lance columns via ``read_columns`` into
  numpy (list columns as flat values + offsets), whole-split tensors (sequences left-padded),
  then ``rex.loader.BatchLoader``: one ``index_select`` per column per batch.
* ``pandas``: the usual baseline: the table read into a DataFrame (list columns become object
  columns of arrays), then per batch ``df.iloc[idx]`` and each column converted to a tensor,
  list columns padded row by row to the batch's longest (capped at ``max_len``).

Each loader runs in its own process, so ``ru_maxrss`` is its own peak. Several epochs are timed
and the RSS after each one is recorded (it should not grow). A last, untimed pass sums every
batch column of both loaders: equal sums mean both served the same batches.

    python benchmarks/loader.py                      # ml-1m ctr, taobao_mb sequence and ctr
    python benchmarks/loader.py --case beauty:sequence --case ml-100k:ctr --epochs 2

Results: a table on stdout and ``benchmarks/results/loader.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "loader.json"
DEFAULT_CASES = ["ml-1m:ctr", "taobao_mb:sequence", "taobao_mb:ctr"]
# The recipe whose data section (view, max_len) a view is read with, as in training.
RECIPES = {"ctr": REPO / "recipes" / "deepfm.yaml", "sequence": REPO / "recipes" / "sasrec.yaml"}
LOADERS = ("rex", "pandas")
Batch = dict[str, Any]


# --------------------------------------------------------------------------------------------
# memory


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------------------------
# the two loaders (run inside a worker process)


def _datamodule(dataset: str, view: str, batch_size: int, seed: int) -> Any:
    from rex.config.recipe import load_recipe
    from rex.data.datamodule import RexDataModule
    from rex.data.prepare import data_root

    recipe = load_recipe(
        RECIPES[view], [f"data.name={dataset}", f"data.view={view}", f"train.batch_size={batch_size}"]
    ).recipe
    return RexDataModule(recipe, data_root() / dataset, seed)


def rex_loader(dataset: str, view: str, batch_size: int, seed: int) -> Any:
    """Training's own path for the train split: Lance -> numpy -> tensors -> BatchLoader."""
    return _datamodule(dataset, view, batch_size, seed).loader("train")


class PandasLoader:
    """The train table in a DataFrame; per batch ``df.iloc[idx]`` converted to tensors."""

    def __init__(self, dataset: str, view: str, batch_size: int, seed: int) -> None:
        import lance

        from rex.data.loader import EpochShuffle

        datamodule = _datamodule(dataset, view, batch_size, seed)
        self.max_len = datamodule.recipe.data.max_len
        self.next_item = view == "sequence"
        if self.next_item:
            names = ["user", "items"]
        else:
            fields = datamodule.view.fields
            names = [n for n, spec in fields.items() if spec.kind != "sequence" or n == "history"]
        table = lance.dataset(str(datamodule._table("train"))).to_table(columns=names)
        frame = table.to_pandas()
        del table
        if self.next_item:  # a row needs 2 items for an input and a target (as rex keeps them)
            frame = frame[frame["items"].map(len) >= 2].reset_index(drop=True)
        self.frame = frame
        self.lists = [n for n in names if frame[n].dtype == object]
        self.batch_size = batch_size
        self.sampler = EpochShuffle(len(frame), seed, shuffle=True)

    def held_bytes(self) -> int:
        """The frame's bytes: its columns, each list row's array object and the values it views."""
        frame = self.frame
        total = int(frame.memory_usage(deep=True).sum())
        return total + sum(int(row.nbytes) for name in self.lists for row in frame[name])

    def __iter__(self) -> Iterator[Batch]:
        import numpy as np
        import torch

        order = self.sampler.order().numpy()
        for first in range(0, len(self.frame), self.batch_size):
            part = self.frame.iloc[order[first : first + self.batch_size]]
            batch: Batch = {}
            for name in part.columns:
                if name in self.lists:
                    continue
                values = part[name].to_numpy()
                dtype = np.float32 if values.dtype.kind == "f" else np.int64
                batch[name] = torch.from_numpy(values.astype(dtype))
            for name in self.lists:
                rows = part[name].tolist()
                if self.next_item:
                    windows = [row[-(self.max_len + 1) :] for row in rows]
                    batch["items"] = torch.from_numpy(_pad([w[:-1] for w in windows], self.max_len))
                    batch["targets"] = torch.from_numpy(_pad([w[1:] for w in windows], self.max_len))
                else:
                    batch[name] = torch.from_numpy(_pad(rows, self.max_len))
            yield batch


def _pad(rows: list[Any], max_len: int) -> Any:
    """Left-pad rows to the batch's longest (at most ``max_len``), keeping each row's last items."""
    import numpy as np

    width = min(max_len, max((len(row) for row in rows), default=0))
    out = np.zeros((len(rows), width), dtype=np.int64)
    if width == 0:
        return out
    for index, row in enumerate(rows):
        tail = row[-width:]
        out[index, width - len(tail) :] = tail
    return out


# --------------------------------------------------------------------------------------------
# worker


def _timed_epochs(loader: Any, epochs: int) -> list[dict[str, float]]:
    results = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        rows = batches = 0
        for batch in loader:
            rows += len(next(iter(batch.values())))
            batches += 1
        seconds = time.perf_counter() - started
        results.append(
            {
                "epoch": epoch,
                "seconds": round(seconds, 3),
                "rows": rows,
                "batches": batches,
                "rows_per_s": round(rows / seconds),
                "rss_mb": round(current_rss_mb(), 1),
            }
        )
    return results


def _warm_code_paths() -> None:
    """Run both loaders' code on a 3-row table, in both workers, before the baseline.

    The first call of a torch or pandas kernel pages its machine code in from the shared
    libraries, and that counts in RSS. Warming both paths on both sides makes those pages equal,
    so the peaks differ by what each loader allocates for the data.
    """
    import pandas
    import torch

    from rex.data.loader import BatchLoader, Ragged
    from rex.data.sequences import next_item_pairs

    values, offsets = torch.arange(1, 7), torch.tensor([0, 1, 3, 6])
    columns = {"items": Ragged(values, offsets, 3), "user": torch.arange(3), "label": torch.ones(3)}
    for _ in BatchLoader(columns, 2, shuffle=True, transform=next_item_pairs):
        pass
    rows = [values[offsets[i] : offsets[i + 1]].numpy() for i in range(3)]
    frame = pandas.DataFrame({"user": [1, 2, 3], "label": [1.0, 0.0, 1.0], "items": rows})
    for first in (0, 2):
        part = frame.iloc[[first]]
        for name in ("user", "label"):
            torch.from_numpy(part[name].to_numpy().astype("float32" if name == "label" else "int64"))
        _pad(part["items"].tolist(), 3)


def _checksum(batches: Iterable[Batch]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for batch in batches:
        for name, tensor in batch.items():
            sums[name] = sums.get(name, 0) + (
                float(tensor.sum()) if tensor.is_floating_point() else int(tensor.sum())
            )
    return sums


def worker(
    dataset: str, view: str, kind: str, epochs: int, batch_size: int, seed: int, threads: int | None
) -> dict[str, Any]:
    # Modules are imported before the first RSS reading, so "data MB" is the data alone.
    import pyarrow as pa
    import torch

    import rex.data.datamodule  # noqa: F401  (rex's own imports, on both sides)

    if threads is not None:
        torch.set_num_threads(threads)
    _warm_code_paths()
    baseline = current_rss_mb()
    started = time.perf_counter()
    build: Callable[..., Any] = rex_loader if kind == "rex" else PandasLoader
    loader = build(dataset, view, batch_size, seed)
    load_seconds = time.perf_counter() - started
    loaded = current_rss_mb()
    if kind == "rex":
        from rex.data.loader import Ragged

        held = sum(
            column.nbytes if isinstance(column, Ragged) else column.element_size() * column.nelement()
            for column in loader.columns.values()
        )
    else:
        held = loader.held_bytes()
    per_epoch = _timed_epochs(loader, epochs)
    loader.sampler.set_epoch(0)
    return {
        "loader": kind,
        "torch_threads": torch.get_num_threads(),
        "load_seconds": round(load_seconds, 3),
        "rss_before_load_mb": round(baseline, 1),
        "rss_after_load_mb": round(loaded, 1),
        "held_mb": round(held / 2**20, 1),
        "arrow_pool_mb": round(pa.total_allocated_bytes() / 2**20, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "epochs": per_epoch,
        "checksum": _checksum(loader),
    }


# --------------------------------------------------------------------------------------------
# driver


def _prepare(dataset: str) -> str | None:
    """Prepare the dataset if needed; the reason to skip it, or None."""
    from rex.config.errors import RexError
    from rex.data.prepare import ensure_dataset

    try:
        ensure_dataset(dataset)
    except RexError as exc:
        return str(exc)
    return None


def _spawn(dataset: str, view: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", kind, "--case", f"{dataset}:{view}"]
    command += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path.cwd())
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker on {dataset}:{view} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    timed = run["epochs"]
    rates = [e["rows_per_s"] for e in timed]
    return {
        "rows_per_s": round(sum(e["rows"] for e in timed) / sum(e["seconds"] for e in timed)),
        "best_rows_per_s": max(rates),
        "rss_growth_mb": round(timed[-1]["rss_mb"] - timed[0]["rss_mb"], 1),
    }


def _table(results: list[dict[str, Any]]) -> str:
    """Plain-text table: one row per loader; RSS after each epoch last (it should stay flat)."""
    header = (
        f"{'dataset:view':<20}{'loader':<8}{'rows':>11}{'load s':>8}{'rows/s':>12}{'peak RSS MB':>13}"
        f"{'data MB':>9}{'held MB':>9}{'same':>6}  RSS after each epoch, MB"
    )
    lines = [header, "-" * len(header)]
    for case in results:
        if "skipped" in case:
            lines.append(f"{case['case']:<20}skipped: {case['skipped']}")
            continue
        for run in case["runs"]:
            lines.append(
                f"{case['case']:<20}{run['loader']:<8}{run['epochs'][0]['rows']:>11,}"
                f"{run['load_seconds']:>8.1f}{run['summary']['rows_per_s']:>12,}{run['peak_rss_mb']:>13,.0f}"
                f"{run['rss_after_load_mb'] - run['rss_before_load_mb']:>9,.0f}{run['held_mb']:>9,.0f}"
                f"{'yes' if case['same_batches'] else 'NO':>6}  "
                + " ".join(f"{e['rss_mb']:.0f}" for e in run["epochs"])
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", help="DATASET:VIEW (view ctr or sequence); repeatable")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=LOADERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = args.case or DEFAULT_CASES

    if args.worker:
        dataset, view = cases[0].split(":")
        print(
            json.dumps(
                worker(dataset, view, args.worker, args.epochs, args.batch_size, args.seed, args.threads)
            )
        )
        return

    results: list[dict[str, Any]] = []
    for case in cases:
        dataset, _, view = case.partition(":")
        if view not in RECIPES:
            parser.error(f"{case}: expected DATASET:VIEW with VIEW one of {', '.join(RECIPES)}")
        reason = _prepare(dataset)
        if reason is not None:
            print(f"skipping {case}: {reason}", file=sys.stderr)
            results.append({"case": case, "skipped": reason})
            continue
        runs = []
        for kind in LOADERS:
            print(f"{case}: {kind} loader, {args.epochs} epochs ...", file=sys.stderr, flush=True)
            run = _spawn(dataset, view, kind, args)
            run["summary"] = _summary(run)
            runs.append(run)
        same = all(r["checksum"] == runs[0]["checksum"] for r in runs)
        results.append({"case": case, "runs": runs, "same_batches": same})

    import lance
    import numpy
    import pandas
    import torch

    report = {
        "benchmark": "loader",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {
            "torch": torch.__version__,
            "pandas": pandas.__version__,
            "pylance": lance.__version__,
            "numpy": numpy.__version__,
        },
        "settings": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "torch_threads": args.threads,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
