"""Loader benchmark: rex's Lance-backed loader against a pandas-in-memory baseline.

The loaders serve the same train table of a prepared dataset view as dict-of-tensor batches;
``rex`` and ``pandas`` in the same epoch-seeded order, as the same batches (a ctr view also gets
the ``stream`` row, which reads the table as ``data.stream: true`` training does):

* ``rex``: what training does (``RexDataModule``): Lance columns via ``read_columns`` into
  numpy (list columns as flat values + offsets), whole-split tensors (sequences left-padded),
  then ``rex.loader.BatchLoader``: one ``index_select`` per column per batch.
* ``pandas``: the usual baseline: the table read into a DataFrame (list columns become object
  columns of arrays), then per batch ``df.iloc[idx]`` and each column converted to a tensor,
  list columns padded row by row to the batch's longest (capped at ``max_len``).
* ``stream``: ``data.stream: true`` (``rex.data.stream.StreamLoader``): the table read fragment
  by fragment into a shuffled buffer of ``--buffer-rows`` rows, batches made from it as ``rex``
  makes them. Its order is its own, so "same" compares the sums of every column over an epoch.

Each loader runs in its own process, so ``ru_maxrss`` is its own peak. Several epochs are timed
and the RSS after each one is recorded (it should not grow). A last, untimed pass sums every
batch column of each loader: equal sums mean they served the same rows.

    python benchmarks/loader.py                      # ml-1m ctr, taobao_mb sequence and ctr
    python benchmarks/loader.py --case beauty:sequence --case ml-100k:ctr --epochs 2

Results: a table on stdout and ``benchmarks/results/loader.json``.

``--scaling`` instead measures how ``rex`` and ``stream`` grow with the data: the taobao_mb ctr
train table replicated (``--scale``; 1, 4 and 16 times by default), written to a temporary
folder, each loader in a fresh process per size. The in-memory loader's peak RSS grows with the
rows; the streaming loader's stays that of its buffers. Results in
``benchmarks/results/loader_stream.json``.

    python benchmarks/loader.py --scaling --scale 1 --scale 4 --scale 16 --scale 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "loader.json"
SCALING_RESULTS = REPO / "benchmarks" / "results" / "loader_stream.json"
DEFAULT_CASES = ["ml-1m:ctr", "taobao_mb:sequence", "taobao_mb:ctr"]
# The recipe whose data section (view, max_len) a view is read with, as in training.
RECIPES = {"ctr": REPO / "recipes" / "deepfm.yaml", "sequence": REPO / "recipes" / "sasrec.yaml"}
LOADERS = ("rex", "pandas", "stream")
SCALING_CASE = "taobao_mb:ctr"
DEFAULT_SCALES = [1, 4, 16]
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
# the three loaders (run inside a worker process)


def _datamodule(dataset: str, view: str, batch_size: int, seed: int, *overrides: str) -> Any:
    from rex.config.recipe import load_recipe
    from rex.data.datamodule import RexDataModule
    from rex.data.prepare import data_root

    recipe = load_recipe(
        RECIPES[view],
        [f"data.name={dataset}", f"data.view={view}", f"train.batch_size={batch_size}", *overrides],
    ).recipe
    return RexDataModule(recipe, data_root() / dataset, seed)


def rex_loader(dataset: str, view: str, batch_size: int, seed: int, buffer_rows: int) -> Any:
    """Training's own path for the train split: Lance -> numpy -> tensors -> BatchLoader."""
    return _datamodule(dataset, view, batch_size, seed).loader("train")


def stream_loader(dataset: str, view: str, batch_size: int, seed: int, buffer_rows: int) -> Any:
    """``data.stream``'s path: Lance fragments -> a shuffled buffer -> batches (StreamLoader)."""
    overrides = ["data.stream=true", f"data.stream_buffer_rows={buffer_rows}"]
    return _datamodule(dataset, view, batch_size, seed, *overrides).loader("train")


