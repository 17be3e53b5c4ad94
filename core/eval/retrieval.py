"""Multi-objective retrieval: full ranking over every item for each objective, and for their
fusion, of a model that scores by dot products with one table of item vectors.

The evaluator drives the model through a small protocol (:class:`MultiObjectiveModel`):

* ``model.objectives``: the K objective names, in the data's order (taobao_mb: view, cart, buy);
* ``model.item_vectors() -> (num_items, D)``: row 0 is the padding item, never ranked;
* ``model.objective_vectors(batch) -> (B, K, D)``: objective k's score of item i for row b is
  ``objective_vectors[b, k] @ item_vectors()[i]``;
* ``model.user_vectors(batch, fusion) -> (B, D)``: the query of the fused score (below), so a
  vector index over ``item_vectors()`` serves any fusion weights.

**Fusion.** Objective k's probability of item i is the softmax of its scores over all items,
``p_k(i | u)``. The fused score is ``sum_k w_k log p_k(i | u)``; each ``log p_k`` is the score
minus a per-user constant, so the fused ranking is that of ``(sum_k w_k q_k) @ v_i``: one dot
product, however the weights are set. The weights are this evaluator's ``fusion`` argument
(objective name -> weight; default: equal), so changing them re-ranks a trained model without
retraining it.

**Rows.** A batch holds ``target_<name>`` (B,) per objective (0: the row has no held-out item of
it) and ``seen_<name>`` (B, S), the user's known items of that behaviour, excluded from that
objective's ranking with ``exclude_seen`` (a user's known view can never be their held-out view).
The field names come from the data's roles: ``target:<name>``.

**Metrics.** ``METRIC:<name>`` is objective ``name``'s own ranking against its held-out items;
``METRIC:fused_<name>`` the fused ranking against them (objectives with a non-zero weight); the
plain ``METRIC`` (what a recipe monitors) is the mean of the fused ones. Every metric is a mean
over the rows with a held-out item, gathered across processes first.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
from torch import Tensor, nn

from rex.config.errors import RecipeError
from rex.config.registry import register
from rex.eval import metrics as M
from rex.eval.evaluators import Evaluator, IndexRanker, check_metrics, ranking_metrics, trim_left_padding
from rex.eval.gather import gather_rows


class MultiObjectiveModel(Protocol):
    """What ``eval/retrieval`` needs of a model (see the module docstring)."""

    objectives: list[str]

    def item_vectors(self) -> Tensor: ...

    def objective_vectors(self, batch: dict[str, Tensor]) -> Tensor: ...


def fusion_weights(objectives: list[str], fusion: dict[str, float] | None) -> Tensor:
    """(K,) the weights of ``fusion`` in ``objectives``' order; equal weights for None. A
    ValueError for a name that is not an objective, or weights that are all 0."""
    if fusion is None:
        return torch.full((len(objectives),), 1.0 / len(objectives))
    unknown = sorted(set(fusion) - set(objectives))
    if unknown:
        raise ValueError(f"fusion names {', '.join(unknown)}, not an objective ({', '.join(objectives)})")
    weights = torch.tensor([float(fusion.get(name, 0.0)) for name in objectives])
    if not bool((weights != 0).any()):
        raise ValueError("fusion must give some objective a non-zero weight")
    return weights


@register("eval/retrieval")
class RetrievalEvaluator(Evaluator):
    """Full retrieval over every item, per objective and fused (see :mod:`rex.eval.retrieval`).

    ``fusion`` (objective -> weight, default equal) weighs the objectives' log-probabilities in
    the fused ranking, which the plain metrics report; ``METRIC:<objective>`` is each objective's
    own ranking. Items the user already has in an objective's behaviour are excluded from its
    ranking (``exclude_seen``). Users are scored ``chunk_rows`` at a time. ``index`` (a table
    written by ``rex export-index`` from this model) ranks every objective's and the fused
    queries from the index's top items instead, as ``eval/ranking``'s ``index`` does: the
    metrics of serving from it, where a target outside its top ``k`` (the largest cut-off) is a miss.
    """

    def __init__(
        self,
        metrics: list[str],
        roles: dict[str, str],
        fusion: dict[str, float] | None = None,
        exclude_seen: bool = True,
        chunk_rows: int = 256,
        index: str | None = None,
    ) -> None:
        self.metric_names = check_metrics(metrics, list(M.RANKING_METRICS), "eval/retrieval")
        self.targets = {
            role.split(":", 1)[1]: field for role, field in roles.items() if role.startswith("target:")
        }
        if not self.targets:
            raise ValueError(
                "eval/retrieval needs a view with target:<objective> fields (task multi_objective)"
            )
        self.fusion = fusion
        fusion_weights(list(self.targets), fusion)  # a bad name fails at build, not mid-run
        self.exclude_seen = exclude_seen
        self.chunk_rows = chunk_rows
        self.index = index
        self.reset()

    def reset(self) -> None:
        self._ranks: dict[str, list[Tensor]] = {}
        self._num_items = 0
        self._searcher: IndexRanker | None = None

    def _rank(self, key: str, queries: Tensor, items: Tensor, chunk: dict[str, Tensor], name: str) -> None:
        """The 0-based ranks of objective ``name``'s held-out items under ``queries`` (rows with one)."""
        rows = (chunk[self.targets[name]] > 0).nonzero().squeeze(1)
        target, own = chunk[self.targets[name]].index_select(0, rows), queries.index_select(0, rows)
        seen = trim_left_padding(chunk[f"seen_{name}"].index_select(0, rows)) if self.exclude_seen else None
        if self._searcher is not None:
            ranks = self._searcher.query_ranks(own, target, seen)
        else:
            scores = own.float() @ items.T
            scores[:, 0] = -torch.inf
            if seen is not None:
                scores.scatter_(1, seen, -torch.inf)
            ranks = M.target_rank(scores, target).cpu()
        self._ranks.setdefault(key, []).append(ranks)

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        if not all(callable(getattr(model, name, None)) for name in ("objective_vectors", "item_vectors")):
            raise RecipeError(
                f"eval/retrieval cannot rank {type(model).__name__}'s items: it needs objectives, "
                "objective_vectors(batch) and item_vectors() (a multi-objective retrieval model, "
                "such as model/two_tower)",
                key="eval.evaluator",
            )
        retriever = cast(MultiObjectiveModel, model)
        objectives = list(retriever.objectives)
        if objectives != list(self.targets):
            raise ValueError(f"the model's objectives {objectives} are not the data's {list(self.targets)}")
        weights = fusion_weights(objectives, self.fusion)
        if self.index is not None and self._searcher is None:
            self._searcher = IndexRanker.for_metrics(self.index, model, self.metric_names)
        items = retriever.item_vectors().float()
        self._num_items = items.shape[0]
        rows = next(iter(batch.values())).shape[0]
        for start in range(0, rows, self.chunk_rows):
            chunk = {name: value[start : start + self.chunk_rows] for name, value in batch.items()}
            queries = retriever.objective_vectors(chunk).float()  # (b, K, D)
            fused = torch.einsum("k,bkd->bd", weights.to(queries.device), queries)
            for k, name in enumerate(objectives):
                self._rank(name, queries[:, k], items, chunk, name)
                if weights[k] != 0:
                    self._rank(f"fused_{name}", fused, items, chunk, name)

    def compute(self) -> dict[str, float]:
        per_key = {
            key: ranking_metrics(gather_rows(torch.cat(parts)), self.metric_names, self._num_items)
            for key, parts in self._ranks.items()
        }
        fused = [values for key, values in per_key.items() if key.startswith("fused_")]
        out = {name: sum(values[name] for values in fused) / len(fused) for name in self.metric_names}
        for key, values in per_key.items():
            out.update({f"{name}:{key}": value for name, value in values.items()})
        return out
