"""Sweeps on a real PostgreSQL server, the one scripts/postgres.sh starts (.ci/run exports its URL
as REX_TEST_POSTGRES_URL): workers started one process each, as a job array starts them, share
one study; a worker killed mid-trial loses no trial; `rex report` and `--export-best` read the
study from the server. Without the server these tests skip, except under CI, where they fail."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from rex.config.errors import RexError
from rex.config.recipe import load_recipe
from rex.eval.report import report
from rex.sweep.export import export_best
from rex.sweep.spec import STORAGE_ENV, load_spec
from rex.sweep.storage import make_storage
from tests.conftest import REPO, run_rex
from tests.test_sweep import SPEC as SQLITE_SPEC
from tests.test_sweep import _wait_for

URL_ENV = "REX_TEST_POSTGRES_URL"
TRIALS = 4
SPEC = {
    **SQLITE_SPEC,
    "overrides": [
        "train.max_epochs=2",
        "train.patience=null",
        "train.limit_train_batches=2",
        "train.limit_eval_batches=1",
    ],
    "trials": TRIALS,
}


def _server_missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI tests sweeps against the server that .ci/run starts")
    pytest.skip(f"{reason}; run `export {URL_ENV}=$(bash scripts/postgres.sh)` first")


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new database on the test server, dropped afterwards: reruns never meet an
    earlier run's study or tables."""
    url = os.environ.get(URL_ENV)
    if not url:
        _server_missing(f"{URL_ENV} is not set")
    import psycopg

    server = make_url(url)
    login = {
        "host": server.host,
        "port": server.port,
        "user": server.username,
        "password": server.password,
        "connect_timeout": 10,
        "autocommit": True,
    }
    name = f"rex_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(dbname=server.database, **login) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        _server_missing(f"no PostgreSQL server at {server.host}:{server.port} ({exc})")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dbname=server.database, **login) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _trial_files(sweep_dir: Path) -> dict[int, dict]:
    found = {}
    for path in sweep_dir.glob("trials/*/trial.json"):
        with contextlib.suppress(OSError, json.JSONDecodeError):  # a glob may race a rename
            data = json.loads(path.read_text())
            found[data["trial"]] = data
    return found


def test_workers_on_postgres_lose_no_trial_to_a_kill(data_home, tmp_path, monkeypatch):
    with fresh_database() as url:
        name = f"pg-{uuid.uuid4().hex[:8]}"
        spec = tmp_path / "pg.yaml"
        spec.write_text(yaml.safe_dump({**SPEC, "name": name}))
        runs = tmp_path / "runs"
        sweep_dir = runs / "sweeps" / name
        common = [str(spec), f"logging.run_root={runs}", "--storage", url]

        def worker(index: int) -> subprocess.Popen[bytes]:
            # One process per worker, as a job array starts them: whichever comes first makes
            # the study (and, on this new database, Optuna's tables: both race to). Its stderr goes
            # to a file: a pipe nobody reads until the end would fill and block it.
            with (tmp_path / f"worker-{index}.log").open("wb") as log:
                return subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "rex.cli",
                        "sweep",
                        *common,
                        "--join",
                        "--worker-index",
                        str(index),
                    ],
                    cwd=REPO,
                    env={**os.environ, "WANDB_MODE": "disabled"},
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )

        workers = [worker(0), worker(1)]
        try:
            first = _wait_for(lambda: _trial_files(sweep_dir), 120, "a first trial")
            victim = min(first.values(), key=lambda t: t["trial"])
            os.kill(victim["pid"], signal.SIGKILL)  # mid-trial: trial.json is written before training
            (killed,) = [w for w in workers if w.pid == victim["pid"]]
            (survivor,) = [w for w in workers if w is not killed]
            assert killed.wait(timeout=30) == -signal.SIGKILL
            # Start a worker again: --resume also settles the study once its trials are done.
            resumed = run_rex("sweep", *common, "--resume", "--no-test")
            survivor.wait(timeout=120)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert survivor.returncode == 0, (tmp_path / f"worker-{workers.index(survivor)}.log").read_text()[
            -2000:
        ]

        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
        assert [t.number for t in trials] == list(range(TRIALS))  # none lost, none beyond the budget
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
        assert trials[victim["trial"]].state == TrialState.FAIL
        assert any(t.state == TrialState.COMPLETE for t in trials)
        summary = json.loads((sweep_dir / "sweep.json").read_text())
        assert summary["storage"] == make_url(url).render_as_string(hide_password=True)
        shared = [sweep_dir / "sweep.json", *sweep_dir.glob("trials/*/trial.json")]
        secret = f":{make_url(url).password}@"  # the URL's password part, never written anywhere
        assert not any(secret in p.read_text() for p in shared)

        # Report and export read the study from the server; in this process, with the URL where
        # --storage puts it, to spare two more start-ups of torch and Lightning.
        monkeypatch.setenv(STORAGE_ENV, url)
        made = report([sweep_dir], tmp_path / "report")
        assert tmp_path / "report" / f"{name}_optimization_history.png" in made.plots
        best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
        target = export_best(spec, tmp_path / "best.yaml", None)
        assert load_recipe(target).recipe.train.lr == best.params["train.lr"]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (
            "postgres://rex:hunter2@127.0.0.1/rex",
            "unknown database kind 'postgres'; write it as postgresql://",
        ),
        ("not a url", "not a database URL; write it as postgresql://"),
        ("mysql://rex:hunter2@127.0.0.1/rex", "its database driver is not installed"),
    ],
)
def test_a_bad_storage_url_names_the_flag_and_the_form(tmp_path, monkeypatch, url, says):
    monkeypatch.setenv(STORAGE_ENV, url)  # what --storage does
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    loaded = load_spec(spec)
    with pytest.raises(RexError) as info:
        make_storage(str(loaded.storage), loaded, spec)
    message = str(info.value)
    assert message.startswith("--storage: cannot open study storage ") and says in message
    assert "hunter2" not in message and len(message.splitlines()) <= 3


def test_an_unreachable_server_is_a_short_error_naming_the_flag_and_the_fix(data_home, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    url = "postgresql://rex:hunter2@127.0.0.1:1/rex"  # nothing listens on port 1
    result = run_rex("sweep", str(spec), f"logging.run_root={tmp_path / 'runs'}", "--storage", url)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-2] == (
        "error: --storage: cannot open study storage postgresql://rex:***@127.0.0.1:1/rex: Connection refused"
    )
    assert "bash scripts/postgres.sh starts a local one" in lines[-1]
    assert "hunter2" not in result.stderr + result.stdout


def test_workers_that_start_together_on_a_new_database_all_open_it(tmp_path):
    """Each worker of a job array creates Optuna's tables on a new database at the same moment,
    and all but one lose that race inside the database; make_storage tries again."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    spec = load_spec(spec_path)
    with fresh_database() as url:
        start = threading.Barrier(4)
        errors: list[BaseException] = []

        def open_storage() -> None:
            start.wait()
            try:
                make_storage(url, spec, spec_path)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=open_storage) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
