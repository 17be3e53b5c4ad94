"""``rex sweep``: Optuna studies over recipes.

A trial is a set of recipe overrides run through the same training path as ``rex train``, into
an ordinary run folder (``trials/trial-NNNN``) that records its trial number in ``trial.json``;
the trial stores that folder as its ``run_dir`` user attribute. Trials select on validation only
(they never touch the test split); the best trial's recipe is re-run on test at the end.

Several local worker processes (``--workers N``) or workers on other machines share one study
through its storage (SQLite by default, any SQLAlchemy URL otherwise). Running trials send
heartbeats, so a trial whose worker was killed is marked failed once it falls silent.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from rex.config.errors import RecipeError, RexError
from rex.config.recipe import LoadedRecipe, load_recipe
from rex.config.schema import Recipe
from rex.engine.runs import atomic_write_json, atomic_write_text
from rex.sweep.spec import (
    CategoricalParam,
    SweepSpec,
    check_objective,
    condition_holds,
    condition_keys,
    load_spec,
    override,
)

console = Console(stderr=True)
out = Console()
SWEEP_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
STORAGE_ENV = "REX_SWEEP_STORAGE"
TERMINAL = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# model and losses are free-form component trees: the registry checks their arguments when the
# probe recipe is built. Every other section is a pydantic model that rejects unknown keys.
COMPONENT_SECTIONS = ("model", "losses")


# ------------------------------------------------------------------------------------- set-up
@dataclass
class Job:
    """Everything a worker process needs; written as JSON so workers start from the same facts."""

    spec_path: str
    recipe_path: str
    name: str
    storage: str
    sweep_dir: str
    trials: int
    deadline: float | None
    base_overrides: list[str]
    trial_overrides: list[str] = field(default_factory=list)
    worker: int = 0


def _get(tree: Any, key: str) -> tuple[bool, Any]:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _stage_tree(loaded: LoadedRecipe, key: str) -> tuple[dict[str, Any], str]:
    """The resolved tree a search key lives in and its path there: the recipe's own, or for
    ``stages.NAME.rest`` the named stage's whole resolved recipe and ``rest``."""
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) > 2:
        for stage in loaded.stages:
            if stage.name == parts[1]:
                return stage.resolved, ".".join(parts[2:])
    return loaded.resolved, key


def default_storage(spec_path: Path, name: str) -> str:
    folder = spec_path.resolve().parent / ".studies"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / name}.db"


