"""One RecBole measurement in a fresh process (runs in the RecBole venv; see run.py).

Tasks, each writing one JSON object to ``--out``:

* ``prep``: the time from RecBole's atomic files to the first training batch
  (``Config`` + ``create_dataset`` + ``data_preparation`` + one batch), and peak RSS.
* ``throughput``: SASRec on Beauty: ``--warmup`` batches, then ``--batches`` timed training
  batches through RecBole's own ``Trainer._train_epoch``; then one timed full-ranking
  evaluation over all test users (``Trainer.evaluate``).
* ``budget``: ``--model`` (SASRec, BERT4Rec or GRU4Rec, RecBole's defaults) on Beauty for
  ``--budget-s`` wall-clock seconds of training and validation, then the test metrics of the
  best validation epoch.

A RecBole "sample" is one row of its training data: a prefix of a user's sequence and the next
item, so samples per epoch = training interactions − users.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from measure import peak_rss_mb, within_budget, worker_main
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import BERT4Rec, GRU4Rec, SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed

PEERS = Path(__file__).resolve().parents[1] / ".peers"

# The benchmark's protocol and batch: leave-one-out, full ranking, max length 50, CE over all
# items, 2,048 training rows a batch.
PROTOCOL = {
    "MAX_ITEM_LIST_LENGTH": 50,
    "loss_type": "CE",
    "train_neg_sample_args": None,
    "train_batch_size": 2048,
    "eval_batch_size": 2048,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "metrics": ["NDCG", "Hit"],
    "topk": [10],
    "valid_metric": "NDCG@10",
}
# Each model keeps RecBole's defaults (recbole/properties/model/<Model>.yaml, which Config loads
# for the model's name; lr 1e-3 from overall.yaml); rex's worker sets the same values.
MODELS = {"sasrec": SASRec, "bert4rec": BERT4Rec, "gru4rec": GRU4Rec}
# ml-1m has no order: a general recommender's build (random 8:1:1 split, one uniform negative
# per training pair), loading the same user and movie features rex's ml-1m dataset carries.
ML1M = {
    "load_col": {
        "inter": ["user_id", "item_id"],
        "user": ["user_id", "gender", "age", "occupation", "zip"],
        "item": ["item_id", "release_year", "genre"],
    },
    "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "mode": "full", "group_by": "user"},
    "train_batch_size": 4096,
}


def config(model: str, dataset: str, extra: dict[str, Any], seed: int) -> Config:
    return Config(
        model=model,
        dataset=dataset,
        config_dict={
            "data_path": str(PEERS / "data" / "recbole"),
            "checkpoint_dir": str(PEERS / "recbole_saved"),
            "use_gpu": False,
            "device": "cpu",
            "show_progress": False,
            "state": "WARNING",
            "seed": seed,
            "reproducibility": True,
            "worker": 0,
            "user_inter_num_interval": "[0,inf)",
            "item_inter_num_interval": "[0,inf)",
            **extra,
        },
    )


class FirstBatches:
    """The first ``count`` batches of a RecBole loader, for ``Trainer._train_epoch``."""

    def __init__(self, loader: Any, count: int) -> None:
        self.loader, self.count, self.shuffle, self.rows = loader, count, False, 0

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.loader):
            if index == self.count:
                return
            self.rows += len(batch)
            yield batch


class UntilDeadline:
    """A RecBole training loader that stops yielding at ``deadline`` (``perf_counter`` seconds);
    ``cut`` says whether it did, so the interrupted epoch is neither validated nor counted."""

    def __init__(self, loader: Any, deadline: float) -> None:
        self.loader, self.deadline, self.cut = loader, deadline, False
        self.shuffle = loader.shuffle

    def __iter__(self) -> Iterator[Any]:
        self.cut = False
        for batch in self.loader:
            if time.perf_counter() >= self.deadline:
                self.cut = True
                return
            yield batch


def prep(dataset: str) -> dict[str, Any]:
    started = time.perf_counter()
    model, extra = ("SASRec", PROTOCOL) if dataset == "beauty" else ("BPR", ML1M)
    cfg = config(model, dataset, extra, seed=2020)
    init_seed(cfg["seed"], cfg["reproducibility"])
    data = create_dataset(cfg)
    train, _, _ = data_preparation(cfg, data)
    next(iter(train))
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def _model(name: str, seed: int) -> tuple[Trainer, Any, Any, Any, float]:
    started = time.perf_counter()
    model_class = MODELS[name]
    cfg = config(model_class.__name__, "beauty", PROTOCOL, seed)
    init_seed(cfg["seed"], cfg["reproducibility"])
    data = create_dataset(cfg)
    train, valid, test = data_preparation(cfg, data)
    model = model_class(cfg, train.dataset).to(cfg["device"])
    return Trainer(cfg, model), train, valid, test, time.perf_counter() - started


def _timed_eval(trainer: Trainer, loader: Any) -> tuple[dict[str, float], float]:
    started = time.perf_counter()
    result = trainer.evaluate(loader, load_best_model=False, show_progress=False)
    return {k: float(v) for k, v in result.items()}, time.perf_counter() - started


def throughput(seed: int, warmup: int, batches: int) -> dict[str, Any]:
    trainer, train, _, test, load_s = _model("sasrec", seed)
    trainer._train_epoch(FirstBatches(train, warmup), 0)
    timed = FirstBatches(train, batches)
    started = time.perf_counter()
    trainer._train_epoch(timed, 0)
    train_s = time.perf_counter() - started
    _, eval_s = _timed_eval(trainer, test)
    return {
        "load_s": load_s,
        "samples": timed.rows,
        "train_s": train_s,
        "samples_per_s": timed.rows / train_s,
        "eval_s": eval_s,
        "eval_users": len(test.dataset.inter_feat) if hasattr(test.dataset, "inter_feat") else None,
        "samples_per_epoch": len(train.dataset),
        "peak_rss_mb": peak_rss_mb(),
    }


def budget(model: str, seed: int, budget_s: float) -> dict[str, Any]:
    """As ``Trainer.fit`` does, validating after every epoch, while one more epoch fits in
    ``budget_s`` (measure.within_budget); an epoch still running at the budget's end is
    abandoned. Then the test metrics of the best validation epoch (None if none finished)."""
    trainer, train, valid, test, load_s = _model(model, seed)
    curve: list[dict[str, float]] = []
    wall = longest = 0.0
    best_score, best_state = -1.0, None
    epoch = 0
    loader = UntilDeadline(train, time.perf_counter() + budget_s)
    while within_budget(wall, longest, budget_s):
        started = time.perf_counter()
        trainer._train_epoch(loader, epoch)
        if loader.cut:
            print(json.dumps({"abandoned_epoch": epoch + 1, "at_s": wall + time.perf_counter() - started}))
            break
        train_s = time.perf_counter() - started
        score, result = trainer._valid_epoch(valid)
        epoch += 1
        longest = max(longest, time.perf_counter() - started)
        wall += time.perf_counter() - started
        curve.append(
            {"epoch": epoch, "train_s": train_s, "wall_s": wall, "val_ndcg@10": float(result["ndcg@10"])}
        )
        print(json.dumps(curve[-1]), flush=True)
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(trainer.model.state_dict())
    test_result, eval_s = None, None
    if best_state is not None:
        trainer.model.load_state_dict(best_state)
        test_result, eval_s = _timed_eval(trainer, test)
    return {
        "model": model,
        "budget_s": budget_s,
        "load_s": load_s,
        "curve": curve,
        "test": test_result,
        "test_eval_s": eval_s,
        "samples_per_epoch": len(train.dataset),
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    worker_main("recbole", __doc__.splitlines()[0], ["beauty", "ml-1m"], prep, throughput, budget)


if __name__ == "__main__":
    main()
