"""Shared fixtures: datasets prepared once per session from the real mirror."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rex.data.mirror import mirror_dir

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and the runs it starts) gets its share of the cores:
    torch's default of one thread per core in every worker oversubscribes them, and its
    threads then wait on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REX_DATA_HOME for the whole session, with ml-100k and beauty prepared from the mirror.

    Parallel workers (pytest-xdist) share one home under their common base directory, so each
    dataset is prepared once per run: prepare_dataset's lock makes the others wait for it."""
    if mirror_dir() is None:
        pytest.skip("no data mirror (../shared/data or REX_DATA_MIRROR)")
    from rex.data.prepare import prepare_dataset

    if os.environ.get("PYTEST_XDIST_WORKER"):
        home = tmp_path_factory.getbasetemp().parent / "data_home"
        home.mkdir(exist_ok=True)
    else:
        home = tmp_path_factory.mktemp("data_home")
    previous = os.environ.get("REX_DATA_HOME")
    os.environ["REX_DATA_HOME"] = str(home)
    for name in ("ml-100k", "beauty"):
        prepare_dataset(name, root=home)
    yield home
    if previous is None:
        os.environ.pop("REX_DATA_HOME", None)
    else:
        os.environ["REX_DATA_HOME"] = previous


@contextmanager
def prepared_home(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A fresh data home (REX_DATA_HOME while inside) with ``name`` prepared from the mirror; the
    cached MiniLM features of the working copy, or of the session's data home, are copied in so
    the encoder need not run again."""
    if mirror_dir() is None:
        pytest.skip("no data mirror (../shared/data or REX_DATA_MIRROR)")
    from rex.data.features import FEATURES_DIR
    from rex.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("rex_data")
    for cache in {
        REPO / "data" / FEATURES_DIR,
        Path(os.environ.get("REX_DATA_HOME", REPO / "data")) / FEATURES_DIR,
    }:
        if cache.is_dir():
            shutil.copytree(cache, root / FEATURES_DIR, dirs_exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REX_DATA_HOME", str(root))
        prepare_dataset(name, root=root)
        yield root


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k != "REX_DEBUG"}
    return {**inherited, "WANDB_MODE": "disabled", **(env or {})}


def run_rex(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """The real command line, in a child process, as a user would run it."""
    full_env = _child_env(env)
    return subprocess.run(
        [sys.executable, "-m", "rex.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )


def kill_rex_when(
    *args: str, root: Path, pattern: str, env: dict[str, str] | None = None, timeout: float = 300
) -> Path | None:
    """``rex ARGS`` in a child process, killed with SIGKILL (as a preemption would) as soon as a
    file matching ``pattern`` exists under ``root``: that file, or None when the run ended or
    ``timeout`` seconds passed first. For kill-and-resume tests."""
    child = subprocess.Popen(
        [sys.executable, "-m", "rex.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        env=_child_env(env),
    )
    deadline = time.time() + timeout
    found: list[Path] = []
    while time.time() < deadline and not found and child.poll() is None:
        found = list(root.glob(pattern))
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return found[0] if found else None
