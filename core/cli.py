"""The ``rex`` command line.

Every user mistake surfaces as a :class:`RexError`, printed in 1-3 lines with exit code 2 and
no traceback (set ``REX_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rex.config.errors import RexError

app = typer.Typer(
    help="rex: declarative recommender-systems experiments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's plain output: a usage error in three lines rather than a boxed panel
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Prepare and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
out = Console(emoji=False)  # user text (names, ids, errors) is printed as written

Overrides = Annotated[
    list[str] | None, typer.Argument(help="dotlist overrides such as train.max_epochs=5", show_default=False)
]
Storage = Annotated[
    str | None,
    typer.Option(
        help="study storage URL over the spec's storage:, e.g. postgresql://rex:rex@127.0.0.1:5432/rex "
        "(scripts/postgres.sh starts a local server); REX_SWEEP_STORAGE also sets it",
        show_default=False,
    ),
]


def _use_storage(url: str | None) -> None:
    """``--storage`` reaches every spec this command loads, and the workers it starts, as
    REX_SWEEP_STORAGE: the environment keeps a password out of the files they share."""
    from rex.sweep.spec import STORAGE_ENV

    if url is not None:
        os.environ[STORAGE_ENV] = url


@app.command()
def train(
    recipe: Annotated[Path | None, typer.Argument(help="recipe YAML file", show_default=False)] = None,
    overrides: Overrides = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="run N seeds (recipe seed, +1, ...) and report mean ± std")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="continue a killed run from its folder")] = None,
    reuse_stages: Annotated[
        Path | None,
        typer.Option(help="take over the finished stages of this earlier run whose settings are unchanged"),
    ] = None,
    summary: Annotated[
        Path | None,
        typer.Option(help="also write the test metrics (mean ± std over seeds) to this JSON file"),
    ] = None,
) -> None:
    """Train a recipe, select on validation, test the best checkpoint."""
    from rex.config.recipe import load_recipe

    if resume is not None:
        if recipe is not None or overrides or reuse_stages is not None or summary is not None:
            raise RexError(
                "--resume takes only the run folder: the run's own recipe is reused", file="command line"
            )
        from rex.engine.train import resume as resume_run

        resume_run(resume)
        return
    if recipe is None:
        raise RexError("missing RECIPE: rex train recipes/<name>.yaml [key=value ...]", file="command line")
    # The recipe's own mistakes (syntax, keys, types, overrides) are reported before the training
    # stack, whose import takes seconds, is loaded.
    load_recipe(recipe, overrides or [])
    from rex.engine import train as training

    training.train(recipe, overrides or [], seeds, reuse_stages, summary)


@app.command("eval")
def evaluate(
    target: Annotated[Path, typer.Argument(help="run folder or .ckpt file")],
    record: Annotated[
        bool,
        typer.Option(
            "--record",
            help="write the result into the run's metrics.json as its test result, keeping the one it "
            "replaces (to re-test runs after an evaluation fix)",
        ),
    ] = False,
    devices: Annotated[
        int, typer.Option(min=1, help="processes to split the test set over (data-parallel, same metrics)")
    ] = 1,
    output: Annotated[
        Path | None, typer.Option(help="also write the metrics, unrounded, to this JSON file")
    ] = None,
    index: Annotated[
        Path | None,
        typer.Option(
            help="rank from this vector index of the model's items (rex export-index) instead of exactly",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Test metrics of a finished run's best checkpoint (metrics.json is untouched unless --record)."""
    from rex.engine.runs import atomic_write_json
    from rex.engine.train import evaluate as run_eval

    results = run_eval(target, record, devices, index)
    if results is None:  # another process of a data-parallel evaluation: the main one reports
        return
    if output is not None:
        atomic_write_json(output, results)
    table = Table(title="test metrics")  # the checkpoint's path is printed above it
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in results.items():
        table.add_row(name, f"{value:.4f}")
    out.print(table)


class IndexKind(StrEnum):
    hnsw = "hnsw"
    ivf_pq = "ivf_pq"


