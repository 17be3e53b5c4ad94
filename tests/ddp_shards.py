"""Trains DeepFM for one epoch on 2 CPU processes, recording each process's training rows.

Run by tests/test_distributed.py as ``python tests/ddp_shards.py OUT``; Lightning's launcher
starts rank 1 by running this script again. Each rank writes OUT/rank<r>.pt (its batches' row
keys, user * 10^6 + item), and rank 0 also OUT/epoch.pt (every training row's key).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from rex.config.recipe import load_recipe
from rex.engine.train import run_one

REPO = Path(__file__).resolve().parents[1]


def row_keys(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    return users.long() * 1_000_000 + items.long()


class RecordRows(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(row_keys(batch["user"], batch["item"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save({"batches": self.batches}, self.out / f"rank{trainer.global_rank}.pt")
        if trainer.global_rank == 0:
            columns = trainer.datamodule.loader("train").columns  # type: ignore[attr-defined]
            torch.save(row_keys(columns["user"], columns["item"]), self.out / "epoch.pt")


def main(out: Path) -> None:
    overrides = [
        "train.devices=2",
        "train.accelerator=cpu",
        "train.max_epochs=1",
        "train.batch_size=4096",
        "train.limit_eval_batches=2",
        "logging.progress_bar=false",
        f"logging.run_root={out / 'runs'}",
    ]
    loaded = load_recipe(REPO / "recipes" / "deepfm.yaml", overrides)
    run_dir = out / "runs" / "deepfm" / "ddp"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_one(loaded, loaded.recipe.seeds[0], run_dir, extra_callbacks=[RecordRows(out)])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
