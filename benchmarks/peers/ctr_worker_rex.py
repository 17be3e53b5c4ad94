"""One rex measurement of DeepFM on Frappe, in a fresh process (run with the rex venv).

    .venv/bin/python benchmarks/peers/ctr_worker_rex.py --task throughput --threads 1 --out r.json
    .venv/bin/python benchmarks/peers/ctr_worker_rex.py --task accuracy --threads 1 --out r.json

The model is ``recipes/deepfm_frappe.yaml`` and the run is what ``rex train`` does:
``rex.train.run_one`` (``build_run``, a Lightning Trainer with checkpointing and early stopping,
then a test of the best validation checkpoint), with a callback that only reads the clock.

What is measured:

* ``load_s``: reading the train, valid and test splits from Lance into the loaders' tensors
  (done up front here; ``rex train`` reads the same splits lazily, at first use).
* ``throughput``: ``--warmup`` batches, then ``--batches`` training batches, timed from the end
  of one batch to the end of the next (so the time includes making the batch, forward, backward,
  the optimiser step and Lightning's per-step logging). Batches may run over several epochs;
  the validation and checkpointing between epochs are not timed. Then one full evaluation pass
  over the test split (forward plus AUC, gAUC and logloss), timed from Lightning's
  ``on_test_start`` to ``on_test_end``.
* ``accuracy``: up to ``--epochs`` epochs with early stopping (``--patience``) on validation
  AUC, then test AUC and logloss of the best validation checkpoint.
* ``peak_rss_mb``: the process's peak resident set size (``ru_maxrss``) at the end.
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from measure import ctr_parser, peak_rss_mb, write_result

from rex.config.recipe import load_recipe
from rex.engine.train import run_one

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "deepfm_frappe.yaml"
SPLITS = ("train", "valid", "test")


class Clock(Callback):
    """Reads the clock around data loading, training batches and the test pass; changes nothing."""

    def __init__(self, warmup: int, batches: int | None) -> None:
        self.warmup = warmup
        self.batches = batches
        self.load_s: float | None = None
        self.seen = 0
        self.rows = 0
        self.train_s = 0.0
        self.test_rows = 0
        self.test_s = 0.0
        self._last = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.load_s is not None:
            return
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        start = time.perf_counter()
        for split in SPLITS:
            datamodule.loader(split)  # read once and cached: training reuses these loaders
        self.load_s = time.perf_counter() - start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The first batch of an epoch is timed from here: the between-epoch validation and
        # checkpointing are left out, and the batch's own making is counted.
        self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self.seen += 1
        if self.batches is not None and self.seen > self.warmup:
            self.train_s += now - self._last
            self.rows += int(batch["label"].shape[0])
        self._last = now
        if self.batches is not None and self.seen >= self.warmup + self.batches:
            trainer.should_stop = True

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_rows = 0
        self._test_start = time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.test_rows += int(batch["label"].shape[0])

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_s = time.perf_counter() - self._test_start


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run one task and return its result record."""
    torch.set_num_threads(args.threads)
    throughput = args.task == "throughput"
    overrides = [
        f"train.num_threads={args.threads}",
        "logging.progress_bar=false",
        f"train.batch_size={args.batch_size}",
        f"eval.batch_size={args.batch_size}",
        f"seed={args.seed}",
        *args.override,
    ]
    clock = Clock(args.warmup, args.batches if throughput else None)
    with tempfile.TemporaryDirectory(prefix="rex-peer-") as tmp:
        if throughput:
            # Enough epochs to hold warm-up + timed batches; the clock stops the run after them.
            train_rows = 69266  # Frappe ctr_train; only sizes the epoch cap, never a result
            per_epoch = math.ceil(train_rows / args.batch_size)
            epochs = math.ceil((args.warmup + args.batches) / per_epoch) + 1
            overrides += [f"train.max_epochs={epochs}", "train.patience=null"]
        else:
            overrides += [f"train.max_epochs={args.epochs}", f"train.patience={args.patience}"]
        overrides.append(f"logging.run_root={tmp}")
        loaded = load_recipe(RECIPE, overrides)
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        started = time.perf_counter()
        data = run_one(loaded, loaded.recipe.seeds[0], run_dir, extra_callbacks=[clock])
        total_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "side": "rex",
        "task": args.task,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "recipe": str(RECIPE.relative_to(REPO)),
        "overrides": args.override,
        "load_s": round(clock.load_s or 0.0, 3),
        "test_rows": clock.test_rows,
        "eval_s": round(clock.test_s, 3),
        "eval_rows_per_s": round(clock.test_rows / clock.test_s, 1) if clock.test_s else None,
        "wall_s": round(total_s, 2),
        "test": data.get("test", {}),
    }
    if throughput:
        result |= {
            "warmup_batches": args.warmup,
            "train_batches": clock.seen - args.warmup,
            "train_rows": clock.rows,
            "train_s": round(clock.train_s, 3),
            "train_rows_per_s": round(clock.rows / clock.train_s, 1) if clock.train_s else None,
        }
    else:
        validation = data.get("validation", [])
        result |= {
            "max_epochs": args.epochs,
            "patience": args.patience,
            "epochs_run": data.get("train", {}).get("epochs"),
            "val_auc_per_epoch": [round(r["auc"], 5) for r in validation],
            "val_logloss_per_epoch": [round(r["logloss"], 5) for r in validation],
            "best": data.get("best"),
            "fit_s": data.get("train", {}).get("wall_time_s"),
            "fit_rows_per_s": data.get("train", {}).get("samples_per_s"),  # CTR: a sample is a row
        }
    result |= {
        "peak_rss_mb": peak_rss_mb(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": L.__version__,
        },
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = ctr_parser("One rex DeepFM-on-Frappe measurement.")
    parser.add_argument(
        "--override", action="append", default=[], help="extra recipe override (ablations), repeatable"
    )
    args = parser.parse_args(argv)
    write_result(args.out, measure(args))


if __name__ == "__main__":
    main()
