"""One torch-rechub measurement of DeepFM on Frappe, in a fresh process (run with its venv).

    benchmarks/.peers/rechub/bin/python benchmarks/peers/ctr_worker_rechub.py \\
        --task throughput --threads 1 --out r.json

The peer is used as its examples use it (``examples/ranking/run_criteo.py``): the CSV files
written by ``export_frappe.py`` read with pandas, one ``SparseFeature`` per field shared by the
deep and FM parts of ``torch_rechub.models.ranking.DeepFM``, its ``DataGenerator`` for the three
DataLoaders, and its ``CTRTrainer`` for training, early stopping and evaluation. Nothing of the
peer is changed; the sizes match ``recipes/deepfm_frappe.yaml`` (embedding 10, MLP 400-400-400
relu with batch norm and dropout 0.2, Adam lr 1e-3 without weight decay, BCE, batch 4096).

What is measured, as in ``ctr_worker_rex.py``:

* ``load_s``: reading the three CSV files and building the peer's feature columns and loaders.
* ``throughput``: ``--warmup`` batches, then ``--batches`` training batches through
  ``CTRTrainer.train_one_epoch`` (making each batch with the peer's DataLoader, forward, BCE,
  backward, the optimiser step), timed from the end of the last warm-up batch to the end of the
  last batch. Then one full ``CTRTrainer.evaluate`` pass over the test split (forward plus AUC).
* ``accuracy``: ``CTRTrainer.fit`` for up to ``--epochs`` epochs with its early stopping
  (``--patience``) on validation AUC, then test AUC (``CTRTrainer.evaluate``) and logloss (of
  ``CTRTrainer.predict``, with scikit-learn's ``log_loss``).
* ``peak_rss_mb``: the process's peak resident set size (``ru_maxrss``) at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

# tqdm's bars off, as rex's progress bar is off in its worker (an environment switch of tqdm's,
# not a change to the peer); set before torch_rechub imports tqdm.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from measure import ctr_parser, peak_rss_mb, write_result  # noqa: E402
from sklearn.metrics import log_loss  # noqa: E402
from torch_rechub.basic.features import SparseFeature  # noqa: E402
from torch_rechub.basic.initializers import RandomNormal  # noqa: E402
from torch_rechub.models.ranking import DeepFM  # noqa: E402
from torch_rechub.trainers import CTRTrainer  # noqa: E402
from torch_rechub.utils.data import DataGenerator  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "benchmarks" / ".peers" / "data" / "frappe"
SPLITS = ("train", "valid", "test")


class Batches:
    """The first ``count`` batches of repeated passes over ``loader`` (a new shuffle per pass).

    Notes when the trainer has finished its ``warmup`` steps (``timed_from``) and the rows of the
    batches after them (``timed_rows``).
    """

    def __init__(self, loader: Iterable[Any], count: int, warmup: int) -> None:
        self.loader = loader
        self.count = count
        self.warmup = warmup
        self.timed_from = 0.0
        self.timed_rows = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        given = 0
        if self.warmup == 0:
            self.timed_from = time.perf_counter()
        while True:
            for batch in self.loader:
                if given >= self.warmup:
                    self.timed_rows += int(batch[1].shape[0])
                yield batch
                # Resumed here once the trainer has finished the step on that batch.
                given += 1
                if given == self.count:
                    return  # before fetching a batch that would not be trained on
                if given == self.warmup:
                    self.timed_from = time.perf_counter()


def load(batch_size: int) -> tuple[list[SparseFeature], dict[str, Any]]:
    """The fields (with rex's vocabulary sizes) and the peer's train/valid/test DataLoaders."""
    if not (DATA / "fields.json").is_file():
        raise SystemExit(f"{DATA}: no export; run `.venv/bin/python benchmarks/peers/export_frappe.py` first")
    sizes = json.loads((DATA / "fields.json").read_text())["fields"]
    frames = {split: pd.read_csv(DATA / f"{split}.csv") for split in SPLITS}
    # Embeddings start as rex's do (normal, std 0.01), through the peer's own initializer option.
    features = [
        SparseFeature(name, vocab_size=size, embed_dim=10, initializer=RandomNormal(0, 0.01))
        for name, size in sizes.items()
    ]
    x = {split: {name: frame[name].values for name in sizes} for split, frame in frames.items()}
    y = {split: frame["label"].values for split, frame in frames.items()}
    generator = DataGenerator(x["train"], y["train"])
    train, valid, test = generator.generate_dataloader(
        x_val=x["valid"], y_val=y["valid"], x_test=x["test"], y_test=y["test"], batch_size=batch_size
    )
    return features, {"train": train, "valid": valid, "test": test}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run one task and return its result record."""
    torch.set_num_threads(args.threads)
    # The peer's DataLoader shuffles and its model initialises from torch's global generator.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    started = time.perf_counter()
    features, loaders = load(args.batch_size)
    load_s = time.perf_counter() - started
    model = DeepFM(
        deep_features=features,
        fm_features=features,
        mlp_params={"dims": [400, 400, 400], "dropout": 0.2, "activation": "relu"},
    )
    result: dict[str, Any] = {
        "side": "torch-rechub",
        "task": args.task,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "load_s": round(load_s, 3),
    }
    with tempfile.TemporaryDirectory(prefix="rechub-peer-") as tmp:
        trainer = CTRTrainer(
            model,
            optimizer_params={"lr": 1e-3, "weight_decay": 0.0},
            n_epoch=args.epochs,
            earlystop_patience=args.patience,
            device="cpu",
            model_path=tmp,
        )
        if args.task == "throughput":
            batches = Batches(loaders["train"], args.warmup + args.batches, args.warmup)
            with contextlib.redirect_stdout(io.StringIO()):
                trainer.train_one_epoch(batches)
            train_s = time.perf_counter() - batches.timed_from
            result |= {
                "warmup_batches": args.warmup,
                "train_batches": args.batches,
                "train_rows": batches.timed_rows,
                "train_s": round(train_s, 3),
                "train_rows_per_s": round(batches.timed_rows / train_s, 1),
            }
        else:
            log = io.StringIO()
            fit_start = time.perf_counter()
            with contextlib.redirect_stdout(log):
                trainer.fit(loaders["train"], loaders["valid"])
            fit_s = time.perf_counter() - fit_start
            # The trainer prints "epoch: i validation: auc: x" after each epoch.
            aucs = [float(a) for a in re.findall(r"validation: auc: ([0-9.eE+-]+)", log.getvalue())]
            best = int(np.argmax(aucs)) if aucs else None
            probs = np.asarray(trainer.predict(trainer.model, loaders["test"]), dtype=np.float64)
            labels = loaders["test"].dataset.y
            result |= {
                "max_epochs": args.epochs,
                "patience": args.patience,
                "epochs_run": len(aucs),
                "val_auc_per_epoch": [round(a, 5) for a in aucs],
                "best": {"epoch": best, "score": trainer.early_stopper.best_auc},
                # Weights of the best epoch are restored only when early stopping fires.
                "early_stopped": len(aucs) < args.epochs,
                "fit_s": round(fit_s, 2),
                "logloss": float(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7))),
            }
        eval_start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            auc = trainer.evaluate(trainer.model, loaders["test"])
        eval_s = time.perf_counter() - eval_start
    test_rows = len(loaders["test"].dataset)
    result |= {
        "test_rows": test_rows,
        "eval_s": round(eval_s, 3),
        "eval_rows_per_s": round(test_rows / eval_s, 1),
        "test": {"auc": float(auc), **({"logloss": result.pop("logloss")} if "logloss" in result else {})},
        "peak_rss_mb": peak_rss_mb(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch-rechub": version("torch-rechub"),
            "pandas": pd.__version__,
        },
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = ctr_parser("One torch-rechub DeepFM-on-Frappe measurement.")
    args = parser.parse_args(argv)
    write_result(args.out, measure(args))


if __name__ == "__main__":
    main()