@app.command("export-index")
def export_index(
    # Checked here, before torch is imported, so a mistyped path fails at once.
    run: Annotated[
        Path, typer.Argument(help="run folder (a staged run: its last stage) or .ckpt file", exists=True)
    ],
    output: Annotated[
        Path | None,
        typer.Option(help="where to write the table (default: RUN/item_index.lance)", show_default=False),
    ] = None,
    index: Annotated[
        IndexKind, typer.Option(help="ivf_pq (IVF_PQ) or hnsw (IVF_HNSW_SQ)")
    ] = IndexKind.ivf_pq,
    partitions: Annotated[int | None, typer.Option(help="IVF partitions", show_default=False)] = None,
    sub_vectors: Annotated[
        int | None, typer.Option(help="PQ sub-vectors (ivf_pq)", show_default=False)
    ] = None,
    nprobes: Annotated[int | None, typer.Option(help="partitions searched", show_default=False)] = None,
    refine_factor: Annotated[
        int | None, typer.Option(help="candidates re-scored exactly, as a multiple of k", show_default=False)
    ] = None,
    ef: Annotated[
        int | None, typer.Option(help="graph candidates searched (hnsw)", show_default=False)
    ] = None,
) -> None:
    """Write a retrieval model's item vectors into a Lance table with a vector index (dot product).

    Defaults were chosen by measurement (benchmarks/vector_index.py); the search settings are
    stored with the table, where `rex eval RUN --index PATH` finds them.
    """
    from rex.engine.export_index import export_index as write

    path, settings, rows = write(
        run,
        output,
        index.value,
        num_partitions=partitions,
        num_sub_vectors=sub_vectors,
        nprobes=nprobes,
        refine_factor=refine_factor,
        ef=ef,
    )
    shown = ", ".join(f"{k}={v}" for k, v in vars(settings).items() if v is not None and k != "kind")
    out.print(
        f"wrote {rows:,} item vectors with an index ({settings.kind}: {shown}) to {path}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="recipe files or folders of recipes")],
) -> None:
    """Build every component and run one batch through the model, without training."""
    from rex.config.recipe import recipe_files
    from rex.engine.validate import validate_recipe

    files = recipe_files([str(r) for r in recipes])
    if not files:
        raise RexError("no recipes found", file=" ".join(map(str, recipes)))
    failures = 0
    for path in files:
        try:
            summary = validate_recipe(path)
            out.print(f"ok   {path}  {summary}", markup=False, highlight=False, soft_wrap=True)
        except RexError as exc:
            failures += 1
            out.print(f"fail {exc}", markup=False, highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(code=2)


@app.command("list")
def list_components(
    kind: Annotated[str | None, typer.Argument(help="component kind, e.g. encoder")] = None,
) -> None:
    """Registered components with a one-line description."""
    from rex.config.registry import summaries

    found = summaries(kind)
    if not found:
        kinds = sorted({key.split("/")[0] for key, _ in summaries()})
        raise RexError(f"no components of kind {kind!r}; kinds: {', '.join(kinds)}", file="command line")
    table = Table(show_header=True)
    table.add_column("component")
    table.add_column("description")
    for key, summary in found:
        table.add_row(Text(key), Text(summary))  # Text: brackets in docs are not markup
    out.print(table)


@app.command()
def show(recipe: Path, overrides: Overrides = None) -> None:
    """Print the fully resolved recipe (and each stage of a staged recipe, resolved whole)."""
    import yaml

    from rex.config.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    typer.echo(loaded.to_yaml(), nl=False)
    for stage in loaded.stages:
        typer.echo(
            f"\n# ---- stage {stage.name}, resolved\n" + yaml.safe_dump(stage.resolved, sort_keys=False),
            nl=False,
        )


@app.command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="sweep spec YAML (see docs/sweeps.md)")],
    overrides: Overrides = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="trials in the study in all (spec: trials)")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="local worker processes sharing the study")] = 1,
    resume: Annotated[bool, typer.Option(help="continue an interrupted study")] = False,
    storage: Storage = None,
    join: Annotated[
        bool,
        typer.Option(
            help="a worker of a study shared across machines (one per job-array task): create the study "
            "or continue it, run trials until it is full, then stop; `--resume` afterwards settles it "
            "and tests the best trial"
        ),
    ] = False,
    worker_index: Annotated[
        int,
        typer.Option(
            min=0,
            help="number of this machine's first worker, which offsets the sampler seed (a job "
            "array passes its task id, so workers do not draw the same trials)",
        ),
    ] = 0,
    timeout: Annotated[float | None, typer.Option(min=1, help="seconds after which no trial starts")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="seeds of the best trial's re-run on test")] = None,
    test: Annotated[bool, typer.Option(help="re-run the best trial's recipe on test at the end")] = True,
    export_best: Annotated[
        bool, typer.Option(help="only write the best trial as a recipe override file (no trials)")
    ] = False,
    export_to: Annotated[
        Path | None, typer.Option(help="--export-best target (default SPEC_DIR/NAME.best.yaml)")
    ] = None,
    params_yaml: Annotated[
        Path | None, typer.Option(help="--export-best: also write the parameters into this params.yaml")
    ] = None,
) -> None:
    """Optuna study over a recipe: trials select on validation, the best is re-run on test."""
    from rex.sweep import study as sweeping

    if join and resume:
        raise RexError("--join already continues the study: drop --resume", file="command line")
    _use_storage(storage)
    if export_best:
        from rex.sweep.export import export_best as write_best

        target = write_best(spec, export_to, params_yaml)
        out.print(f"best trial written to {target}", markup=False, highlight=False, soft_wrap=True)
        return
    sweeping.sweep(
        spec,
        overrides or [],
        trials=trials,
        workers=workers,
        resume=resume,
        join=join,
        worker_index=worker_index,
        timeout=timeout,
        test_seeds=seeds,
        test=test,
    )


