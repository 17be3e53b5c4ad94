"""W&B logging never prompts, never blocks and never fails a run."""

from __future__ import annotations

import json
import time

from rex.config.schema import WandbConfig
from rex.engine.tracking import resolve_mode
from rex.engine.train import train
from tests.conftest import REPO

SMOKE = [
    "train.max_epochs=1",
    "train.limit_train_batches=2",
    "train.limit_eval_batches=1",
    "logging.progress_bar=false",
]


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode(WandbConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(WandbConfig()) == "online"
    assert resolve_mode(WandbConfig(mode="disabled")) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode(WandbConfig(mode="online")) == "offline"  # the environment wins


def test_offline_run_writes_a_syncable_folder(data_home, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # artifact staging, not $HOME
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    run_dir = train(
        REPO / "recipes" / "deepfm.yaml",
        [*SMOKE, f"logging.run_root={tmp_path}", "logging.wandb={project: rex-test, group: study-7}"],
    )
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    # The run's record log (what `wandb sync` uploads) holds the group, the resolved recipe,
    # the data version hash and the artifact of the best checkpoint and metrics.json.
    (log,) = offline.glob("run-*.wandb")
    data_hash = json.loads((run_dir / "env.json").read_text())["data_hash"]
    # wandb's service process writes the log; under load it can trail the run by a moment.
    deadline = time.monotonic() + 60
    while data_hash.encode() not in (record := log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"study-7" in record
    assert data_hash.encode() in record and b"data_hash" in record
    assert b"use_fields" in record  # a key of the resolved recipe's model section
    assert b"rex-run" in record and b"checkpoints/best.ckpt" in record and b"metrics.json" in record
    assert "test" in json.loads((run_dir / "metrics.json").read_text())


def test_a_second_run_in_one_process_gets_its_own_wandb_run(data_home, tmp_path, monkeypatch):
    """Sweep workers train many trials in one process: each must close its W&B run."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    args = [*SMOKE, f"logging.run_root={tmp_path}", "logging.wandb={project: rex-test}"]
    first = train(REPO / "recipes" / "deepfm.yaml", args)
    second = train(REPO / "recipes" / "deepfm.yaml", args)
    assert wandb.run is None
    assert len(list((first / "wandb").glob("offline-run-*"))) == 1
    assert len(list((second / "wandb").glob("offline-run-*"))) == 1


def test_a_broken_wandb_does_not_fail_the_run(data_home, tmp_path, monkeypatch):
    import lightning.pytorch.loggers as loggers

    def broken(*args, **kwargs):
        raise RuntimeError("wandb exploded")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loggers, "WandbLogger", broken)
    run_dir = train(
        REPO / "recipes" / "deepfm.yaml",
        [*SMOKE, f"logging.run_root={tmp_path}", "logging.wandb={mode: offline}"],
    )
    assert (run_dir / "metrics.json").is_file()
    assert not (run_dir / "wandb").exists()


def test_disabled_writes_nothing(data_home, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = train(
        REPO / "recipes" / "deepfm.yaml",
        [*SMOKE, f"logging.run_root={tmp_path}", "logging.wandb={mode: disabled}"],
    )
    assert not (run_dir / "wandb").exists()
