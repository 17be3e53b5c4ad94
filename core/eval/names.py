"""The metric table: every metric a recipe may name, how its name is read, which way is better.

Kept apart from :mod:`rex.eval.metrics` (the functions, which need torch) so that reading and
validating a recipe (`rex show`, `rex validate`'s first pass) never imports torch. Each row names
its function in :mod:`rex.eval.metrics`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One row of the metric table.

    ``function`` names the function of :mod:`rex.eval.metrics` that computes it, or is None for
    statistics that their evaluator computes itself (a tokenizer's codebook usage, a beam
    search's invalid beams); ``cutoff`` metrics are written ``name@k``.
    """

    function: str | None
    cutoff: bool = False
    lower_is_better: bool = False


METRICS: dict[str, Metric] = {
    "auc": Metric("auc"),
    "gauc": Metric("gauc"),
    "logloss": Metric("logloss", lower_is_better=True),
    # AUC over the rows of users with few interactions before the row (eval/click's sparse_max).
    "sparse_auc": Metric("auc"),
    # Mean over a CTR model's fields of their embedding matrices' information abundance.
    "abundance": Metric("information_abundance"),
    "hit": Metric("hit_at_k", cutoff=True),
    "recall": Metric("recall_at_k", cutoff=True),
    "ndcg": Metric("ndcg_at_k", cutoff=True),
    "mrr": Metric("mrr_at_k", cutoff=True),
    "recon_mse": Metric(None, lower_is_better=True),
    "codebook_usage": Metric(None),
    "collision_rate": Metric(None, lower_is_better=True),
    "invalid_beams": Metric(None, lower_is_better=True),
    "duplicate_beams": Metric(None, lower_is_better=True),
}


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of the metric named ``name`` (``logloss``, ``ndcg@10``) is better."""
    return METRICS[parse_metric_name(name)[0]].lower_is_better


_K_PATTERN = re.compile(r"[0-9]+")


def parse_metric_name(name: str) -> tuple[str, int | None]:
    """Split a metric name from a recipe into ``(metric, k)``.

    ``"ndcg@10" -> ("ndcg", 10)``; CTR metrics take no cut-off: ``"auc" -> ("auc", None)``.

    Raises:
        ValueError: for an unknown metric, a ranking metric without ``@k``, a CTR metric with
            one, or a ``k`` that is not a positive integer.
    """
    if not isinstance(name, str):
        raise ValueError(f"metric name must be a string such as 'ndcg@10', got {name!r}")
    text = name.strip()
    base, sep, k_text = text.partition("@")
    known = sorted(METRICS)
    if base not in METRICS:
        close = difflib.get_close_matches(base, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(
            f"unknown metric {name!r}{hint}; known: {', '.join(known)} "
            "(ranking metrics take @k, e.g. ndcg@10)"
        )
    if not METRICS[base].cutoff:
        if sep:
            raise ValueError(f"metric {base!r} takes no @k cut-off, got {name!r}; write {base!r}")
        return base, None
    if not sep:
        raise ValueError(f"ranking metric {base!r} needs a cut-off: write e.g. '{base}@10', got {name!r}")
    if not _K_PATTERN.fullmatch(k_text):
        raise ValueError(f"invalid cut-off in {name!r}: @k must be a positive integer, e.g. '{base}@10'")
    k = int(k_text)
    if k < 1:
        raise ValueError(f"invalid cut-off in {name!r}: k must be >= 1")
    return base, k