def shown_storage(url: str) -> str:
    """The storage URL with any password masked: never print or store a secret."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL shows as its scheme only
        return url.split(":", 1)[0] + "://..."


def make_storage(url: str, spec: SweepSpec) -> optuna.storages.RDBStorage:
    # SQLite serialises writers; a generous busy timeout lets several workers share one file.
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    try:
        # Heartbeats and fail_stale_trials are marked experimental; the warnings say nothing actionable.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=spec.heartbeat_interval,
            grace_period=spec.grace_period,
        )
    except Exception as exc:
        raise RexError(
            f"cannot open study storage {shown_storage(url)}: {type(exc).__name__}", key="storage"
        ) from exc


def make_sampler(spec: SweepSpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    cfg = spec.sampler
    # Each worker process has its own sampler: with one shared seed, parallel workers would draw
    # the very same random start-up trials.
    seed = None if cfg.seed is None else cfg.seed + worker
    startup = {} if cfg.n_startup_trials is None else {"n_startup_trials": cfg.n_startup_trials}
    if cfg.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.type == "grid":
        space = {key: p.grid() for key, p in spec.params.items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    if cfg.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    # constant_liar: parallel workers see running trials as bad, so they do not all sample the
    # same promising point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **startup)


def make_pruner(spec: SweepSpec, max_epochs: int) -> optuna.pruners.BasePruner:
    cfg = spec.pruner
    if cfg.type == "none":
        return optuna.pruners.NopPruner()
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource, max_resource=max_epochs, reduction_factor=cfg.reduction_factor
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
    )


# ------------------------------------------------------------------------------ space checks
def check_space(
    spec: SweepSpec, spec_file: str, recipe_path: Path, base: LoadedRecipe, fixed: list[str]
) -> None:
    """Every search key must name something in the resolved base recipe (or an argument of the
    component there), and each end of its range must load and build. Runs before any trial."""
    from rex.config.registry import build, load_plugins
    from rex.data.datamodule import RexDataModule
    from rex.data.prepare import ensure_dataset

    load_plugins(base.recipe.plugins)
    context = RexDataModule(base.recipe, ensure_dataset(base.recipe.data.name), 0).context()
    keys = list(spec.params)
    for index, (key, param) in enumerate(spec.params.items()):
        where = f"params.{key}"
        top = key.split(".", 1)[0]
        if top not in Recipe.model_fields:
            close = difflib.get_close_matches(top, list(Recipe.model_fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RecipeError(f"no such recipe section {top!r}{hint}", file=spec_file, key=where)
        enable = _enabling_overrides(spec, keys[:index], param.when, base, spec_file, where)
        enabled = _load(recipe_path, fixed + enable, spec_file, where, None)
        # stages.NAME.rest names a key of that stage's whole resolved recipe
        tree, tree_key = _stage_tree(enabled, key)
        top = tree_key.split(".", 1)[0] if tree is not enabled.resolved else top
        parent_key, _, leaf = tree_key.rpartition(".")
        found, parent = _get(tree, parent_key) if parent_key else (True, tree)
        if not found or not isinstance(parent, dict):
            hint = "" if param.when else f"; add `when: {parent_key}` if it is set by another parameter"
            raise RecipeError(
                f"{parent_key} is not a section of the base recipe, so {key} does not exist{hint}",
                file=spec_file,
                key=where,
            )
        is_component = "_component_" in parent
        if leaf not in parent and not is_component and top in COMPONENT_SECTIONS:
            raise RecipeError(f"{parent_key} has no key {leaf!r}", file=spec_file, key=where)
        for value in param.probes():
            probe = _load(recipe_path, [*fixed, *enable, override(key, value)], spec_file, where, value)
            # A later stage's components need what earlier stages export: its probe loads only.
            if top in COMPONENT_SECTIONS and tree is enabled.resolved:
                try:
                    build(probe.recipe.model, "model", context)
                    for i, node in enumerate(probe.recipe.losses or []):
                        build({k: v for k, v in node.items() if k != "weight"}, f"losses[{i}]", context)
                except RecipeError as exc:
                    raise _probe_error(exc, spec_file, where, value) from exc


def _probe_error(exc: RexError, spec_file: str, where: str, value: Any) -> RecipeError:
    inner = f"{exc.key}: " if exc.key and f"params.{exc.key}" != where else ""
    at = "" if value is None else f" (with value {value!r})"
    return RecipeError(f"{inner}{exc.detail}{at}", file=spec_file, key=where)


def _load(recipe: Path, overrides: list[str], spec_file: str, where: str, value: Any) -> LoadedRecipe:
    try:
        return load_recipe(recipe, overrides)
    except RecipeError as exc:
        raise _probe_error(exc, spec_file, where, value) from exc


def _enabling_overrides(
    spec: SweepSpec, earlier: list[str], cond: Any, base: LoadedRecipe, spec_file: str, where: str
) -> list[str]:
    """Overrides that make a conditional parameter active, for checking its key."""
    if cond is None:
        return []
    overrides = []
    for ckey in condition_keys(cond):
        if ckey not in earlier and not _get(base.resolved, ckey)[0]:
            raise RecipeError(
                f"when: {ckey!r} is neither a parameter listed before this one nor a key of the base recipe",
                file=spec_file,
                key=f"{where}.when",
            )
        wanted = cond.get(ckey) if isinstance(cond, dict) else None
        options = wanted if isinstance(wanted, list) else [wanted]
        if isinstance(cond, str):
            source = spec.params.get(ckey)
            options = (
                [c for c in source.choices if c is not None] if isinstance(source, CategoricalParam) else []
            )
        if options and options[0] is not None:
            overrides.append(override(ckey, options[0]))
    return overrides


# ---------------------------------------------------------------------------------- a trial
def sample(trial: optuna.Trial, spec: SweepSpec, base: dict[str, Any]) -> dict[str, Any]:
    """Define-by-run: a conditional parameter is suggested only when its condition holds."""
    values: dict[str, Any] = {}
    for key, param in spec.params.items():
        lookup = {k: values[k] if k in values else _get(base, k)[1] for k in condition_keys(param.when or {})}
        if not condition_holds(param.when, lookup):
            continue
        raw = suggest(trial, key, param.distribution())
        if isinstance(param, CategoricalParam):
            raw = param.value_of(raw)
        elif isinstance(raw, float) and getattr(param, "step", None):
            raw = round(raw, 10)  # 0.30000000000000004 from a 0.1 step reads back as 0.3
        values[key] = raw
    return values


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """``trial.suggest_*`` for a parameter's distribution, through Optuna's public API."""
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    assert isinstance(distribution, CategoricalDistribution)
    return trial.suggest_categorical(name, distribution.choices)


class _Gate:
    """A machine-local lock held from "count the trials" until the new trial exists, so local
    workers never start more trials than asked. (Workers on other machines can overshoot by one
    trial each, as with Optuna's own MaxTrialsCallback.)"""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = path.open("a")
        self.held = False

    def acquire(self) -> None:
        fcntl.flock(self._handle, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if self.held:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self.held = False


def _lock_path(job: Job) -> Path:
    if job.storage.startswith("sqlite:///"):
        return Path(job.storage.removeprefix("sqlite:///") + ".lock")
    return Path(job.sweep_dir) / ".trial.lock"


def run_trial(trial: optuna.Trial, job: Job, spec: SweepSpec, base: dict[str, Any]) -> float:
    params = sample(trial, spec, base)
    overrides = [override(k, v) for k, v in params.items()]
    trial_dir = Path(job.sweep_dir) / "trials" / f"trial-{trial.number:04d}"
    trial_dir.mkdir(parents=True, exist_ok=False)
    trial.set_user_attr("run_dir", str(trial_dir))
    trial.set_user_attr("overrides", overrides)
    loaded = load_recipe(job.recipe_path, [*job.base_overrides, *job.trial_overrides, *overrides])
    seeds = [loaded.recipe.seeds[0] + i for i in range(spec.seeds)]
    info = {
        "study": job.name,
        "trial": trial.number,
        "storage": shown_storage(job.storage),
        "params": params,
        "overrides": overrides,
        "seeds": seeds,
        "pid": os.getpid(),
    }
    atomic_write_json(trial_dir / TRIAL_FILE, info)
    # The outcome goes into trial.json too, so the folder alone tells how the trial ended (a
    # trial whose worker was killed has none: storage marks it failed once it falls silent).
    try:
        value = _train_seeds(trial, loaded, seeds, trial_dir, spec)
    except optuna.TrialPruned:
        atomic_write_json(trial_dir / TRIAL_FILE, {**info, "state": "PRUNED"})
        raise
    except Exception as exc:
        atomic_write_json(
            trial_dir / TRIAL_FILE, {**info, "state": "FAIL", "error": f"{type(exc).__name__}: {exc}"}
        )
        raise
    atomic_write_json(trial_dir / TRIAL_FILE, {**info, "state": "COMPLETE", "value": value})
    return value


def _train_seeds(
    trial: optuna.Trial, loaded: LoadedRecipe, seeds: list[int], trial_dir: Path, spec: SweepSpec
) -> float:
    from optuna_integration import PyTorchLightningPruningCallback

    from rex.engine.train import run_one, summarize

    monitor = f"val/{spec.objective.metric}"
    results = []
    for i, seed in enumerate(seeds):
        run_dir = trial_dir if len(seeds) == 1 else trial_dir / f"seed-{seed}"
        run_dir.mkdir(exist_ok=True)
        # The pruner sees the first seed's epochs; later seeds run only for a trial that survived.
        callbacks = [PyTorchLightningPruningCallback(trial, monitor=monitor)] if i == 0 else []
        results.append(run_one(loaded, seed, run_dir, extra_callbacks=callbacks, test=False))
    scores = [r["best"]["score"] for r in results]
    if any(s is None for s in scores):
        raise RexError("a trial run finished without a validation score", file=str(trial_dir))
    if len(seeds) > 1:
        atomic_write_json(
            trial_dir / "summary.json",
            {
                "seeds": seeds,
                "validation": summarize(
                    [
                        {"seed": r["seed"], "test": {spec.objective.metric: r["best"]["score"]}}
                        for r in results
                    ]
                )["test"],
            },
        )
    return sum(scores) / len(scores)


def _report(study: optuna.Study, trial: FrozenTrial) -> None:
    value = "" if trial.value is None else f" {trial.value:.4f}"
    params = " ".join(f"{k}={v}" for k, v in trial.params.items())
    out.print(
        f"trial {trial.number:>3} {trial.state.name:<8}{value}  {params}", markup=False, highlight=False
    )


def work(job: Job) -> None:
    """One worker: start trials until the study holds ``job.trials`` or the deadline passes."""
    from rex.engine.train import quiet_lightning

    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(Path(job.spec_path))
    base = load_recipe(job.recipe_path, job.base_overrides).resolved
    study = optuna.load_study(
        study_name=job.name,
        storage=make_storage(job.storage, spec),
        sampler=make_sampler(spec, job.worker),
        pruner=make_pruner(spec, int(base["train"]["max_epochs"])),
    )
    gate = _Gate(_lock_path(job))

    def objective(trial: optuna.Trial) -> float:
        gate.release()  # the trial exists in storage now: others may count it
        return run_trial(trial, job, spec, base)

    while job.deadline is None or time.time() < job.deadline:
        gate.acquire()
        try:
            if len(study.get_trials(deepcopy=False)) >= job.trials:
                break
            study.optimize(
                objective, n_trials=1, catch=(Exception,), callbacks=[_report], gc_after_trial=True
            )
        finally:
            gate.release()


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


def _open_study(prep: Prepared, resume: bool) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    spec, job = prep.spec, prep.job
    storage = make_storage(job.storage, spec)
    exists = any(s.study_name == job.name for s in optuna.get_all_study_summaries(storage))
    if exists and not resume:
        study = optuna.load_study(study_name=job.name, storage=storage)
        if study.get_trials(deepcopy=False):
            raise RexError(
                f"study {job.name!r} already has {len(study.trials)} trials in {shown_storage(job.storage)}; "
                "pass --resume to continue it, or set another name: in the spec",
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
        subprocess.Popen([sys.executable, "-m", "rex.cli", "sweep-worker", str(job_file), str(i)], env=env)
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


def fail_silent_trials(study: optuna.Study, storage: optuna.storages.RDBStorage, spec: SweepSpec) -> None:
    """``fail_stale_trials``, including trials that never recorded a heartbeat.

    Optuna skips a RUNNING trial with no heartbeat at all: one whose worker was killed between
    creating the trial and its first beat. Recording a beat for each RUNNING trial older than the
    grace period gives such a trial a clock, so it fails one grace period later; for a live
    trial the extra beat changes nothing.
    """
    optuna.storages.fail_stale_trials(study)
    cutoff = datetime.now() - timedelta(seconds=spec.grace_period)
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.datetime_start is not None and trial.datetime_start < cutoff:
            storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))


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
    timeout: float | None = None,
    test_seeds: int | None = None,
    test: bool = True,
) -> Path:
    started = time.time()
    prep = prepare(spec_path, cli_overrides, trials, timeout, workers)
    spec, job = prep.spec, prep.job
    study, storage = _open_study(prep, resume)
    Path(job.sweep_dir).mkdir(parents=True, exist_ok=True)
    console.print(
        f"study {job.name}: {spec.trials} trials, {workers} worker(s), storage {shown_storage(job.storage)}",
        markup=False,
        highlight=False,
    )
    if resume:
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
                    f"[yellow]worker {i} exited with code {code}; its trial is marked failed[/yellow]"
                )
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


