"""Evaluation protocols: accumulate model outputs over a split, then compute its metrics.

Evaluators are registered components (``eval/ranking``, ``eval/click``, ...). A recipe names one
in ``eval.evaluator``, or its task's default is used; the core passes the recipe's
``eval.metrics`` (and ``eval.exclude_history``, to an evaluator that asks for it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from rex.config.errors import RecipeError
from rex.config.registry import register
from rex.eval import metrics as M
from rex.eval.gather import gather_rows


class Evaluator:
    """Collects what a split's metrics need, batch by batch; ``compute`` returns name → value.

    ``reads`` names the model outputs that ``update`` uses (checked against the model's declared
    outputs at build time); an evaluator that drives the model through methods of its own (a
    beam search) reads none.
    """

    reads: tuple[str, ...] = ()
    decoding: Decoding | None = None

    def reset(self) -> None:
        """Starts a pass. An evaluator with a ``decoding`` clears its accumulators and calls this
        too, so that the decoding is fitted again (on a model that may have trained since)."""
        self._decoding_fitted = False

    def fit_decoding_once(self, model: nn.Module, evaluator: str) -> None:
        """Fits ``decoding`` (if any) on ``model`` at the first batch of a pass."""
        if self.decoding is not None and not self._decoding_fitted:
            fit_decoding(self.decoding, model, evaluator)
            self._decoding_fitted = True

    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


@runtime_checkable
class Decoding(Protocol):
    """An inference-time transform of a model's scores: an evaluator's ``decoding`` argument
    (a ``decoding/...`` component, such as ``decoding/usd``).

    ``fit(tables)`` is called once per evaluation pass with the model's ``output_tables()``: one
    (V_t, D) table per decoding step, the vectors that step's scores are dot products with.
    ``decoding(scores (..., V_t), step) -> (..., V_t)`` then returns the scores ranked instead;
    -inf entries (masked items) stay -inf.
    """

    def fit(self, tables: list[Tensor]) -> None: ...

    def __call__(self, scores: Tensor, step: int = 0) -> Tensor: ...


@runtime_checkable
class RetrievalModel(Protocol):
    """A model whose full-ranking scores are dot products, so that it can serve from a vector
    index of its items (``rex export-index``, ``eval/ranking``'s ``index``).

    ``item_vectors()`` (num_items, D): row i is item i's vector, row 0 the padding item's.
    ``user_vectors(batch)`` (B, D): the queries of a scoring batch, such that
    ``user_vectors(batch) @ item_vectors().T`` is the model's ``scores`` for it. SASRec and its
    family (``model/sequential``, ``model/masked_sequential``) implement it, as do two-tower models.
    """

    def item_vectors(self) -> Tensor: ...

    def user_vectors(self, batch: dict[str, Tensor]) -> Tensor: ...


def fit_decoding(decoding: Decoding, model: nn.Module, evaluator: str) -> None:
    """Fits ``decoding`` on ``model.output_tables()``; a RecipeError at ``eval.evaluator.decoding``
    when the model has none or the decoding rejects them."""
    tables = getattr(model, "output_tables", None)
    if not callable(tables):
        raise RecipeError(
            f"{evaluator} cannot decode {type(model).__name__}'s scores: the model has no "
            "output_tables() (the vectors its scores are dot products with); remove decoding",
            key="eval.evaluator.decoding",
        )
    try:
        decoding.fit([table.detach() for table in tables()])
    except ValueError as exc:
        raise RecipeError(str(exc), key="eval.evaluator.decoding") from exc


def check_metrics(metrics: list[str], allowed: Sequence[str], evaluator: str) -> list[str]:
    """``metrics`` unchanged when each names a metric in ``allowed``; a ValueError naming what the
    evaluator computes otherwise (for a name the metric table does not know, too)."""
    for name in metrics:
        try:
            known = M.parse_metric_name(name)[0] in allowed
        except ValueError:
            known = False
        if not known:
            raise ValueError(f"{evaluator} cannot compute {name!r}; it computes {', '.join(allowed)}")
    return metrics


@register("eval/ranking")
class RankingEvaluator(Evaluator):
    """Full ranking over every item for next-item prediction (one held-out target per user).

    Reads ``scores`` (B, num_items) for a batch's ``history`` (B, L), the model's window, and
    ``target`` (B,). Scores of the padding item, and with ``exclude_history`` of every item in
    ``seen`` (B, S), the user's whole training history however long, are masked to -inf: the
    protocol excludes the history, not only the part the model reads. ``decoding`` (a
    ``decoding/...`` component, fitted once per pass on the model's ``output_tables()``) then
    transforms the masked scores before ranking. ``index`` (a table written by ``rex
    export-index`` from this model) ranks instead from the index's top items for each user's
    ``user_vectors`` (a :class:`RetrievalModel`), with the same masking: the metrics of serving
    from the index, where a target outside its top ``k`` (the largest cut-off) is a miss. Only
    the target's rank is kept per user. A batch is scored ``chunk_rows``
    users at a time: a (chunk_rows, num_items) score matrix stays in cache while it is masked
    and ranked, which on CPU is several times faster than one matrix for the whole batch, and
    memory is bounded by it whatever the evaluation batch size.
    """

    reads = ("scores",)

    def __init__(
        self,
        metrics: list[str],
        exclude_history: bool,
        chunk_rows: int = 256,
        decoding: Decoding | None = None,
        index: str | None = None,
    ) -> None:
        self.metric_names = check_metrics(metrics, list(M.RANKING_METRICS), "eval/ranking")
        self.exclude_history = exclude_history
        self.chunk_rows = chunk_rows
        self.decoding = decoding
        if index is not None and decoding is not None:
            raise ValueError(
                "decoding transforms every item's score and an index returns only its top items: use one"
            )
        self.index = index
        self.reset()

    def reset(self) -> None:
        self._ranks: list[Tensor] = []
        self._num_items = 0
        self._searcher: IndexRanker | None = None
        super().reset()

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        self.fit_decoding_once(model, "eval/ranking")
        if self.index is not None and self._searcher is None:
            self._searcher = IndexRanker.for_metrics(self.index, model, self.metric_names)
        rows = batch["target"].shape[0]
        for start in range(0, rows, self.chunk_rows):
            chunk = {name: value[start : start + self.chunk_rows] for name, value in batch.items()}
            chunk["history"] = trim_left_padding(chunk["history"])
            if self._searcher is not None:
                seen = trim_left_padding(chunk["seen"]) if self.exclude_history else None
                self._num_items = self._searcher.num_items
                self._ranks.append(self._searcher.ranks(chunk, seen))
                continue
            scores = model(chunk)["scores"].float()
            scores[:, 0] = -torch.inf
            if self.exclude_history:
                scores.scatter_(1, trim_left_padding(chunk["seen"]), -torch.inf)
            if self.decoding is not None:
                scores = self.decoding(scores, 0)
            self._num_items = scores.shape[1]
            self._ranks.append(M.target_rank(scores, chunk["target"]).cpu())

    def compute(self) -> dict[str, float]:
        return ranking_metrics(gather_rows(torch.cat(self._ranks)), self.metric_names, self._num_items)


class IndexRanker:
    """Target ranks from a vector index of ``model``'s items (``eval/ranking``'s ``index``).

    The index must hold the model's own item vectors (checked once), so that a stale export,
    or one of another run, fails rather than reports another model's metrics."""

    def __init__(self, path: str, model: nn.Module, k: int) -> None:
        from rex.eval.vector_index import VectorIndex

        if not isinstance(model, RetrievalModel):
            raise RecipeError(
                f"eval/ranking cannot rank {type(model).__name__}'s items from an index: it has no "
                "item_vectors() and user_vectors(batch) (the vectors its scores are dot products of)",
                key="eval.evaluator.index",
            )
        self.model: RetrievalModel = model
        self.k = k
        self.index = VectorIndex(path)
        items = model.item_vectors().detach().float().cpu()
        ids, vectors = self.index.vectors()
        in_range = len(ids) == 0 or (ids.min() >= 0 and ids.max() < len(items))
        if (
            not in_range
            or vectors.shape[1] != items.shape[1]
            or not torch.allclose(
                torch.from_numpy(vectors), items[torch.from_numpy(ids)], rtol=1e-5, atol=1e-6
            )
        ):
            raise RecipeError(
                f"{path} does not hold this model's item vectors (written from another checkpoint?); "
                "write it again with `rex export-index RUN`",
                key="eval.evaluator.index",
            )
        self.num_items = len(items)

    @classmethod
    def for_metrics(cls, path: str, model: nn.Module, metric_names: list[str]) -> IndexRanker:
        """A ranker that keeps the top items the largest cut-off of ``metric_names`` needs."""
        cutoffs = [M.parse_metric_name(name)[1] or 1 for name in metric_names]
        return cls(path, model, max(cutoffs, default=1))

    def ranks(self, chunk: dict[str, Tensor], seen: Tensor | None) -> Tensor:
        """(B,) the 0-based rank of each row's target among the index's top ``k`` items for the
        row's ``user_vectors`` that are not in ``seen`` (B, S); ``num_items``, never a hit, for a
        target outside them."""
        return self.query_ranks(self.model.user_vectors(chunk), chunk["target"], seen)

    def query_ranks(self, queries: Tensor, target: Tensor, seen: Tensor | None) -> Tensor:
        """:meth:`ranks` for given ``queries`` (B, D) and ``target`` (B,): a multi-objective
        model's per-objective queries search the same index of its items."""
        from rex.eval.vector_index import retrieved_ranks

        vectors = queries.detach().float().cpu().numpy()
        excluded = seen.cpu().numpy() if seen is not None else np.zeros((len(vectors), 0), dtype=np.int64)
        # Over-fetch by the most items a row excludes, so k remain once they are dropped.
        retrieved = self.index.search(vectors, self.k + excluded.shape[1])
        ranks = retrieved_ranks(retrieved, target.cpu().numpy(), excluded, self.k, self.num_items)
        return torch.from_numpy(ranks)


def ranking_metrics(ranks: Tensor, names: list[str], num_items: int | None) -> dict[str, float]:
    """Each ``name@k`` averaged over the 0-based target ``ranks`` (B,)."""
    out = {}
    for name in names:
        metric, k = M.parse_metric_name(name)
        assert k is not None
        out[name] = float(M.RANKING_METRICS[metric](ranks, k, num_items).mean())
    return out


def trim_left_padding(history: Tensor) -> Tensor:
    """Drops the columns that are padding in every row: a chunk of short histories cut from a
    batch padded for a longer one is encoded at its own width."""
    used = (history != 0).any(dim=0).nonzero()
    return history[:, int(used[0]) :] if used.numel() else history[:, -1:]


@register("eval/click")
class ClickEvaluator(Evaluator):
    """AUC, gAUC and logloss of ``logit`` (B,) against ``label`` (B,) over a split's rows.

    gAUC groups the rows by ``user`` (B,). ``abundance``, the embedding-collapse measure, is
    the model's, not the rows': the mean information abundance of its fields' embedding
    matrices (a model with an ``embed`` field table, as model/ctr has).

    Opt-in, for multi-scenario data: ``sparse_auc`` is the AUC over the rows of sparse users,
    those with at most ``sparse_max`` interactions known before the row in its scenario (the
    row's ``history`` length: a history holds the user's earlier items of the row's scenario;
    ``data.max_len`` must exceed ``sparse_max``). ``scenarios`` names the scenario ids 1..S in
    order (``[beauty, sports]``); with it every CTR metric is also reported per scenario as
    ``METRIC:NAME`` (``auc:beauty``, ``gauc:sports``, ``sparse_auc:beauty``), over the rows whose
    field with role ``scenario`` holds that id. ``roles`` (role -> field) comes from the data.
    """

    reads = ("logit",)
    # How each CTR metric of the table is called: logloss takes probabilities, gauc the users,
    # sparse_auc the rows' history lengths.
    CALLS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, int], float]] = {
        "auc": lambda logit, label, user, known, most: M.auc(logit, label),
        "gauc": lambda logit, label, user, known, most: M.gauc(logit, label, user),
        "logloss": lambda logit, label, user, known, most: M.logloss(torch.sigmoid(logit), label),
        "sparse_auc": lambda logit, label, user, known, most: M.auc(
            logit[known <= most], label[known <= most]
        ),
    }

    def __init__(
        self,
        metrics: list[str],
        roles: dict[str, str],
        scenarios: list[str] | None = None,
        sparse_max: int = 5,
    ) -> None:
        self.metric_names = check_metrics(metrics, [*self.CALLS, "abundance"], "eval/click")
        if sparse_max < 0:
            raise ValueError(f"sparse_max must be >= 0, got {sparse_max}")
        self.sparse_max = sparse_max
        self.scenarios = list(scenarios or [])
        self.scenario_field = roles.get("scenario") if self.scenarios else None
        if self.scenarios and self.scenario_field is None:
            raise ValueError(
                "scenarios needs a data view with a field of role 'scenario' (amazon_multidomain's domain)"
            )
        if len(set(self.scenarios)) != len(self.scenarios):
            raise ValueError(f"scenarios must be distinct names, got {self.scenarios}")
        self.history_field = roles.get("history") if "sparse_auc" in metrics else None
        if "sparse_auc" in metrics and self.history_field is None:
            raise ValueError(
                "sparse_auc counts each row's history: it needs a view with a history field (ctr)"
            )
        self.reset()

    def reset(self) -> None:
        self._parts: list[tuple[Tensor, ...]] = []
        self._model: nn.Module | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        self._model = model
        logit = model(batch)["logit"].float()
        label, user = batch["label"], batch["user"]
        known = (batch[self.history_field] > 0).sum(1) if self.history_field else torch.zeros_like(user)
        scenario = batch[self.scenario_field] if self.scenario_field else torch.zeros_like(user)
        self._parts.append(tuple(t.cpu() for t in (logit, label, user, known, scenario)))

    def compute(self) -> dict[str, float]:
        logit, label, user, known, scenario = (
            gather_rows(torch.cat(part)) for part in zip(*self._parts, strict=True)
        )
        ctr = [name for name in self.metric_names if name in self.CALLS]
        out = {name: self.CALLS[name](logit, label, user, known, self.sparse_max) for name in ctr}
        if "abundance" in self.metric_names:
            out["abundance"] = field_abundance(self._model)
        out = {name: out[name] for name in self.metric_names}
        for code, scenario_name in enumerate(self.scenarios, start=1):
            rows = scenario == code
            for name in ctr:
                out[f"{name}:{scenario_name}"] = self.CALLS[name](
                    logit[rows], label[rows], user[rows], known[rows], self.sparse_max
                )
        return out


def field_abundance(model: nn.Module | None) -> float:
    """Mean information abundance of the fields' embedding matrices of ``model.embed``."""
    table = getattr(model, "embed", None)
    vocab = getattr(table, "vocab_sizes", None)
    if table is None or not isinstance(vocab, dict):
        raise ValueError("abundance needs a model with a field embedding table (model/ctr's embed)")
    weight = table.embedding.weight
    values = [
        M.information_abundance(table.lookup(name, torch.arange(size, device=weight.device)))
        for name, size in vocab.items()
    ]
    return sum(values) / len(values)
