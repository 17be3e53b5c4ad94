"""``rex sweep``: Optuna studies over recipes.

A trial is a set of recipe overrides run through the same training path as ``rex train``, into
an ordinary run folder (``trials/trial-NNNN``) that records its trial number in ``trial.json``;
the trial stores that folder as its ``run_dir`` user attribute. Trials select on validation only
(they never touch the test split); the best trial's recipe is re-run on test at the end.

Several local worker processes (``--workers N``) or workers on other machines (``--join``, one
command per machine or job-array task) share one study through its storage (SQLite by default,
any SQLAlchemy URL otherwise, such as a PostgreSQL server). Running trials send heartbeats, so a
trial whose worker was killed is marked failed once it falls silent.
This module is the driver; ``space``, ``worker``, ``storage`` and ``export`` beside it hold the
search, the workers, the storage and ``--export-best``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from rex.config.errors import RecipeError, RexError
from rex.config.recipe import LoadedRecipe, load_recipe
from rex.engine.runs import atomic_write_json
from rex.sweep.space import check_space
from rex.sweep.spec import (
    SweepSpec,
    check_objective,
    load_spec,
)
from rex.sweep.storage import STORAGE_ENV, default_storage, fail_silent_trials, make_storage, shown_storage
from rex.sweep.worker import Job, work

console = Console(stderr=True, emoji=False)  # user text (names, ids) is printed as written
out = Console()
SWEEP_FILE = "sweep.json"
TERMINAL = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# ------------------------------------------------------------------------------- the driver
@dataclass
class Prepared:
    spec: SweepSpec
    job: Job
    base: LoadedRecipe


def prepare(
    spec_path: Path, cli_overrides: list[str], trials: int | None, timeout: float | None, workers: int
) -> Prepared:
    """Load and check everything (spec, recipe, objective, every search key) before any trial."""
    spec_file = str(spec_path)
    spec = load_spec(spec_path)
    if trials is not None:
        spec.trials = trials
    if timeout is not None:
        spec.timeout = timeout
    name = spec.name or spec_path.stem
    recipe_path = (spec_path.resolve().parent / spec.recipe).resolve()
    if not recipe_path.is_file():
        raise RecipeError(
            f"base recipe {spec.recipe!r} not found next to the spec", file=spec_file, key="recipe"
        )
    fixed = [*spec.overrides, *cli_overrides]
    for key, extra in (("overrides", []), ("trial_overrides", spec.trial_overrides)):
        try:
            first = load_recipe(recipe_path, [*fixed, *extra])
        except RecipeError as exc:
            raise RecipeError(f"{exc.key or 'recipe'}: {exc.detail}", file=spec_file, key=key) from exc
    # A staged recipe is selected on its last stage, which the pruner watches.
    selected = first.stages[-1].recipe if first.stages else first.recipe
    check_objective(spec, list(selected.eval.metrics or []), spec_file)
    # Checkpoint selection, early stopping and the objective all follow the objective's metric.
    monitor = f"stages.{first.stages[-1].name}.eval.monitor" if first.stages else "eval.monitor"
    fixed += [f"{monitor}={spec.objective.metric}", "logging.progress_bar=false"]
    wandb = first.recipe.logging.wandb
    if wandb is not None and wandb.group is None:
        fixed.append(f"logging.wandb.group={name}")  # one W&B group per study
    base = load_recipe(recipe_path, fixed)
    check_space(spec, spec_file, recipe_path, base, fixed)
    if spec.sampler.type == "grid":
        for key, param in spec.params.items():
            try:
                param.grid()
            except ValueError as exc:
                raise RecipeError(str(exc), file=spec_file, key=f"params.{key}") from exc
    trial_only = list(spec.trial_overrides)
    if workers > 1 and base.recipe.train.num_threads is None:
        # Workers share the cores; without this each would start a thread per core.
        trial_only.append(f"train.num_threads={max(1, (os.cpu_count() or 1) // workers)}")
    sweep_dir = Path(base.recipe.logging.run_root).resolve() / "sweeps" / name
    job = Job(
        spec_path=str(spec_path.resolve()),
        recipe_path=str(recipe_path),
        name=name,
        storage=spec.storage or default_storage(spec_path, name),
        sweep_dir=str(sweep_dir),
        trials=spec.trials,
        deadline=time.time() + spec.timeout if spec.timeout else None,
        base_overrides=fixed,
        trial_overrides=trial_only,
    )
    return Prepared(spec, job, base)


def _open_study(prep: Prepared, resume: bool, join: bool) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """The study, created if new. Only ``--join`` takes it either way: workers of a job array
    start in any order, so the first creates it and the others continue it."""
    spec, job = prep.spec, prep.job
    storage = make_storage(job.storage, spec, job.spec_path)
    if not join:
        exists = any(s.study_name == job.name for s in optuna.get_all_study_summaries(storage))
        if exists and not resume:
            study = optuna.load_study(study_name=job.name, storage=storage)
            if study.get_trials(deepcopy=False):
                raise RexError(
                    f"study {job.name!r} already has {len(study.trials)} trials in "
                    f"{shown_storage(job.storage)}; pass --resume to continue it, or set another name: in the spec",
                    file=job.spec_path,
                )
        if resume and not exists:
            raise RexError(
                f"--resume: no study {job.name!r} in {shown_storage(job.storage)}; start it without --resume",
                file=job.spec_path,
            )
    study = optuna.create_study(
        study_name=job.name,
        storage=storage,
        direction=spec.objective.direction,
        load_if_exists=True,
    )
    return study, storage


@contextlib.contextmanager
def _workers(job: Job, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    job_file = Path(job.sweep_dir) / ".job.json"
    # The storage URL may hold a password: it goes to the workers through their environment,
    # never into a file.
    atomic_write_json(job_file, {**asdict(job), "storage": None})
    env = {**os.environ, STORAGE_ENV: job.storage}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rex.cli", "sweep-worker", str(job_file), str(job.worker + i)], env=env
        )
        for i in range(count)
    ]
    try:
        yield procs
    finally:
        for proc in procs:  # on Ctrl-C, stop the workers we started, then wait for them
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()  # Lightning defers SIGTERM to the next batch; do not wait for ever
                proc.wait()


def _settle_stale(study: optuna.Study, storage: optuna.storages.RDBStorage, spec: SweepSpec) -> None:
    """Wait until trials left RUNNING by a killed worker fall silent past the grace period and
    mark them failed, so every trial ends COMPLETE, PRUNED or FAIL. Live workers elsewhere keep
    their trials: we give up waiting after one grace period."""
    # Two grace periods: a trial that never beat gets its first beat here, then goes stale.
    deadline = time.monotonic() + 2 * spec.grace_period + 2 * spec.heartbeat_interval
    while True:
        fail_silent_trials(study, storage, spec)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or time.monotonic() > deadline:
            return
        console.print(f"waiting for {len(running)} silent trial(s) to pass the grace period", style="dim")
        time.sleep(min(spec.heartbeat_interval, 5))


def sweep(
    spec_path: Path,
    cli_overrides: list[str],
    *,
    trials: int | None = None,
    workers: int = 1,
    resume: bool = False,
    join: bool = False,
    worker_index: int = 0,
    timeout: float | None = None,
    test_seeds: int | None = None,
    test: bool = True,
) -> Path:
    """Run the study's trials in ``workers`` local processes (numbered from ``worker_index``, which
    offsets their sampler seeds), then settle it, sum it up and test the best trial; with
    ``join``, only run trials: other workers may still be training."""
    started = time.time()
    prep = prepare(spec_path, cli_overrides, trials, timeout, workers)
    spec, job = prep.spec, prep.job
    job.worker = worker_index
    study, storage = _open_study(prep, resume, join)
    Path(job.sweep_dir).mkdir(parents=True, exist_ok=True)
    console.print(
        f"study {job.name}: {spec.trials} trials, {workers} worker(s), storage {shown_storage(job.storage)}",
        markup=False,
        highlight=False,
    )
    if resume or join:
        fail_silent_trials(study, storage, spec)
    # `kill PID` of the driver: exit through the finally blocks, which stop the workers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if workers == 1:
        work(job)
    else:
        with _workers(job, workers) as procs:
            codes = [p.wait() for p in procs]
        for i, code in enumerate(codes):
            if code != 0:
                console.print(
                    f"[yellow]worker {job.worker + i} exited with code {code}; "
                    "its trial is marked failed[/yellow]"
                )
    if join:
        counts = summarize_study(study, job)["counts"]
        out.print(
            f"study {job.name}: {sum(counts.values())} of {spec.trials} trials ({_counts(counts)}); when "
            f"every worker is done, `rex sweep {spec_path} --resume` on the same storage settles it and "
            "tests the best trial",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return Path(job.sweep_dir)
    _settle_stale(study, storage, spec)
    summary = summarize_study(study, job)
    summary["wall_time_s"] = round(time.time() - started, 1)
    best = study.best_trial if summary["counts"].get("COMPLETE") else None
    if best is None:
        atomic_write_json(Path(job.sweep_dir) / SWEEP_FILE, summary)
        raise RexError(
            "no trial completed, so there is no best trial; see the trial lines above", file=job.spec_path
        )
    print_trials(study, spec)
    if test:
        from rex.engine.train import train

        best_overrides = list(best.user_attrs.get("overrides", []))
        root = train(
            job.recipe_path,
            [*job.base_overrides, *best_overrides, f"logging.run_root={Path(job.sweep_dir) / 'best'}"],
            seeds=test_seeds or spec.test_seeds,
        )
        summary["test_run"] = str(root)
        summary["test"] = _test_metrics(root)
    summary["wall_time_s"] = round(time.time() - started, 1)
    atomic_write_json(Path(job.sweep_dir) / SWEEP_FILE, summary)
    out.print(f"sweep folder: {job.sweep_dir}", markup=False, highlight=False, soft_wrap=True)
    return Path(job.sweep_dir)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))


def _test_metrics(root: Path) -> dict[str, Any]:
    from rex.engine.runs import read_metrics

    summary = root / "summary.json"
    if summary.is_file():
        return {k: v["mean"] for k, v in json.loads(summary.read_text())["test"].items()}
    return dict(read_metrics(root).get("test", {}))


def summarize_study(study: optuna.Study, job: Job) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    summary: dict[str, Any] = {
        "study": job.name,
        "storage": shown_storage(job.storage),
        "spec": job.spec_path,
        "recipe": job.recipe_path,
        "direction": study.direction.name.lower(),
        "counts": counts,
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "run_dir": t.user_attrs.get("run_dir"),
            }
            for t in trials
        ],
    }
    if counts.get("COMPLETE"):
        best = study.best_trial
        summary["best"] = {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "overrides": best.user_attrs.get("overrides", []),
            "run_dir": best.user_attrs.get("run_dir"),
        }
    return summary


def print_trials(study: optuna.Study, spec: SweepSpec) -> None:
    table = Table(
        title=f"{study.study_name} · validation {spec.objective.metric} ({spec.objective.direction})"
    )
    for column in ("trial", "state", spec.objective.metric, "parameters"):
        table.add_column(column)
    best = study.best_trial.number
    for t in study.get_trials(deepcopy=False):
        mark = " *" if t.number == best else ""
        value = "" if t.value is None else f"{t.value:.4f}"
        table.add_row(
            f"{t.number}{mark}", t.state.name, value, " ".join(f"{k}={v}" for k, v in t.params.items())
        )
    out.print(table)
