"""Where a study lives: its storage URL (SQLite beside the spec by default; any SQLAlchemy URL
from the spec's ``storage:`` or ``--storage``, such as a PostgreSQL server that workers on many
machines share), Optuna's RDB storage with heartbeats, and failing the trials of killed workers."""

from __future__ import annotations

import os
import random
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from rex.config.errors import RexError
from rex.sweep.spec import (
    STORAGE_ENV,
    SweepSpec,
)

SCHEMA_TRIES = 5
URL_FORMS = "write it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:///PATH"


def default_storage(spec_path: Path, name: str) -> str:
    folder = spec_path.resolve().parent / ".studies"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / name}.db"


def shown_storage(url: str) -> str:
    """The storage URL with any password masked: never print or store a secret."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL shows as its scheme only, unless it cannot hold a password
        return url if ":" not in url else url.split(":", 1)[0] + "://..."


def make_storage(url: str, spec: SweepSpec, spec_path: Path | str) -> optuna.storages.RDBStorage:
    """The study's RDB storage, with heartbeats; a URL that cannot be opened is a RexError that
    names where the URL came from (``--storage`` or the spec's ``storage:``) and what to check."""
    # Heartbeats and fail_stale_trials are marked experimental; the warnings say nothing actionable.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    attempt = 1
    while True:
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=spec.heartbeat_interval,
                grace_period=spec.grace_period,
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Workers of a job array start together: on a new database each creates Optuna's
            # tables, and all but one lose that race. The next try finds the tables made.
            if attempt == SCHEMA_TRIES:
                raise _storage_error(url, exc, spec_path) from exc
            attempt += 1
            time.sleep(random.uniform(0.2, 1.0))
        except Exception as exc:
            raise _storage_error(url, exc, spec_path) from exc


def _engine_kwargs(url: str) -> dict[str, Any] | None:
    if url.startswith("sqlite"):
        # SQLite serialises writers; a generous busy timeout lets several workers share one file.
        return {"connect_args": {"timeout": 120}}
    if url.startswith("postgresql"):
        # A host that does not answer fails in seconds, not at the TCP timeout; pre-ping replaces
        # a pooled connection that the server dropped while a long trial trained.
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return None


def _storage_error(url: str, exc: Exception, spec_path: Path | str) -> RexError:
    """One to three lines: where the URL came from, the URL with its password masked, the
    driver's reason and the fix."""
    shown = shown_storage(url)
    if isinstance(exc, sqlalchemy.exc.NoSuchModuleError):
        scheme = url.split(":", 1)[0]
        reason = f"unknown database kind {scheme!r}; {URL_FORMS}"
    elif isinstance(exc, sqlalchemy.exc.ArgumentError):
        reason = f"not a database URL; {URL_FORMS}"
    elif isinstance(exc, ImportError):
        reason = f"its database driver is not installed ({exc.__cause__ or exc}); install it, or {URL_FORMS}"
    elif isinstance(exc, sqlalchemy.exc.DBAPIError):
        reason = (
            f"{_driver_reason(exc, url)}\ncheck the URL's host, port, user, password and database, and "
            "that the server is up (bash scripts/postgres.sh starts a local one)"
        )
    else:
        reason = f"{type(exc).__name__}; check the URL and that the server is up"
    if os.environ.get(STORAGE_ENV) == url:
        return RexError(f"cannot open study storage {shown}: {reason}", file="--storage")
    return RexError(f"cannot open study storage {shown}: {reason}", file=str(spec_path), key="storage")


def _driver_reason(exc: sqlalchemy.exc.DBAPIError, url: str) -> str:
    """The driver's own first line, without libpq's preamble, and never the password."""
    text = str(exc.orig).strip() or type(exc.orig).__name__
    line = text.splitlines()[0].rsplit(" failed: ", 1)[-1].replace("FATAL:  ", "")
    password = _password(url)
    return line.replace(password, "***") if password else line


def _password(url: str) -> str | None:
    try:
        return make_url(url).password
    except sqlalchemy.exc.ArgumentError:
        return None


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
