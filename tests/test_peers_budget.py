"""The wall-clock-budget comparison's rules (benchmarks/peers/): which epochs count, the bar and
the time to it, against hand-worked curves."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"


def _load(name: str) -> ModuleType:
    # benchmarks/peers/ is not a package: load the script as a module, as the test of a script.
    spec = importlib.util.spec_from_file_location(name, PEERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _side(points: list[tuple[float, float]], test: dict[str, float] | None = None) -> dict:
    curve = [{"epoch": i + 1, "wall_s": wall, "val_ndcg@10": ndcg} for i, (wall, ndcg) in enumerate(points)]
    return {"budget_s": 100.0, "curve": curve, "test": test}


def test_an_epoch_starts_only_if_the_longest_so_far_still_fits() -> None:
    within_budget = _load("measure").within_budget
    assert within_budget(0.0, 0.0, 100.0)  # nothing run yet: the first epoch starts
    assert within_budget(60.0, 40.0, 100.0)  # ends at 100 at the latest
    assert not within_budget(61.0, 40.0, 100.0)


def test_the_bar_is_recboles_best_within_the_budget_and_later_epochs_do_not_count() -> None:
    summary = _load("run").budget_summary(
        {
            "rex": _side([(10, 0.01), (20, 0.02), (30, 0.03), (101, 0.09)]),
            "recbole": _side([(50, 0.015), (95, 0.025), (140, 0.05)]),
        }
    )
    # RecBole's third epoch ended at 140 s, past the 100 s budget: its bar is epoch 2's 0.025.
    assert summary["bar"] == 0.025
    assert summary["recbole"] == {
        "best_val_ndcg@10": 0.025,
        "best_epoch": 2,
        "epochs": 2,
        "epochs_over_budget": 1,
        "time_to_bar_s": 95,
        "tested_epoch": 3,  # its best of all it ran, flagged in the report as past the budget
    }
    # rex first reaches 0.025 at epoch 3 (30 s); its 101 s epoch is past the budget.
    assert summary["rex"]["time_to_bar_s"] == 30
    assert summary["rex"]["best_epoch"] == 3 and summary["rex"]["epochs_over_budget"] == 1


def test_no_epoch_within_the_budget_gives_no_bar() -> None:
    summary = _load("run").budget_summary({"rex": _side([(30, 0.02)]), "recbole": _side([])})
    assert summary["bar"] is None
    assert summary["recbole"]["best_epoch"] is None and summary["recbole"]["tested_epoch"] is None
    assert summary["rex"]["time_to_bar_s"] is None and summary["rex"]["best_epoch"] == 1
