"""``rex report``: compare runs, multi-seed runs and sweeps in one table, plots and an HTML page.

Writes ``report.md`` and ``report.csv`` (recipe, dataset, metrics as mean ± std over seeds, the
parameters that differ, wall time, samples/s), PNG plots (validation metric per epoch per run;
for sweeps Optuna's optimization history, parameter importances and intermediate values) and
``report.html``, one self-contained page with the plots embedded as base64 data URIs.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from rex.config.errors import RexError
from rex.engine.runs import METRICS_FILE, RECIPE_FILE, atomic_write_text, read_metrics

console = Console(stderr=True, emoji=False)  # user text (names, ids) is printed as written
SKIP_PARAMS = ("seed", "name", "description", "logging.")


@dataclass
class Row:
    label: str
    recipe: str
    dataset: str
    split: str  # "test", or "val" for sweep trials, which never see the test split
    metrics: dict[str, list[float]]
    params: dict[str, Any]
    wall_time_s: float | None
    samples_per_s: float | None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    monitor: str = ""
    state: str = ""


@dataclass
class SweepInfo:
    folder: Path
    summary: dict[str, Any]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def _best_validation(metrics: dict[str, Any]) -> dict[str, float]:
    """Validation metrics at the epoch the run selected (the best monitored score)."""
    records = metrics.get("validation") or []
    monitor = str(metrics.get("monitor", "")).removeprefix("val/")
    if not records or monitor not in records[0]:
        return {}
    lower = monitor == "logloss"
    best = (min if lower else max)(records, key=lambda r: r.get(monitor, math.nan))
    return {k: float(v) for k, v in best.items() if k not in ("epoch", "step", "elapsed_s")}


def _run_row(label: str, seed_dirs: list[Path], state: str = "") -> Row:
    runs = [read_metrics(d) for d in seed_dirs]
    if not runs[0]:
        raise RexError(f"no {METRICS_FILE}: not a finished or running rex run", file=str(seed_dirs[0]))
    tested = all("test" in r for r in runs)
    values = [r["test"] if tested else _best_validation(r) for r in runs]
    names = list(values[0])
    recipe_file = seed_dirs[0] / RECIPE_FILE
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    trains = [r.get("train", {}) for r in runs]
    walls = [t["wall_time_s"] for t in trains if t.get("wall_time_s") is not None]
    # rows_per_s: runs recorded before samples were counted by task
    rates = [
        t.get("samples_per_s") or t["rows_per_s"]
        for t in trains
        if t.get("samples_per_s") or t.get("rows_per_s")
    ]
    monitor = str(runs[0].get("monitor", "")).removeprefix("val/")
    return Row(
        label=label,
        recipe=str(runs[0].get("recipe", recipe.get("name", "?"))),
        dataset=str(runs[0].get("dataset", "?")),
        split="test" if tested else "val",
        metrics={n: [v[n] for v in values if n in v] for n in names},
        params=_flatten(recipe),
        wall_time_s=sum(walls) if walls else None,
        samples_per_s=sum(rates) / len(rates) if rates else None,
        curves={
            f"{label}" + (f" seed {r.get('seed')}" if len(runs) > 1 else ""): [
                (int(v["epoch"]), float(v[monitor])) for v in r.get("validation", []) if monitor in v
            ]
            for r in runs
        },
        monitor=monitor,
        state=state,
    )


def _seed_dirs(folder: Path) -> list[Path]:
    seeds = sorted(p for p in folder.glob("seed-*") if (p / METRICS_FILE).is_file())
    return seeds or [folder]


def collect(targets: list[Path]) -> tuple[list[Row], list[SweepInfo]]:
    rows: list[Row] = []
    sweeps: list[SweepInfo] = []
    for target in targets:
        if not target.is_dir():
            raise RexError(
                "not a folder: pass run folders or sweep folders (runs/sweeps/NAME)", file=str(target)
            )
        sweep_file = target / "sweep.json"
        if sweep_file.is_file():
            summary = json.loads(sweep_file.read_text())
            sweeps.append(SweepInfo(target, summary))
            for trial in summary.get("trials", []):
                run_dir = trial.get("run_dir")
                if run_dir and trial["state"] in ("COMPLETE", "PRUNED") and Path(run_dir).is_dir():
                    rows.append(
                        _run_row(
                            f"{summary['study']} #{trial['number']}",
                            _seed_dirs(Path(run_dir)),
                            trial["state"],
                        )
                    )
            if summary.get("test_run"):
                rows.append(
                    _run_row(f"{summary['study']} best → test", _seed_dirs(Path(summary["test_run"])))
                )
        elif (target / METRICS_FILE).is_file() or (target / "summary.json").is_file():
            rows.append(_run_row(target.name, _seed_dirs(target)))
        else:
            found = sorted(p.parent for p in target.glob(f"*/{METRICS_FILE}"))
            if not found:
                raise RexError("no metrics.json or sweep.json here or one level down", file=str(target))
            rows.extend(_run_row(p.name, _seed_dirs(p)) for p in found)
    if not rows:
        raise RexError(
            "nothing to report: no finished or pruned runs found", file=" ".join(map(str, targets))
        )
    return rows, sweeps


# ----------------------------------------------------------------------------------- table
def _differing(rows: list[Row]) -> list[str]:
    keys = sorted({k for r in rows for k in r.params if not k.startswith(SKIP_PARAMS)})
    return [k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True) for r in rows}) > 1]


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def table(rows: list[Row]) -> tuple[list[str], list[list[str]], list[list[Any]]]:
    """Column names, display cells (mean ± std) and CSV cells (mean and std apart)."""
    metric_names: list[str] = []
    for row in rows:
        metric_names += [m for m in row.metrics if m not in metric_names]
    differing = _differing(rows)
    columns = [
        "run",
        "state",
        "recipe",
        "dataset",
        "split",
        *metric_names,
        "parameters that differ",
        "wall time (s)",
        "samples/s",
    ]
    shown, raw = [], []
    for r in rows:
        cells, values = [], []
        for m in metric_names:
            if r.metrics.get(m):
                mean, std = _stats(r.metrics[m])
                cells.append(f"{mean:.4f} ± {std:.4f}" if len(r.metrics[m]) > 1 else f"{mean:.4f}")
                values += [mean, std if len(r.metrics[m]) > 1 else ""]
            else:
                cells.append("")
                values += ["", ""]
        params = "; ".join(f"{k}={_short(r.params.get(k))}" for k in differing)
        wall = "" if r.wall_time_s is None else f"{r.wall_time_s:.0f}"
        rate = "" if r.samples_per_s is None else f"{r.samples_per_s:,.0f}"
        shown.append([r.label, r.state, r.recipe, r.dataset, r.split, *cells, params, wall, rate])
        raw.append(
            [
                r.label,
                r.state,
                r.recipe,
                r.dataset,
                r.split,
                *values,
                params,
                r.wall_time_s if r.wall_time_s is not None else "",
                r.samples_per_s if r.samples_per_s is not None else "",
            ]
        )
    csv_columns = ["run", "state", "recipe", "dataset", "split"]
    for m in metric_names:
        csv_columns += [m, f"{m}_std"]
    csv_columns += ["parameters_that_differ", "wall_time_s", "samples_per_s"]
    # A column empty in every row (state outside a sweep, say) is left out of the shown table.
    keep = [i for i in range(len(columns)) if i == 0 or any(row[i] for row in shown)]
    columns = [columns[i] for i in keep]
    shown = [[row[i] for i in keep] for row in shown]
    return columns, shown, [csv_columns, *raw]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown(columns: list[str], cells: list[list[str]]) -> str:
    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return "\n".join([line(columns), line(["---"] * len(columns)), *map(line, cells)]) + "\n"


# ----------------------------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> None:
    # Written beside the target and renamed, like every other rex output.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def plot_curves(rows: list[Row], path: Path) -> bool:
    import matplotlib.pyplot as plt

    curves = {name: pts for r in rows for name, pts in r.curves.items() if pts}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in curves.items():
        ax.plot([p[0] + 1 for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {rows[0].monitor}")
    ax.set_title("Validation metric per epoch")
    ax.grid(alpha=0.3)
    if len(curves) <= 16:
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    plt.close(fig)
    return True


def plot_headline(rows: list[Row], path: Path) -> bool:
    import matplotlib.pyplot as plt

    metric = rows[0].monitor
    data = [(r.label, *_stats(r.metrics[metric]), r.split) for r in rows if r.metrics.get(metric)]
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(data) + 1)))
    ax.barh(
        [d[0] for d in data],
        [d[1] for d in data],
        xerr=[d[2] for d in data],
        color=["#d62728" if d[3] == "test" else "#1f77b4" for d in data],
    )
    ax.invert_yaxis()
    drawn = [
        name
        for split, name in (("val", "blue: validation"), ("test", "red: test"))
        if split in {d[3] for d in data}
    ]
    ax.set_xlabel(f"{metric} ({', '.join(drawn)})")
    ax.set_title(f"{metric} per run (mean ± std over seeds)")
    _save(fig, path)
    plt.close(fig)
    return True


def plot_study(sweep: SweepInfo, folder: Path) -> list[Path]:
    """Optuna's matplotlib plots of the study; a plot Optuna cannot draw (too few trials for
    importances, say) is left out with a note, never a failed report."""
    import warnings

    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    from rex.sweep.spec import load_spec
    from rex.sweep.storage import default_storage, make_storage

    spec_path = Path(sweep.summary["spec"])
    spec = load_spec(spec_path)
    name = sweep.summary["study"]
    try:
        study = optuna.load_study(
            study_name=name,
            storage=make_storage(spec.storage or default_storage(spec_path, name), spec, spec_path),
        )
    except KeyError as exc:  # Optuna's "no such study": this storage is not the sweep's
        raise RexError(
            f"study {name!r} is not in the spec's storage; a sweep run on another storage (a "
            "PostgreSQL server, say) is reported with the same --storage URL or REX_SWEEP_STORAGE",
            file=str(spec_path),
            key="storage",
        ) from exc
    made = []
    for kind, draw in (
        ("optimization_history", ovm.plot_optimization_history),
        ("param_importances", ovm.plot_param_importances),
        ("intermediate_values", ovm.plot_intermediate_values),
    ):
        path = folder / f"{name}_{kind}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = draw(study)
            fig: Any = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure  # type: ignore[attr-defined]
            fig.set_size_inches(8, 4.5)
            _save(fig, path)
            plt.close(fig)
            made.append(path)
        except Exception as exc:
            console.print(f"[yellow]{kind} plot skipped: {type(exc).__name__}: {exc}[/yellow]")
    return made


# ------------------------------------------------------------------------------------ HTML
def _html(
    title: str, columns: list[str], cells: list[list[str]], images: list[Path], notes: list[str]
) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in cells)
    figures = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in images
    )
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    # The script marks, once the page has loaded, how many images decoded: a headless browser
    # can read that back to check the page really renders.
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f0f0f0; }}
figure {{ display: inline-block; margin: 1em; }}
img {{ max-width: 760px; border: 1px solid #ddd; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<ul>{items}</ul>
<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>
<h2>Plots</h2>
{figures}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
  // and how wide the page lays out: a wide table must scroll inside its box, not widen the page
  document.body.setAttribute("data-page-width", document.documentElement.scrollWidth);
}});
</script>
</body></html>
"""


