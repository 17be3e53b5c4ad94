"""USD: Uncertainty-aware Semantic Decoding (Yin et al., APWeb 2025, arXiv:2508.07210).

An inference-time transform of a model's item scores; nothing is trained. An evaluator that takes
a ``decoding`` (``eval/ranking``, ``eval/generative``) fits it once per evaluation on the model's
output tables and then passes every score matrix through it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rex.components.clustering.kmeans import BalancedKMeans
from rex.config.registry import register


@register("decoding/usd")
class UncertaintyAwareSemanticDecoding:
    """USD: items with similar logit vectors form semantic groups; mass is shared within a group,
    and the entropy across groups sets the temperature.

    ``fit(tables)`` takes one (V_t, D) float table per decoding step, the vectors whose dot
    products with a hidden state are that step's logits (SASRec: its item embeddings, one step;
    TIGER: level t's code embeddings, one step per level). Since an item's logit for any user is
    h · e_item, items with close e_item have close logit vectors over all users, so clustering
    the table (``cluster``, balanced k-means, k groups per step; one vector per group for a step of
    at most k vectors) groups items by logit vector.

    ``__call__(scores (..., V_t), step) -> (..., V_t)`` float64, for each row of scores:

    1. ``p = softmax(scores / temperature)`` over the finite entries (-inf stays excluded);
    2. group masses ``P_g = sum_{i in g} p_i``; uncertainty ``u = H(P) / log G`` in [0, 1], the
       entropy across the G groups of the table, normalised;
    3. the row's temperature ``T = temperature * exp(entropy_weight * u)``, and
       ``q = softmax(scores / T)``, whose group masses ``Q_g`` are taken likewise;
    4. redistribution within each group: ``q'_i = (1 - mix) q_i + mix * Q_g / n_g``, where n_g
       counts the group's finite entries, so each group keeps its mass and its members' scores
       move toward each other;
    5. the returned scores are ``log q'`` (-inf where the input was -inf).

    The abstract leaves the exact formulas open; this is the simplest reading that keeps both
    purposes: a group's members share mass (an item in a likely group rises above an isolated
    item of similar score), and cross-group entropy sets the temperature, which changes the
    ranking through step 4 (a flatter q gives the group mean more weight) and, in beam search,
    how much each step's uncertain beams count against confident ones. Nothing is sampled in
    evaluation: the "sampling temperature" is the temperature of the distribution ranked.
    ``entropy_weight`` may be negative (an uncertain row is sharpened instead). With ``mix = 0``
    and ``entropy_weight = 0`` the scores are a log-softmax of the input, so every row's ranking
    is unchanged; with one item per group step 4 is the identity and the ranking is unchanged
    for any ``entropy_weight``.
    """

    def __init__(
        self,
        *,
        mix: float = 0.5,
        entropy_weight: float = 1.0,
        temperature: float = 1.0,
        cluster: BalancedKMeans,
    ) -> None:
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not math.isfinite(entropy_weight):
            raise ValueError(f"entropy_weight must be a finite number, got {entropy_weight}")
        self.cluster = cluster
        self.mix = mix
        self.entropy_weight = entropy_weight
        self.temperature = temperature
        self.groups: list[Tensor] = []

    def fit(self, tables: list[Tensor]) -> None:
        """Groups (V_t,) long in [0, k) for each step's (V_t, D) table; a table of at most k
        vectors (TIGER's short disambiguation level, say) puts each vector in its own group."""
        self.groups = []
        for step, table in enumerate(tables):
            if table.dim() != 2 or not len(table):
                raise ValueError(
                    f"decoding/usd needs (V, D) output tables, step {step}'s is {tuple(table.shape)}"
                )
            if len(table) <= self.cluster.k:
                self.groups.append(torch.arange(len(table), device=table.device))
            else:
                self.groups.append(self.cluster.fit(table.float().cpu()).to(table.device))

    def __call__(self, scores: Tensor, step: int = 0) -> Tensor:
        if step >= len(self.groups):
            raise ValueError(f"decoding/usd was fitted on {len(self.groups)} step(s), asked for step {step}")
        groups = self.groups[step].to(scores.device)
        if scores.shape[-1] != len(groups):
            raise ValueError(
                f"decoding/usd: step {step} scores {scores.shape[-1]} entries, its table {len(groups)}"
            )
        shape, count = scores.shape, int(groups.max()) + 1
        # float64 throughout: q underflows far later, and a temperature > 1 would otherwise round
        # near-equal float32 scores into ties.
        x = scores.double().reshape(-1, shape[-1])
        finite = torch.isfinite(x)
        u = self.uncertainty(x / self.temperature, groups, count)
        temperature = self.temperature * torch.exp(self.entropy_weight * u)[:, None]
        q = torch.softmax((x / temperature).masked_fill(~finite, -torch.inf), dim=-1).nan_to_num(0.0)
        mass = _group_sum(q, groups, count)
        members = _group_sum(finite.float(), groups, count).clamp_min(1.0)
        shared = (mass / members)[:, groups]
        mixed = (1.0 - self.mix) * q + self.mix * shared
        return mixed.log().masked_fill(~finite, -torch.inf).reshape(shape)

    @staticmethod
    def uncertainty(logits: Tensor, groups: Tensor, count: int) -> Tensor:
        """(R, V) logits → (R,) entropy of softmax's group masses over ``count`` groups, / log(count)."""
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        mass = _group_sum(p, groups, count)
        entropy = -(mass * mass.clamp_min(1e-30).log()).sum(dim=-1)
        return entropy / math.log(count) if count > 1 else torch.zeros_like(entropy)


def _group_sum(values: Tensor, groups: Tensor, count: int) -> Tensor:
    """(R, V) values → (R, count) sums over each group's columns."""
    return values.new_zeros(len(values), count).index_add_(1, groups, values)
