"""Shared fixtures: datasets prepared once per session from the real mirror."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rex.data.mirror import mirror_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REX_DATA_HOME for the whole session, with ml-100k and beauty prepared from the mirror."""
    if mirror_dir() is None:
        pytest.skip("no data mirror (../shared/data or REX_DATA_MIRROR)")
    from rex.data.prepare import prepare_dataset

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


def run_rex(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """The real command line, in a child process, as a user would run it."""
    inherited = {k: v for k, v in os.environ.items() if k != "REX_DEBUG"}
    full_env = {**inherited, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rex.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )
