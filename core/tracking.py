"""Weights & Biases logging that never prompts, never blocks and never fails a run."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import Logger
from rich.console import Console

from rex.config import WandbConfig

console = Console(stderr=True)


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
