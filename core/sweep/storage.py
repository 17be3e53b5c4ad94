"""Where a study lives: its storage URL (SQLite beside the spec by default, any SQLAlchemy URL
otherwise), the RDB storage with heartbeats, and failing the trials of killed workers."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta
from pathlib import Path

import optuna
from optuna.trial import TrialState

from rex.config.errors import RexError
from rex.sweep.spec import (
    SweepSpec,
)

STORAGE_ENV = "REX_SWEEP_STORAGE"


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


def make_storage(url: str, spec: SweepSpec, spec_path: Path | str) -> optuna.storages.RDBStorage:
    """The study's RDB storage; a URL that cannot be opened is a RexError naming the spec file."""
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
        # The driver's message may quote the URL, password and all: name only the error's type.
        raise RexError(
            f"cannot open study storage {shown_storage(url)} ({type(exc).__name__}); check the URL, "
            "that its database driver is installed and that the server is up",
            file=str(spec_path),
            key="storage",
        ) from exc


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