# ----------------------------------------------------------------------------- export best
PARAMS_SECTION = "sweep_best"
PARAMS_COMMENT = "# best sweep parameters, written by `rex sweep --export-best`"


def export_best(spec_path: Path, target: Path | None, params_yaml: Path | None) -> Path:
    """Write the best trial as a recipe that extends the base (``rex train`` it directly), and
    optionally as a ``sweep_best`` section of params.yaml for DVC stages to depend on."""
    spec = load_spec(spec_path)
    name = spec.name or spec_path.stem
    storage_url = spec.storage or default_storage(spec_path, name)
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(storage_url, spec))
        best = study.best_trial
    except (KeyError, ValueError) as exc:
        raise RexError(
            f"no completed trial in study {name!r} at {shown_storage(storage_url)}; run the sweep first",
            file=str(spec_path),
        ) from exc
    import yaml

    overrides = [
        *spec.overrides,
        f"eval.monitor={spec.objective.metric}",
        *best.user_attrs.get("overrides", []),
    ]
    nested: dict[str, Any] = {}
    for item in overrides:
        key, value = item.split("=", 1)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    target = target or spec_path.resolve().parent / f"{name}.best.yaml"
    recipe_path = (spec_path.resolve().parent / spec.recipe).resolve()
    header = (
        f"# Best trial {best.number} of sweep {name}: validation {spec.objective.metric} "
        f"{best.value:.4f}. Written by `rex sweep --export-best`.\n"
    )
    body = {
        "extends": os.path.relpath(recipe_path, target.resolve().parent),
        "name": f"{name}_best",
        **nested,
    }
    atomic_write_text(target, header + yaml.safe_dump(body, sort_keys=False))
    if params_yaml is not None:
        _write_params_section(
            params_yaml,
            name,
            {
                k.split("=", 1)[0]: v
                for k, v in zip(
                    overrides, [yaml.safe_load(o.split("=", 1)[1]) for o in overrides], strict=True
                )
            },
        )
    return target


