"""The DVC data stages in a scratch copy of the repository: build once, skip when nothing changed,
rerun only the stage whose params section changed.

Only ``prepare_ml100k`` and ``prepare_beauty`` are reproduced, to stay fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rex.data.mirror import mirror_dir
from tests.conftest import REPO

STAGES = ("prepare_ml100k", "prepare_beauty")
# Generated or local state that a fresh clone would not have: at the top level, and anywhere.
TOP_LEVEL = {".git", ".dvc", "dvc.lock", ".venv", "data", "runs", "wandb"}
ANYWHERE = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache")
BIN = Path(sys.executable).parent  # dvc, and rex for the stage commands


def _not_copied(directory: str, names: list[str]) -> set[str]:
    top = TOP_LEVEL.intersection(names) if Path(directory) == REPO else set()
    return top | ANYWHERE(directory, names)


pytestmark = pytest.mark.skipif(
    mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)"
)


def _run(*args: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-3000:]}"
    return output


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the working tree with fresh git and DVC repositories (no cache, no lock)."""
    copy = tmp_path_factory.mktemp("dvc") / "repo"
    shutil.copytree(REPO, copy, ignore=_not_copied)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("REX_", "DVC_"))}
    env = {
        **inherited,
        "PATH": f"{BIN}{os.pathsep}{inherited.get('PATH', '')}",
        "REX_DATA_MIRROR": str(mirror_dir()),
        "DVC_NO_ANALYTICS": "1",
    }
    _run("git", "init", "-q", cwd=copy, env=env)
    _run(str(BIN / "dvc"), "init", "-q", cwd=copy, env=env)
    _run(str(BIN / "dvc"), "config", "core.analytics", "false", cwd=copy, env=env)
    return copy, env


def _repro(repo: tuple[Path, dict[str, str]]) -> str:
    path, env = repo
    return _run(str(BIN / "dvc"), "repro", *STAGES, cwd=path, env=env)


def _stamp(path: Path, dataset: str) -> int:
    return (path / "data" / dataset / "schema.json").stat().st_mtime_ns


def test_first_repro_builds_both_then_nothing_reruns(repo: tuple[Path, dict[str, str]]) -> None:
    path, _ = repo
    output = _repro(repo)
    assert "Running stage 'prepare_ml100k'" in output and "Running stage 'prepare_beauty'" in output
    stamps = {name: _stamp(path, name) for name in ("ml-100k", "beauty")}
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert set(STAGES) <= set(lock["stages"])

    again = _repro(repo)
    assert "Stage 'prepare_ml100k' didn't change, skipping" in again
    assert "Stage 'prepare_beauty' didn't change, skipping" in again
    assert "Running stage" not in again
    assert {name: _stamp(path, name) for name in stamps} == stamps


def test_changing_an_ml100k_param_reruns_only_its_stage(repo: tuple[Path, dict[str, str]]) -> None:
    path, _ = repo
    if not (path / "dvc.lock").is_file():
        _repro(repo)
    beauty = _stamp(path, "beauty")
    params_file = path / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["ml-100k"]["ctr_max_history"] = int(params["ml-100k"].get("ctr_max_history", 50)) + 7
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))

    output = _repro(repo)
    assert "Running stage 'prepare_ml100k'" in output
    assert "Stage 'prepare_beauty' didn't change, skipping" in output
    assert "Running stage 'prepare_beauty'" not in output
    assert _stamp(path, "beauty") == beauty
    schema = yaml.safe_load((path / "data" / "ml-100k" / "schema.json").read_text())
    assert schema["params"]["ctr_max_history"] == params["ml-100k"]["ctr_max_history"]
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert lock["stages"]["prepare_ml100k"]["params"]["params.yaml"]["ml-100k"] == params["ml-100k"]