@app.command()
def report(
    targets: Annotated[
        list[Path], typer.Argument(help="run folders, multi-seed run folders or sweep folders")
    ],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="output folder (default TARGET/report)")
    ] = None,
    wandb: Annotated[
        bool, typer.Option(help="also publish the comparison to W&B (offline without a key)")
    ] = False,
    wandb_project: Annotated[str, typer.Option(help="W&B project for --wandb")] = "rex",
    storage: Storage = None,
) -> None:
    """Comparison table (Markdown, CSV), PNG plots and one self-contained HTML page."""
    from rex.eval.report import publish_wandb
    from rex.eval.report import report as make_report

    _use_storage(storage)
    result = make_report(targets, out_dir)
    out.print(
        f"report: {result.html} ({len(result.plots)} plots, table in {result.markdown.name} and "
        f"{result.csv.name})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if wandb:
        mode = publish_wandb(result, wandb_project)
        out.print(f"W&B report run: {mode}", markup=False, highlight=False)


@app.command("sweep-worker", hidden=True)
def sweep_worker(job: Path, worker: int) -> None:
    """One worker process of `rex sweep --workers N` (started by it, not by hand)."""
    from rex.sweep.worker import work_from_file

    work_from_file(job, worker)


@data_app.command("fetch")
def data_fetch(names: Annotated[list[str], typer.Argument(help="dataset names (see params.yaml)")]) -> None:
    """Fetch raw files (mirror or checksum-verified download) into data/_raw/."""
    from rex.data.prepare import fetch_dataset

    for name in names:
        out.print(f"{name}: raw files at {fetch_dataset(name)}", markup=False, soft_wrap=True)


@data_app.command("prepare")
def data_prepare(
    names: Annotated[list[str], typer.Argument(help="dataset names (see params.yaml)")],
    force: Annotated[bool, typer.Option(help="rebuild even if up to date")] = False,
) -> None:
    """Build datasets from the raw mirror into Lance tables."""
    from rex.data.prepare import prepare_dataset

    for name in names:
        schema = prepare_dataset(name, force=force)
        out.print(
            f"[green]{name}[/green]: {schema.num_users - 1} users, {schema.num_items - 1} items, "
            f"tables {', '.join(f'{t}={n}' for t, n in schema.tables.items())}"
        )


@data_app.command("info")
def data_info(name: str) -> None:
    """Schema, tables and counts of a prepared dataset."""
    from rex.data.prepare import dataset_info

    typer.echo(dataset_info(name))


@data_app.command("features")
def data_features(
    names: Annotated[list[str], typer.Argument(help="datasets with item text (see params.yaml)")],
    force: Annotated[bool, typer.Option(help="re-encode even if cached")] = False,
) -> None:
    """Embed item texts with MiniLM into the feature cache (computed once per text set)."""
    from rex.data.features import prepare_features

    for name in names:
        path = prepare_features(name, force=force)
        out.print(
            f"[green]{name}[/green]: MiniLM item-text features at {path}", highlight=False, soft_wrap=True
        )


@data_app.command("clusters")
def data_clusters(
    names: Annotated[list[str], typer.Argument(help="prepared datasets with item vectors (see params.yaml)")],
    force: Annotated[bool, typer.Option(help="recompute even if cached")] = False,
) -> None:
    """Group items by balanced K-means over their vectors (params.yaml clusters:), cached once."""
    from rex.data.clusters import prepare_clusters

    for name in names:
        path = prepare_clusters(name, force=force)
        out.print(f"[green]{name}[/green]: item groups at {path}", highlight=False, soft_wrap=True)


@data_app.command("import")
def data_import(
    mapping: Annotated[Path, typer.Argument(help="YAML mapping of your files' columns to roles")],
) -> None:
    """Import CSV, Parquet or RecBole atomic files as a dataset (then: rex train RECIPE data.name=NAME)."""
    from rex.data.importer import import_dataset

    imported = import_dataset(mapping)
    schema = imported.schema
    out.print(
        f"[green]{schema.name}[/green]: {schema.num_users - 1} users, {schema.num_items - 1} items, "
        f"views {', '.join(schema.views)}, tables {', '.join(f'{t}={n}' for t, n in schema.tables.items())}"
        f" at {imported.directory}",
        highlight=False,
        soft_wrap=True,
    )


def main() -> None:
    try:
        app(prog_name="rex")  # also under `python -m rex.cli`
    except RexError as exc:
        if os.environ.get("REX_DEBUG") == "1":
            raise
        # markup and emoji off: key paths such as losses[0] and user text such as :x: print as written
        Console(stderr=True, emoji=False).print(
            f"error: {exc}", markup=False, highlight=False, soft_wrap=True
        )
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
