"""Evaluation metrics: CTR metrics (AUC, gAUC, logloss) and leave-one-out ranking metrics.

Every function is vectorised torch (no Python loop over rows, users or groups) and works on CPU
tensors of any float dtype; internally scores are compared in their own dtype and statistics are
accumulated in float64.

CTR metrics take flat tensors and return a Python ``float``:

* :func:`auc` -- ROC-AUC from the Mann-Whitney U statistic with *average* ranks for tied scores,
  so a tie between a positive and a negative counts one half.
* :func:`gauc` -- per-group AUC averaged with the group's impression count as weight.
* :func:`logloss` -- mean binary cross-entropy with clipped probabilities.

Ranking metrics follow the leave-one-out protocol (one held-out target item per row):
:func:`target_rank` turns a ``(B, N)`` score matrix into a ``(B,)`` 0-based rank of the target,
and the ``*_at_k`` functions turn ranks into a per-row ``(B,)`` float tensor that the caller
averages. A metric named in a recipe as ``"ndcg@10"`` is split by :func:`parse_metric_name`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rex.config.registry import register
from rex.eval.names import METRICS, Metric, lower_is_better, parse_metric_name

__all__ = [
    "METRICS",
    "Metric",
    "RANKING_METRICS",
    "auc",
    "gauc",
    "hit_at_k",
    "logloss",
    "lower_is_better",
    "mrr_at_k",
    "ndcg_at_k",
    "parse_metric_name",
    "recall_at_k",
    "target_rank",
]


# --------------------------------------------------------------------------- helpers


def _flat(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.detach().reshape(-1)


def _same_length(**tensors: torch.Tensor) -> None:
    sizes = {name: t.numel() for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{n}={s}" for n, s in sizes.items())
        raise ValueError(f"inputs must have the same number of elements, got {shown}")


def _grouped_auc(
    scores: torch.Tensor, positive: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AUC of every group at once.

    Args:
        scores: ``(n,)`` float64, no NaN, ``n >= 1``.
        positive: ``(n,)`` bool.
        groups: ``(n,)`` integer group ids (any values).

    Returns:
        ``(auc, count, valid)``, each ``(G,)`` for the ``G`` distinct groups in ascending id
        order: the group's AUC (NaN where invalid), its number of rows (float64), and whether it
        holds both classes.
    """
    n = scores.numel()
    # Sort by (group, score): a stable sort on the secondary key, then on the primary key.
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    s, g, p = scores[order], groups[order], positive[order]

    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = g[1:] != g[:-1]
    # A run is a maximal block of equal scores inside one group.
    new_run = new_group.clone()
    new_run[1:] |= s[1:] != s[:-1]
    run_id = torch.cumsum(new_run, 0) - 1
    group_id = torch.cumsum(new_group, 0) - 1

    position = torch.arange(n, dtype=torch.float64)
    run_start = position[new_run]  # (R,) 0-based global index of each run's first row
    run_count = torch.bincount(run_id).to(torch.float64)  # (R,)
    group_start = position[new_group]  # (G,)
    # 1-based average rank within the group: the run covers global positions
    # run_start+1 .. run_start+count, whose mean is run_start + (count+1)/2.
    rank = (run_start + (run_count + 1) / 2)[run_id] - group_start[group_id]

    num_groups = group_start.numel()
    pf = p.to(torch.float64)
    count = torch.bincount(group_id, minlength=num_groups).to(torch.float64)
    n_pos = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_id, pf)
    rank_sum = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_id, rank * pf)
    n_neg = count - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    u = rank_sum - n_pos * (n_pos + 1) / 2  # Mann-Whitney U of the positives
    denom = torch.where(valid, n_pos * n_neg, torch.ones_like(n_pos))
    group_auc = torch.where(valid, u / denom, torch.full_like(u, math.nan))
    return group_auc, count, valid


# --------------------------------------------------------------------------- CTR metrics


