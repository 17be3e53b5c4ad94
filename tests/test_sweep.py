"""Sweeps end to end: two worker processes share one SQLite study, survive a killed worker and
a killed sweep, and resume with every trial accounted for; the best trial exports as a recipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from rex.config.recipe import load_recipe
from rex.sweep.export import export_best
from tests.conftest import REPO, run_rex

TRIALS = 6
SPEC = {
    "name": "workers",
    "recipe": str(REPO / "recipes" / "deepfm.yaml"),
    "overrides": [
        "train.max_epochs=6",
        "train.patience=null",
        "train.limit_train_batches=2",
        "train.limit_eval_batches=1",
    ],
    "params": {
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "model.embed.dim": {"type": "categorical", "choices": [8, 16]},
    },
    "objective": {"metric": "auc", "direction": "maximize"},
    "sampler": {"type": "random", "seed": 0},
    "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
    "trials": TRIALS,
    # Short heartbeats so a killed worker's trial goes stale within seconds.
    "heartbeat_interval": 1,
    "grace_period": 3,
}


def _trial_files(root: Path) -> dict[int, dict]:
    found = {}
    for path in root.glob("sweeps/workers/trials/*/trial.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # written atomically, but a glob may race a rename
        found[data["trial"]] = {**data, "dir": path.parent}
    return found


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_workers_share_a_study_survive_kills_and_resume(data_home, tmp_path):
    spec = tmp_path / "workers.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "rex.cli", "sweep", str(spec), f"logging.run_root={runs}", "--no-test"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    sweep = subprocess.Popen(
        [*args, "--workers", "2"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill the first worker as soon as it has started a trial: the trial stays RUNNING.
        first = _wait_for(lambda: _trial_files(runs), 240, "a first trial")
        victim = min(first.values(), key=lambda t: t["trial"])
        os.kill(victim["pid"], signal.SIGKILL)
        # Then, once the other worker has finished a trial, kill the whole sweep mid-study.
        storage = f"sqlite:///{tmp_path / '.studies' / 'workers.db'}"

        def finished_and_running() -> bool:
            # Files only, no storage query: the kill must land while the next trial trains.
            others = [t for n, t in _trial_files(runs).items() if n != victim["trial"]]
            done = ["state" in t for t in others]  # trial.json records the outcome
            return any(done) and not all(done)

        _wait_for(finished_and_running, 240, "a finished trial and a running one")
        os.killpg(sweep.pid, signal.SIGKILL)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()

    before = optuna.load_study(study_name="workers", storage=storage).get_trials(deepcopy=False)
    assert len(before) < TRIALS, "the sweep should have been killed before it finished"
    # The survivor marks the killed worker's trial failed once its heartbeat is stale; the
    # trial running when the whole sweep was killed is left RUNNING for --resume to settle.
    assert before[victim["trial"]].state in (TrialState.RUNNING, TrialState.FAIL)
    interrupted = [t.number for t in before if t.state == TrialState.RUNNING and t.number != victim["trial"]]
    assert interrupted, "the sweep should have been killed mid-trial"

    resumed = run_rex("sweep", str(spec), f"logging.run_root={runs}", "--no-test", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    trials = optuna.load_study(study_name="workers", storage=storage).get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(TRIALS))  # none lost, none duplicated
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
    assert all(trials[n].state == TrialState.FAIL for n in [victim["trial"], *interrupted])
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 2
    files = _trial_files(runs)
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in files:
            continue  # killed before its folder existed
        run_dir = Path(t.user_attrs["run_dir"])
        assert files[t.number]["dir"] == run_dir  # the trial knows its folder, the folder its trial
        if t.state != TrialState.FAIL:
            assert files[t.number]["state"] == t.state.name
        if t.state == TrialState.COMPLETE:
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert metrics["best"]["score"] == t.value
            assert "test" not in metrics  # trials never see the test split
    assert len({files[n]["dir"] for n in files}) == len(files) >= TRIALS - 1

    # The best trial as a recipe file that `rex train` takes, and as a params.yaml section.
    params = tmp_path / "params.yaml"
    params.write_text("# data settings\nml-100k:\n  split_seed: 2024   # keep me\n")
    target = export_best(spec, tmp_path / "best.yaml", params)
    export_best(spec, tmp_path / "best.yaml", params)  # again: replaces, never duplicates
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    loaded = load_recipe(target)
    assert loaded.recipe.train.lr == best.params["train.lr"]
    assert loaded.resolved["model"]["embed"]["dim"] == best.params["model.embed.dim"]
    assert loaded.recipe.train.limit_train_batches == 2 and loaded.recipe.eval.monitor == "auc"
    text = params.read_text()
    assert (
        "split_seed: 2024   # keep me" in text
        and text.count("sweep_best:") == text.count("# best sweep") == 1
    )
    assert yaml.safe_load(text)["sweep_best"]["workers"]["train.lr"] == best.params["train.lr"]

    again = run_rex("sweep", str(spec), f"logging.run_root={runs}", "--no-test")
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_a_trial_that_never_beat_is_failed_once_silent(tmp_path):
    """A worker killed between creating a trial and its first heartbeat leaves a RUNNING trial
    that optuna's own fail_stale_trials never fails; the sweep settles it all the same."""
    from types import SimpleNamespace

    from rex.sweep.storage import fail_silent_trials

    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'beat.db'}", heartbeat_interval=1, grace_period=1
    )
    study = optuna.create_study(study_name="beat", storage=storage)
    orphan = study.ask()  # RUNNING, and no heartbeat was ever recorded for it
    spec = SimpleNamespace(grace_period=1, heartbeat_interval=1)
    time.sleep(1.2)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[orphan.number].state == TrialState.RUNNING  # optuna alone leaves it
    fail_silent_trials(study, storage, spec)  # first beat now
    time.sleep(2.2)
    fail_silent_trials(study, storage, spec)
    assert study.trials[orphan.number].state == TrialState.FAIL