class PandasLoader:
    """The train table in a DataFrame; per batch ``df.iloc[idx]`` converted to tensors."""

    def __init__(self, dataset: str, view: str, batch_size: int, seed: int, buffer_rows: int) -> None:
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
        table = lance.dataset(str(datamodule.table("train"))).to_table(columns=names)
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
    """Run every loader's code on a 3-row table, in every worker, before the baseline.

    The first call of a torch, pandas or Lance kernel pages its machine code in from the shared
    libraries, and that counts in RSS. Warming every path on every side makes those pages equal,
    so the peaks differ by what each loader allocates for the data.
    """
    import lance
    import pandas
    import pyarrow as pa
    import torch

    from rex.data.loader import BatchLoader, Ragged
    from rex.data.sequences import next_item_pairs
    from rex.data.stream import StreamLoader

    values, offsets = torch.arange(1, 7), torch.tensor([0, 1, 3, 6])
    columns = {"items": Ragged(values, offsets, 3), "user": torch.arange(3), "label": torch.ones(3)}
    for _ in BatchLoader(columns, 2, shuffle=True, transform=next_item_pairs):
        pass
    with tempfile.TemporaryDirectory() as folder:
        table = pa.table({"user": [1, 2, 3], "label": [1.0, 0.0, 1.0], "items": [[1], [2, 3], [4, 5, 6]]})
        lance.write_dataset(table, f"{folder}/warm.lance")
        for _ in StreamLoader(f"{folder}/warm.lance", table.column_names, 2, buffer_rows=2, max_len=3):
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
    dataset: str,
    view: str,
    kind: str,
    epochs: int,
    batch_size: int,
    seed: int,
    threads: int | None,
    buffer_rows: int,
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
    builders: dict[str, Callable[..., Any]] = {
        "rex": rex_loader,
        "pandas": PandasLoader,
        "stream": stream_loader,
    }
    loader = builders[kind](dataset, view, batch_size, seed, buffer_rows)
    load_seconds = time.perf_counter() - started
    loaded = current_rss_mb()
    held: int | None = None  # the streaming loader holds no columns, only a buffer while it serves
    if kind == "rex":
        from rex.data.loader import Ragged

        held = sum(
            column.nbytes if isinstance(column, Ragged) else column.element_size() * column.nelement()
            for column in loader.columns.values()
        )
    elif kind == "pandas":
        held = loader.held_bytes()
    per_epoch = _timed_epochs(loader, epochs)
    loader.sampler.set_epoch(0)
    return {
        "loader": kind,
        "torch_threads": torch.get_num_threads(),
        "load_seconds": round(load_seconds, 3),
        "rss_before_load_mb": round(baseline, 1),
        "rss_after_load_mb": round(loaded, 1),
        "held_mb": None if held is None else round(held / 2**20, 1),
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


def _spawn(
    dataset: str, view: str, kind: str, args: argparse.Namespace, data_home: Path | None = None
) -> dict[str, Any]:
    """Run one loader in a fresh process (reading datasets from ``data_home`` when given)."""
    command = [sys.executable, __file__, "--worker", kind, "--case", f"{dataset}:{view}"]
    command += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    command += ["--buffer-rows", str(args.buffer_rows)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "REX_DATA_HOME": str(data_home)} if data_home is not None else None
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path.cwd(), env=env)
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
            held = "-" if run["held_mb"] is None else f"{run['held_mb']:,.0f}"
            lines.append(
                f"{case['case']:<20}{run['loader']:<8}{run['epochs'][0]['rows']:>11,}"
                f"{run['load_seconds']:>8.1f}{run['summary']['rows_per_s']:>12,}{run['peak_rss_mb']:>13,.0f}"
                f"{run['rss_after_load_mb'] - run['rss_before_load_mb']:>9,.0f}{held:>9}"
                f"{'yes' if case['same_batches'] else 'NO':>6}  "
                + " ".join(f"{e['rss_mb']:.0f}" for e in run["epochs"])
            )
    return "\n".join(lines)


def _scaling_table(results: list[dict[str, Any]]) -> str:
    """One row per (size, loader), with the streaming loader's rate as a fraction of the
    in-memory one's; then how much each loader's peak grew from the first size to the last.
    ``added MB`` is the peak less the RSS before loading: a streaming loader takes its memory
    while serving, not while loading."""
    header = (
        f"{'scale':>6}  {'loader':<8}{'rows':>11}{'load s':>8}{'rows/s':>12}{'stream/rex':>11}"
        f"{'peak RSS MB':>13}{'added MB':>10}{'same':>6}"
    )
    lines = [header, "-" * len(header)]
    for size in results:
        rates = {run["loader"]: run["summary"]["rows_per_s"] for run in size["runs"]}
        for run in size["runs"]:
            ratio = f"{rates['stream'] / rates['rex']:.2f}" if run["loader"] == "stream" else ""
            lines.append(
                f"{size['scale']:>5}x  {run['loader']:<8}{run['epochs'][0]['rows']:>11,}"
                f"{run['load_seconds']:>8.1f}{run['summary']['rows_per_s']:>12,}{ratio:>11}"
                f"{run['peak_rss_mb']:>13,.0f}{run['peak_rss_mb'] - run['rss_before_load_mb']:>10,.0f}"
                f"{'yes' if size['same_batches'] else 'NO':>6}"
            )
    first, last = results[0], results[-1]
    for kind in ("rex", "stream"):
        peaks = [
            next(r["peak_rss_mb"] for r in size["runs"] if r["loader"] == kind) for size in (first, last)
        ]
        lines.append(
            f"{kind}: peak RSS {peaks[0]:,.0f} MB at {first['scale']}x, {peaks[1]:,.0f} MB at "
            f"{last['scale']}x ({peaks[1] - peaks[0]:+,.0f} MB)"
        )
    return "\n".join(lines)


