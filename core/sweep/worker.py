"""A worker process: it takes trials from the shared study and trains each into an ordinary run
folder (``trials/trial-NNNN``, with the trial's number and outcome in ``trial.json``) through the
same path as ``rex train``. Trials select on validation only."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import optuna
from optuna.trial import FrozenTrial
from rich.console import Console

from rex.config.errors import RexError
from rex.config.recipe import LoadedRecipe, load_recipe
from rex.engine.runs import atomic_write_json
from rex.sweep.space import make_pruner, make_sampler, sample
from rex.sweep.spec import (
    SweepSpec,
    load_spec,
    override,
)
from rex.sweep.storage import STORAGE_ENV, make_storage, shown_storage

console = Console(stderr=True, emoji=False)  # user text (names, ids) is printed as written
out = Console()
TRIAL_FILE = "trial.json"


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
    # In the machine's temporary folder, not the sweep folder: that may be on a cluster's shared
    # file system, where flock is slow or refused, and the lock only ever guards this machine.
    key = hashlib.sha256(f"{job.storage}\n{job.name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"rex-sweep-{key}.lock"


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
        storage=make_storage(job.storage, spec, job.spec_path),
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


def work_from_file(job_file: Path, worker: int) -> None:
    """Entry of a worker process started by ``rex sweep --workers N`` (``rex sweep-worker``)."""
    storage = os.environ.get(STORAGE_ENV)
    if not storage:
        raise RexError(f"{STORAGE_ENV} is not set: workers are started by `rex sweep --workers N`")
    work(Job(**{**json.loads(job_file.read_text()), "worker": worker, "storage": storage}))
