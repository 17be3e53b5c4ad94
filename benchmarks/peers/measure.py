"""What the SASRec and data-preparation workers share: the command line and peak RSS.

Imported by ``rex_worker.py`` and ``recbole_worker.py``, each in its own venv, so it needs
nothing beyond the standard library and torch.
"""

from __future__ import annotations

import argparse
import json
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Result = dict[str, Any]


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# The sequential models of the wall-clock-budget comparison, each with RecBole's default
# hyperparameters on both sides (recbole/properties/model/<Model>.yaml, lr 1e-3, batches of
# 2,048 samples, max length 50).
BUDGET_MODELS = ("sasrec", "bert4rec", "gru4rec")


def within_budget(wall_s: float, longest_epoch_s: float, budget_s: float) -> bool:
    """Whether another epoch (training and validation) should start: only if one as long as the
    longest so far would still end within the budget. The same rule on both sides."""
    return wall_s + longest_epoch_s <= budget_s


def worker_main(
    framework: str,
    description: str,
    datasets: list[str],
    prep: Callable[[str], Result],
    throughput: Callable[[int, int, int], Result],
    budget: Callable[[str, int, float], Result],
) -> None:
    """Parse the shared flags, run one task, write its result (plus who and how) to ``--out``.

    ``prep(dataset)``, ``throughput(seed, warmup, batches)`` and ``budget(model, seed,
    budget_s)`` are the worker's three measurements.
    """
    tasks: dict[str, Callable[[argparse.Namespace], Result]] = {
        "prep": lambda args: prep(args.dataset),
        "throughput": lambda args: throughput(args.seed, args.warmup, args.batches),
        "budget": lambda args: budget(args.model, args.seed, args.budget_s),
    }
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", choices=sorted(tasks), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", default=datasets[0], choices=datasets, help="prep: which dataset")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--warmup", type=int, default=3, help="throughput: untimed batches first")
    parser.add_argument("--batches", type=int, default=20, help="throughput: timed batches")
    parser.add_argument("--model", default="sasrec", choices=BUDGET_MODELS, help="budget: which model")
    parser.add_argument("--budget-s", type=float, default=900.0, help="budget: wall-clock seconds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = tasks[args.task](args)
    result |= {"framework": framework, "task": args.task, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps(result, indent=1))


def ctr_parser(description: str) -> argparse.ArgumentParser:
    """The DeepFM workers' flags, the same for rex and its peer."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", choices=("throughput", "accuracy"), required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=50, help="accuracy: epoch cap")
    parser.add_argument("--patience", type=int, default=3, help="accuracy: early-stopping patience")
    parser.add_argument("--batches", type=int, default=40, help="throughput: timed training batches")
    parser.add_argument("--warmup", type=int, default=3, help="throughput: untimed batches first")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=42)
    return parser


def write_result(path: Path, result: dict[str, Any]) -> None:
    """The result as JSON at ``path``, and its scalar summary on stdout (the worker's log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_per_epoch")}))