def _replicate(source: Path, factor: int, home: Path) -> None:
    """``home``/DATASET: ``source``'s schema and its ctr train table ``factor`` times over."""
    import lance
    import pyarrow as pa

    from rex.data.schema import load_schema

    table_name = load_schema(source).views["ctr"].tables["train"]
    target = home / source.name
    target.mkdir(parents=True)
    shutil.copy(source / "schema.json", target / "schema.json")
    table = lance.dataset(str(source / f"{table_name}.lance")).to_table()
    lance.write_dataset(pa.concat_tables([table] * factor), str(target / f"{table_name}.lance"))


def _runs(
    dataset: str, view: str, kinds: tuple[str, ...], args: argparse.Namespace, home: Path | None = None
) -> dict[str, Any]:
    """Each of ``kinds`` on one table in its own process, and whether they served the same rows."""
    runs = []
    for kind in kinds:
        print(f"{dataset}:{view}: {kind} loader, {args.epochs} epochs ...", file=sys.stderr, flush=True)
        run = _spawn(dataset, view, kind, args, home)
        run["summary"] = _summary(run)
        runs.append(run)
    return {"runs": runs, "same_batches": all(r["checksum"] == runs[0]["checksum"] for r in runs)}


def _scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The in-memory and the streaming loader on the replicated tables, smallest first."""
    from rex.data.prepare import data_root

    dataset, view = SCALING_CASE.split(":")
    reason = _prepare(dataset)
    if reason is not None:
        raise SystemExit(f"cannot run the scaling study: {reason}")
    results = []
    for factor in sorted(args.scale or DEFAULT_SCALES):
        with tempfile.TemporaryDirectory(prefix="rex-loader-scale-") as folder:
            _replicate(data_root() / dataset, factor, Path(folder))
            case = _runs(dataset, view, ("rex", "stream"), args, Path(folder))
        results.append({"case": SCALING_CASE, "scale": factor, **case})
    return results


def _cases(cases: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every loader that can serve each DATASET:VIEW case, preparing the dataset if needed."""
    results: list[dict[str, Any]] = []
    for case in cases:
        dataset, _, view = case.partition(":")
        reason = _prepare(dataset)
        if reason is not None:
            print(f"skipping {case}: {reason}", file=sys.stderr)
            results.append({"case": case, "skipped": reason})
            continue
        # Only a ctr view streams: next-item training builds its rows from the table's sequences.
        kinds = LOADERS if view == "ctr" else tuple(k for k in LOADERS if k != "stream")
        results.append({"case": case, **_runs(dataset, view, kinds, args)})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", help="DATASET:VIEW (view ctr or sequence); repeatable")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--buffer-rows", type=int, default=65_536, help="the streaming loader's buffer")
    parser.add_argument(
        "--scaling", action="store_true", help=f"{SCALING_CASE} replicated: rex against stream"
    )
    parser.add_argument(
        "--scale", type=int, action="append", help="a replication factor of --scaling; repeatable"
    )
    parser.add_argument("--out", type=Path, help=f"default {RESULTS}, with --scaling {SCALING_RESULTS}")
    parser.add_argument("--worker", choices=LOADERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = args.case or DEFAULT_CASES

    if args.worker:
        dataset, view = cases[0].split(":")
        run = worker(
            dataset,
            view,
            args.worker,
            args.epochs,
            args.batch_size,
            args.seed,
            args.threads,
            args.buffer_rows,
        )
        print(json.dumps(run))
        return

    for case in cases:
        if case.partition(":")[2] not in RECIPES:
            parser.error(f"{case}: expected DATASET:VIEW with VIEW one of {', '.join(RECIPES)}")
    results = _scaling(args) if args.scaling else _cases(cases, args)

    import lance
    import numpy
    import pandas
    import torch

    report = {
        "benchmark": "loader_stream" if args.scaling else "loader",
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
            "buffer_rows": args.buffer_rows,
        },
        "results": results,
    }
    out = args.out or (SCALING_RESULTS if args.scaling else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(_scaling_table(results) if args.scaling else _table(results))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