def _write_params_section(path: Path, name: str, values: dict[str, Any]) -> None:
    """Replace (or add) one study's entry under ``sweep_best:`` and keep the rest of the file,
    comments included: params.yaml also holds the data stages' hand-written settings."""
    import yaml

    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"{PARAMS_SECTION}:"), None)
    current: dict[str, Any] = {}
    if start is not None:
        end = next(
            (
                i
                for i in range(start + 1, len(lines))
                if lines[i] and not lines[i][0].isspace() and not lines[i].startswith("#")
            ),
            len(lines),
        )
        current = (yaml.safe_load("\n".join(lines[start:end])) or {}).get(PARAMS_SECTION) or {}
        if start and lines[start - 1] == PARAMS_COMMENT:
            start -= 1  # our own comment goes with the block it introduces
        lines = lines[:start] + lines[end:]
    current[name] = values
    block = yaml.safe_dump({PARAMS_SECTION: current}, sort_keys=False).rstrip().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    atomic_write_text(
        path,
        "\n".join([*lines, "", PARAMS_COMMENT, *block]) + "\n",
    )


def work_from_file(job_file: Path, worker: int) -> None:
    """Entry of a worker process started by ``rex sweep --workers N`` (``rex sweep-worker``)."""
    storage = os.environ.get(STORAGE_ENV)
    if not storage:
        raise RexError(f"{STORAGE_ENV} is not set: workers are started by `rex sweep --workers N`")
    work(Job(**{**json.loads(job_file.read_text()), "worker": worker, "storage": storage}))
