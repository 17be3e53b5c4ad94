"""Evaluation protocols: accumulate model outputs over a split, then compute its metrics."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rex import metrics as M
from rex.config import Recipe


class Evaluator:
    """Collects what a split's metrics need, batch by batch; ``compute`` returns name → value."""

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class RankingEvaluator(Evaluator):
    """Full ranking over every item for next-item prediction (one held-out target per user).

    Scores of the padding item, and of the history's items when ``exclude_history`` is set, are
    masked to -inf. Only the target's rank is kept per user, computed for a batch of users at
    once, so memory is bounded by one (batch, num_items) score matrix.
    """

    def __init__(self, metric_names: list[str], exclude_history: bool) -> None:
        self.metric_names = metric_names
        self.exclude_history = exclude_history
        self.reset()

    def reset(self) -> None:
        self._ranks: list[Tensor] = []
        self._num_items = 0

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        scores = model(batch)["scores"].float()
        scores[:, 0] = -torch.inf
        if self.exclude_history:
            scores.scatter_(1, batch["history"], -torch.inf)
        self._num_items = scores.shape[1]
        self._ranks.append(M.target_rank(scores, batch["target"]).cpu())

    def compute(self) -> dict[str, float]:
        ranks = torch.cat(self._ranks)
        out = {}
        for name in self.metric_names:
            metric, k = M.parse_metric_name(name)
            assert k is not None
            out[name] = float(M.RANKING_METRICS[metric](ranks, k, self._num_items).mean())
        return out


class ClickEvaluator(Evaluator):
    """AUC, gAUC (grouped by user) and logloss over every row of a split."""

    FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], float]] = {
        "auc": lambda logit, label, user: M.auc(logit, label),
        "gauc": lambda logit, label, user: M.gauc(logit, label, user),
        "logloss": lambda logit, label, user: M.logloss(torch.sigmoid(logit), label),
    }

    def __init__(self, metric_names: list[str]) -> None:
        self.metric_names = metric_names
        self.reset()

    def reset(self) -> None:
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        logit = model(batch)["logit"].float()
        self._parts.append((logit.cpu(), batch["label"].cpu(), batch["user"].cpu()))

    def compute(self) -> dict[str, float]:
        logit, label, user = (torch.cat(part) for part in zip(*self._parts, strict=True))
        return {name: self.FUNCTIONS[name](logit, label, user) for name in self.metric_names}


def make_evaluator(recipe: Recipe) -> Evaluator:
    names = list(recipe.eval.metrics or [])
    if recipe.task == "next_item":
        return RankingEvaluator(names, recipe.eval.exclude_history)
    return ClickEvaluator(names)
