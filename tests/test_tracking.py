"""W&B logging never prompts, never blocks and never fails a run."""

from __future__ import annotations

from rex.config import WandbConfig
from rex.tracking import resolve_mode
from rex.train import train
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
    run_dir = train(
        REPO / "recipes" / "deepfm.yaml",
        [*SMOKE, f"logging.run_root={tmp_path}", "logging.wandb={project: rex-test}"],
    )
    assert list((run_dir / "wandb").glob("offline-run-*"))


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
