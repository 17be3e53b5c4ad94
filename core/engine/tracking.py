"""Weights & Biases logging that never prompts, never blocks and never fails a run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from rich.console import Console

from rex.config.schema import WandbConfig
from rex.engine.runs import METRICS_FILE

BEST_CKPT = "best.ckpt"

console = Console(stderr=True, emoji=False)  # user text (names, ids) is printed as written


def resolve_mode(cfg: WandbConfig) -> str:
    """``auto`` is online only when an API key is configured; otherwise offline (sync later)."""
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_logger(cfg: WandbConfig, run_dir: Path, name: str) -> Logger | None:
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = mode
    try:
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(
            project=cfg.project,
            group=cfg.group,
            name=f"{name}/{run_dir.name}",
            save_dir=str(run_dir),
            mode=mode,
            log_model=False,
        )
    except Exception as exc:  # tracking is optional: a W&B problem must not stop training
        console.print(f"[yellow]W&B logging disabled: {type(exc).__name__}: {exc}[/yellow]")
        return None


def _wandb_loggers(trainer: L.Trainer) -> list[Any]:
    # The defining module's class: lightning.pytorch.loggers.WandbLogger may be patched in tests.
    from lightning.pytorch.loggers.wandb import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class WandbRunInfo(Callback):
    """Sends the resolved recipe and the data version hash as the W&B run's config, and closes
    the W&B run when training fails (a pruned sweep trial, say), so the next run in the same
    process starts its own W&B run instead of appending to this one."""

    def __init__(self, config: dict[str, Any], data_hash: str, run_dir: Path) -> None:
        self.config = config
        self.data_hash = data_hash
        self.run_dir = run_dir

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in _wandb_loggers(trainer):
            values = {"recipe": self.config, "data_hash": self.data_hash, "run_dir": str(self.run_dir)}
            _safely("config", _update_config, logger, values)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        for logger in _wandb_loggers(trainer):
            _safely("finish", _finish, logger, 1)


def finish_wandb(trainer: L.Trainer, run_dir: Path) -> None:
    """Upload the best checkpoint and metrics.json as one artifact (queued for ``wandb sync``
    when offline), then close the W&B run."""
    for logger in _wandb_loggers(trainer):
        _safely("artifacts", _upload, logger, run_dir)
        _safely("finish", _finish, logger, 0)


def _update_config(logger: Any, values: dict[str, Any]) -> None:
    logger.experiment.config.update(values, allow_val_change=True)


def _finish(logger: Any, exit_code: int) -> None:
    logger.experiment.finish(exit_code=exit_code)


def _upload(logger: Any, run_dir: Path) -> None:
    import wandb

    experiment = logger.experiment
    artifact = wandb.Artifact(name=f"run-{experiment.id}", type="rex-run")
    for name in (METRICS_FILE, f"checkpoints/{BEST_CKPT}"):
        if (run_dir / name).is_file():
            artifact.add_file(str(run_dir / name), name=name)
    experiment.log_artifact(artifact)


def _safely(what: str, action: Callable[..., Any], *args: Any) -> None:
    try:
        action(*args)
    except Exception as exc:  # tracking is optional: a W&B problem must not stop training
        console.print(f"[yellow]W&B {what} skipped: {type(exc).__name__}: {exc}[/yellow]")
