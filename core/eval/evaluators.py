"""Evaluation protocols: accumulate model outputs over a split, then compute its metrics."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rex.config.schema import Recipe
from rex.eval import metrics as M


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
    masked to -inf. Only the target's rank is kept per user. A batch is scored ``chunk_rows``
    users at a time: a (chunk_rows, num_items) score matrix stays in cache while it is masked
    and ranked, which on CPU is several times faster than one matrix for the whole batch, and
    memory is bounded by it whatever the evaluation batch size.
    """

    def __init__(self, metric_names: list[str], exclude_history: bool, chunk_rows: int = 256) -> None:
        self.metric_names = metric_names
        self.exclude_history = exclude_history
        self.chunk_rows = chunk_rows
        self.reset()

    def reset(self) -> None:
        self._ranks: list[Tensor] = []
        self._num_items = 0

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        rows = batch["target"].shape[0]
        for start in range(0, rows, self.chunk_rows):
            chunk = {name: value[start : start + self.chunk_rows] for name, value in batch.items()}
            chunk["history"] = _trim_left_padding(chunk["history"])
            scores = model(chunk)["scores"].float()
            scores[:, 0] = -torch.inf
            if self.exclude_history:
                scores.scatter_(1, chunk["history"], -torch.inf)
            self._num_items = scores.shape[1]
            self._ranks.append(M.target_rank(scores, chunk["target"]).cpu())

    def compute(self) -> dict[str, float]:
        ranks = torch.cat(self._ranks)
        out = {}
        for name in self.metric_names:
            metric, k = M.parse_metric_name(name)
            assert k is not None
            out[name] = float(M.RANKING_METRICS[metric](ranks, k, self._num_items).mean())
        return out


def _trim_left_padding(history: Tensor) -> Tensor:
    """Drops the columns that are padding in every row: a chunk of short histories cut from a
    batch padded for a longer one is encoded at its own width."""
    used = (history != 0).any(dim=0).nonzero()
    return history[:, int(used[0]) :] if used.numel() else history[:, -1:]


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