@register("metric/auc")
def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC-AUC (Mann-Whitney U with average ranks for ties).

    Args:
        scores: ``(n,)`` scores or probabilities, any float dtype (any shape is flattened).
        labels: ``(n,)`` binary labels; a label ``> 0.5`` is positive.

    Returns:
        AUC in ``[0, 1]``. Tied scores get their average rank, so a positive tied with a
        negative counts one half and a constant scorer gets 0.5. Returns ``nan`` when the
        input is empty, holds a single class, or any score is NaN.
    """
    s = _flat("scores", scores)
    y = _flat("labels", labels)
    _same_length(scores=s, labels=y)
    if s.numel() == 0 or bool(torch.isnan(s).any()):
        return math.nan
    s64 = s.to(torch.float64)
    group_auc, _, valid = _grouped_auc(s64, y > 0.5, torch.zeros(s64.numel(), dtype=torch.long))
    return float(group_auc[0]) if bool(valid[0]) else math.nan


@register("metric/gauc")
def gauc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """Group AUC: per-group AUC averaged with each group's impression count as its weight.

    Args:
        scores: ``(n,)`` scores, any float dtype (any shape is flattened).
        labels: ``(n,)`` binary labels; a label ``> 0.5`` is positive.
        groups: ``(n,)`` integer group ids (usually user ids); need not be contiguous or sorted.

    Returns:
        ``sum_g n_g * AUC_g / sum_g n_g`` over the groups holding both classes, where ``n_g``
        is the group's number of rows and ``AUC_g`` uses average ranks for ties, as in
        :func:`auc`. Single-class groups are skipped (neither term counts them). Returns
        ``nan`` when no group is valid, the input is empty, or any score is NaN.
    """
    s = _flat("scores", scores)
    y = _flat("labels", labels)
    g = _flat("groups", groups)
    _same_length(scores=s, labels=y, groups=g)
    if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
        raise TypeError(f"groups must be an integer tensor, got {g.dtype}")
    if s.numel() == 0 or bool(torch.isnan(s).any()):
        return math.nan
    group_auc, count, valid = _grouped_auc(s.to(torch.float64), y > 0.5, g.to(torch.long))
    if not bool(valid.any()):
        return math.nan
    weight = count[valid]
    return float((weight * group_auc[valid]).sum() / weight.sum())


@register("metric/logloss")
def logloss(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy.

    Args:
        probs: ``(n,)`` predicted probabilities (not logits), any float dtype.
        labels: ``(n,)`` targets in ``[0, 1]``.
        eps: probabilities are clipped to ``[eps, 1 - eps]`` (in float64) so a confident wrong
            prediction costs ``-log(eps)`` instead of infinity.

    Returns:
        ``mean(-(y log p + (1 - y) log(1 - p)))``; ``nan`` for empty input.
    """
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    p = _flat("probs", probs)
    y = _flat("labels", labels)
    _same_length(probs=p, labels=y)
    if p.numel() == 0:
        return math.nan
    p64 = p.to(torch.float64).clamp(eps, 1 - eps)
    y64 = y.to(torch.float64)
    loss = -(y64 * torch.log(p64) + (1 - y64) * torch.log1p(-p64))
    return float(loss.mean())


# --------------------------------------------------------------------------- ranking metrics


def target_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target item among the row's items.

    Args:
        scores: ``(B, N)`` scores of ``N`` candidate items per row, any float dtype. Masked
            items (history, padding) carry ``-inf``.
        target: ``(B,)`` integer column index of the held-out item in each row.

    Returns:
        ``(B,)`` long: the number of *other* items whose score is strictly greater than the
        target's **plus the number of other items with an equal score**. Ties are resolved
        pessimistically, so a constant scorer ranks every target last (``N - 1``) instead of
        first; otherwise a model that outputs one value would look perfect. A ``-inf`` item
        never counts as ahead of a finite target. If the target's own score is ``-inf`` (or
        NaN) the rank is ``N``, one past the last position, so it is never a hit for
        ``k <= N`` (for ``k > N`` pass ``num_items`` to the ``*_at_k`` functions).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(
            f"scores must be a 2-D (B, N) tensor, got shape {tuple(getattr(scores, 'shape', ()))}"
        )
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.shape[0] != scores.shape[0]:
        raise ValueError(
            f"target must be a 1-D (B,) tensor with B={scores.shape[0]}, "
            f"got shape {tuple(getattr(target, 'shape', ()))}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor, got {target.dtype}")
    s = scores.detach()
    num_items = s.shape[1]
    t = target.to(torch.long)
    if t.numel() and (bool((t < 0).any()) or bool((t >= num_items).any())):
        raise ValueError(
            f"target indices must be in [0, {num_items}), got min {int(t.min())}, max {int(t.max())}"
        )
    target_score = s.gather(1, t.unsqueeze(1))  # (B, 1)
    # ">=" counts the target itself once; a -inf item is never >= a finite target score.
    # Counted as bytes into int32 (a row has far fewer than 2**31 items): summing bools into
    # int64 converts the whole (B, N) mask first and takes twice as long.
    rank = (s >= target_score).view(torch.uint8).sum(dim=1, dtype=torch.int32).long() - 1
    masked = torch.isneginf(target_score.squeeze(1)) | torch.isnan(target_score.squeeze(1))
    return torch.where(masked, torch.full_like(rank, num_items), rank)


