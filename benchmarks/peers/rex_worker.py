"""One rex measurement in a fresh process (runs in the rex venv; see run.py).

Tasks, each writing one JSON object to ``--out``, mirror ``recbole_worker.py``:

* ``prep``: the time from the extracted raw file to the first training batch: ``rex data
  prepare`` (every table of the dataset, into a scratch data root) + the recipe's data module
  + one batch; and peak RSS.
* ``throughput``: ``recipes/sasrec.yaml`` at the benchmark's shape, ``--warmup`` batches, then
  ``--batches`` timed training batches, then one timed full-ranking test over all test users,
  all through ``rex.train.run_one`` as ``rex train`` runs them.
* ``budget``: ``recipes/<model>.yaml`` (SASRec, BERT4Rec or GRU4Rec) at RecBole's defaults for
  the model, for ``--budget-s`` wall-clock seconds of training and validation (an epoch starts
  only if one as long as the longest so far still ends within it), then the test metrics of the
  best validation epoch.

A rex "sample" is what a RecBole sample is: one position of a user's training sequence with a
next item to predict (rex trains every position of a sequence in one forward pass).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from measure import peak_rss_mb, within_budget, worker_main

REPO = Path(__file__).resolve().parents[2]
# RecBole's batch is 2,048 samples (prefixes); rex's train.batch_samples makes the same: batches
# of similar-length sequences holding about 2,048 training positions each.
PROTOCOL = [
    "data.max_len=50",
    "train.batch_samples=2048",
    "train.lr=0.001",
    "train.patience=null",
    "eval.batch_size=2048",
    # RecBole's sequential full ranking masks no history item: the same protocol on both sides.
    "eval.exclude_history=false",
    "logging.progress_bar=false",
]
TRANSFORMER = [
    "model.dim=64",
    "model.encoder.num_layers=2",
    "model.encoder.num_heads=2",
    "model.encoder.ffn_dim=256",
]
# RecBole's defaults for each model (recbole/properties/model/<Model>.yaml), in rex's keys.
MODELS = {
    "sasrec": [*TRANSFORMER, "model.dropout=0.5", "model.encoder.dropout=0.5"],
    "bert4rec": [*TRANSFORMER, "model.dropout=0.2", "model.encoder.dropout=0.2", "model.mask_prob=0.2"],
    # embedding 64, a GRU 128 wide mapped back to 64, embedding dropout 0.3
    "gru4rec": ["model.dim=64", "model.encoder.hidden=128", "model.dropout=0.3"],
}
PREP_RECIPES = {
    "beauty": ("recipes/sasrec.yaml", []),
    "ml-1m": (
        "recipes/deepfm.yaml",
        ["data.name=ml-1m", "model.use_fields=[user,item,age,gender,occupation,zip]"],
    ),
}


def prep(dataset: str) -> dict[str, Any]:
    from rex.config.recipe import load_recipe
    from rex.data.datamodule import RexDataModule
    from rex.data.prepare import RAW_DIR, data_root, prepare_dataset

    recipe_path, overrides = PREP_RECIPES[dataset]
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks" / ".peers") as scratch:
        # The raw archive is already extracted (as RecBole's atomic files are already written):
        # both sides start from files on disk.
        shutil.copytree(data_root() / RAW_DIR, Path(scratch) / RAW_DIR, symlinks=True)
        os.chdir(REPO)
        started = time.perf_counter()
        prepare_dataset(dataset, root=Path(scratch), force=True)
        recipe = load_recipe(REPO / recipe_path, [f"data.name={dataset}", *overrides]).recipe
        module = RexDataModule(recipe, Path(scratch) / dataset, seed=42)
        next(iter(module.train_dataloader()))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


class Timeline(Callback):
    """Samples and seconds of training batches after ``warmup``, the wall time and validation
    NDCG@10 after each epoch, and the seconds of the test loop; training stops before an epoch
    that would not end within ``budget_s``."""

    def __init__(self, warmup: int = 0, budget_s: float = float("inf")) -> None:
        self.warmup, self.budget_s, self.longest_epoch_s = warmup, budget_s, 0.0
        self.samples = self.batches = 0
        self.train_s = self.test_s = 0.0
        self.curve: list[dict[str, float]] = []
        self._fit_start = self._epoch_start = self._batch_start = self._test_start = 0.0
        self._epoch_train_s = 0.0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, index: int
    ) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, index: int
    ) -> None:
        self.batches += 1
        if time.perf_counter() - self._fit_start >= self.budget_s:
            trainer.should_stop = True  # as RecBole's side abandons an epoch at the budget's end
        if self.batches > self.warmup:
            self.train_s += time.perf_counter() - self._batch_start
            self.samples += int((batch["targets"] > 0).sum())

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_train_s = time.perf_counter() - self._epoch_start

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        now = time.perf_counter()
        self.longest_epoch_s = max(self.longest_epoch_s, now - self._epoch_start)
        if not within_budget(now - self._fit_start, self.longest_epoch_s, self.budget_s):
            trainer.should_stop = True
        self.curve.append(
            {
                "epoch": trainer.current_epoch + 1,
                "train_s": self._epoch_train_s,
                "wall_s": time.perf_counter() - self._fit_start,
                "val_ndcg@10": float(trainer.callback_metrics["val/ndcg@10"]),
            }
        )
        print(json.dumps(self.curve[-1]), flush=True)

    def on_test_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._test_start = time.perf_counter()

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.test_s = time.perf_counter() - self._test_start


def _run(model: str, overrides: list[str], timeline: Timeline, seed: int) -> dict[str, Any]:
    from rex.config.recipe import load_recipe
    from rex.engine.train import run_one

    os.chdir(REPO)
    loaded = load_recipe(REPO / "recipes" / f"{model}.yaml", [*PROTOCOL, *MODELS[model], *overrides])
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks" / ".peers") as run_dir:
        started = time.perf_counter()
        result = run_one(loaded, seed, Path(run_dir), extra_callbacks=[timeline])
        result["process_s"] = time.perf_counter() - started
    return result


def throughput(seed: int, warmup: int, batches: int) -> dict[str, Any]:
    timeline = Timeline(warmup)
    overrides = ["train.max_epochs=1", f"train.limit_train_batches={warmup + batches}"]
    result = _run("sasrec", overrides, timeline, seed)
    return {
        "samples": timeline.samples,
        "train_s": timeline.train_s,
        "samples_per_s": timeline.samples / timeline.train_s,
        "eval_s": timeline.test_s,
        "test": result["test"],
        "peak_rss_mb": peak_rss_mb(),
    }


def budget(model: str, seed: int, budget_s: float) -> dict[str, Any]:
    timeline = Timeline(budget_s=budget_s)
    result = _run(model, ["train.max_epochs=100000"], timeline, seed)
    return {
        "model": model,
        "budget_s": budget_s,
        "curve": timeline.curve,
        "test": result["test"],
        "best_epoch_tested": result["best"]["checkpoint"],
        "test_eval_s": timeline.test_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    worker_main("rex", __doc__.splitlines()[0], sorted(PREP_RECIPES), prep, throughput, budget)


if __name__ == "__main__":
    main()