# ----------------------------------------------------------------------------------- entry
@dataclass
class Report:
    folder: Path
    markdown: Path
    csv: Path
    html: Path
    plots: list[Path]
    columns: list[str]
    cells: list[list[str]]


def report(targets: list[Path], out_dir: Path | None = None) -> Report:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    rows, sweeps = collect(targets)
    if out_dir is None:
        out_dir = (
            targets[0] / "report"
            if len(targets) == 1
            else Path("runs") / "reports" / datetime.now().strftime("%Y%m%d-%H%M%S")
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    columns, cells, csv_rows = table(rows)
    plots = []
    for name, draw in (("validation_curves", plot_curves), ("headline_metric", plot_headline)):
        if draw(rows, out_dir / f"{name}.png"):
            plots.append(out_dir / f"{name}.png")
    notes = [
        f"{len(rows)} row{'s' * (len(rows) != 1)} from {', '.join(str(t) for t in targets)}",
        "samples/s: training samples per second, validation excluded; a sample is one supervised "
        "prediction (a row for CTR, a position with a next item for next-item training)",
        "split 'val': sweep trials, selected on validation and never tested; split 'test': final runs",
    ]
    for sweep in sweeps:
        plots += plot_study(sweep, out_dir)
        s = sweep.summary
        best = s.get("best") or {}
        counts = ", ".join(f"{v} {k.lower()}" for k, v in s.get("counts", {}).items())
        notes.append(
            f"sweep {s['study']}: {counts}; best trial #{best.get('number')} "
            f"(validation {best.get('value')}); wall time {s.get('wall_time_s')} s"
        )
    title = "rex report"
    md = out_dir / "report.md"
    atomic_write_text(
        md, f"# {title}\n\n" + "".join(f"- {n}\n" for n in notes) + "\n" + _markdown(columns, cells)
    )
    buffer = io.StringIO()
    csv.writer(buffer).writerows(csv_rows)
    atomic_write_text(out_dir / "report.csv", buffer.getvalue())
    page = out_dir / "report.html"
    atomic_write_text(page, _html(title, columns, cells, plots, notes))
    return Report(out_dir, md, out_dir / "report.csv", page, plots, columns, cells)


def publish_wandb(result: Report, project: str) -> str:
    """Publish the same comparison (table, plots, the HTML page) as a W&B run of job type
    ``report`` and, online, as a W&B Report that shows them. Offline without an API key
    (``wandb sync`` the run later); never prompts."""
    from rex.config.schema import WandbConfig
    from rex.engine.tracking import resolve_mode

    mode = resolve_mode(WandbConfig(project=project))
    if mode == "disabled":
        return "disabled"
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(
        project=project,
        job_type="report",
        mode=mode,
        dir=str(result.folder),
        name=f"report-{result.folder.name}",
        config={"rows": len(result.cells)},
    )
    try:
        payload: dict[str, Any] = {
            "comparison": wandb.Table(columns=list[Any](result.columns), data=result.cells),
            "report": wandb.Html(result.html.read_text()),
        }
        for plot in result.plots:
            payload[f"plots/{plot.stem}"] = wandb.Image(str(plot))
        run.log(payload)
    finally:
        run.finish()
    if mode == "online":
        url = _wandb_report(result, project, str(run.entity), str(run.name))
        console.print(f"W&B report: {url}", markup=False, highlight=False)
    return mode


def _wandb_report(result: Report, project: str, entity: str, run_name: str) -> str:
    """A saved W&B Report: the comparison table as Markdown, then the report run's plots."""
    import wandb_workspaces.reports.v2 as wr

    table = result.markdown.read_text().split("\n", 2)[-1]  # without the page's own title
    page = wr.Report(  # the entity given, so building the page asks the API nothing
        project=project,
        entity=entity,
        title=f"rex report {result.folder.name}",
        description="Comparison written by `rex report`; the same table and plots as report.html.",
        blocks=[
            wr.MarkdownBlock(text=table),
            wr.PanelGrid(
                runsets=[wr.Runset(entity=entity, project=project, name=run_name, query=run_name)],
                panels=[wr.MediaBrowser(title="plots", media_keys=[f"plots/{p.stem}" for p in result.plots])],
            ),
        ],
    )
    page.save()
    return str(page.url)