def _check_k(k: int, num_items: int | None) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if num_items is not None:
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be a positive integer, got {num_items!r}")
        k = min(k, num_items)
    return k


def _ranks(ranks: torch.Tensor) -> torch.Tensor:
    if not isinstance(ranks, torch.Tensor) or ranks.dim() != 1:
        raise ValueError(f"ranks must be a 1-D (B,) tensor, got shape {tuple(getattr(ranks, 'shape', ()))}")
    return ranks.detach()


@register("metric/abundance")
def information_abundance(matrix: torch.Tensor) -> float:
    """Information abundance of an embedding matrix (Guo et al., ICML 2024, "On the Embedding
    Collapse When Scaling Up Recommendation Models"): the sum of its singular values over the
    largest, between 1 (rank one, fully collapsed) and ``min(n, d)`` (all directions equal).

    Args:
        matrix: ``(n, d)`` embedding rows.

    Returns:
        ``sum(sigma) / max(sigma)``; ``nan`` for an all-zero or empty matrix.
    """
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be (n, d), got shape {tuple(matrix.shape)}")
    sigma = torch.linalg.svdvals(matrix.detach().to(torch.float64))
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return math.nan
    return float(sigma.sum() / sigma[0])


@register("metric/hit")
def hit_at_k(ranks: torch.Tensor, k: int, num_items: int | None = None) -> torch.Tensor:
    """Hit rate @k per row.

    Args:
        ranks: ``(B,)`` 0-based target ranks from :func:`target_rank`.
        k: cut-off, ``>= 1``; a ``k`` larger than the item count is fine (every finite-ranked
            target is then a hit).
        num_items: optional item count ``N``; when given, ``k`` is capped at ``N`` so a masked
            target (rank ``N``) is never a hit even when ``k > N``.

    Returns:
        ``(B,)`` float (default dtype): 1 if ``rank < k`` else 0.
    """
    r = _ranks(ranks)
    k = _check_k(k, num_items)
    return (r < k).to(torch.get_default_dtype())


@register("metric/recall")
def recall_at_k(ranks: torch.Tensor, k: int, num_items: int | None = None) -> torch.Tensor:
    """Recall @k per row; with one target per row it equals :func:`hit_at_k`.

    Args:
        ranks: ``(B,)`` 0-based target ranks.
        k: cut-off, ``>= 1``.
        num_items: optional item count; caps ``k`` as in :func:`hit_at_k`.

    Returns:
        ``(B,)`` float: 1 if ``rank < k`` else 0.
    """
    return hit_at_k(ranks, k, num_items)


@register("metric/ndcg")
def ndcg_at_k(ranks: torch.Tensor, k: int, num_items: int | None = None) -> torch.Tensor:
    """NDCG @k per row for a single relevant item (the ideal DCG is 1).

    Args:
        ranks: ``(B,)`` 0-based target ranks.
        k: cut-off, ``>= 1``.
        num_items: optional item count; caps ``k`` as in :func:`hit_at_k`.

    Returns:
        ``(B,)`` float: ``1 / log2(rank + 2)`` if ``rank < k`` else 0.
    """
    r = _ranks(ranks)
    k = _check_k(k, num_items)
    gain = 1.0 / torch.log2(r.to(torch.float64) + 2)
    return torch.where(r < k, gain, torch.zeros_like(gain)).to(torch.get_default_dtype())


@register("metric/mrr")
def mrr_at_k(ranks: torch.Tensor, k: int, num_items: int | None = None) -> torch.Tensor:
    """Reciprocal rank @k per row (average it for MRR@k).

    Args:
        ranks: ``(B,)`` 0-based target ranks.
        k: cut-off, ``>= 1``.
        num_items: optional item count; caps ``k`` as in :func:`hit_at_k`.

    Returns:
        ``(B,)`` float: ``1 / (rank + 1)`` if ``rank < k`` else 0.
    """
    r = _ranks(ranks)
    k = _check_k(k, num_items)
    rr = 1.0 / (r.to(torch.float64) + 1)
    return torch.where(r < k, rr, torch.zeros_like(rr)).to(torch.get_default_dtype())


# --------------------------------------------------------------------------- the table's functions

# Each cut-off metric of the name table (rex.eval.names) and the function computing it.
RANKING_METRICS: dict[str, Callable[..., torch.Tensor]] = {
    name: globals()[metric.function] for name, metric in METRICS.items() if metric.cutoff
}
