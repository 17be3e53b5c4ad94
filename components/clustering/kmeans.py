"""Balanced K-means over item vectors, for grouping items offline."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rex.components.checks import at_least
from rex.config.registry import register


@register("cluster/kmeans")
class BalancedKMeans:
    """Balanced K-means: ``fit(vectors: (N, d) float) -> labels: (N,) long in [0, k)``.

    k-means++ seeding from a seeded generator, then Lloyd iterations whose assignment step is
    capacity-constrained: no cluster takes more than ``ceil(N / k)`` points, so one dense region
    cannot swallow most of the items (DMGIN groups behaviours by cluster, and a giant group would
    defeat the grouping). Each round, every unassigned point proposes to its nearest cluster that
    still has room, and each cluster accepts its closest proposers up to its remaining capacity.
    Deterministic for a given seed. Not an ``nn.Module``: it has no trainable state.
    """

    def __init__(self, k: int, iters: int = 30, seed: int = 2024) -> None:
        at_least(1, k=k, iters=iters)
        self.k = k
        self.iters = iters
        self.seed = seed

    def _seeds(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """k-means++: each next centre drawn with probability proportional to squared distance."""
        centres = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
        closest = torch.cdist(x, centres[0][None]).squeeze(1) ** 2
        for _ in range(1, self.k):
            weights = closest if closest.sum() > 0 else torch.ones_like(closest)
            pick = torch.multinomial(weights, 1, generator=generator)
            centres.append(x[pick].squeeze(0))
            closest = torch.minimum(closest, torch.cdist(x, x[pick]).squeeze(1) ** 2)
        return torch.stack(centres)

    def assign(self, x: Tensor, centres: Tensor) -> Tensor:
        """Capacity-constrained nearest-centre labels (N,) for points ``x`` (N, d)."""
        n, k = len(x), len(centres)
        distance = torch.cdist(x, centres)
        room = torch.full((k,), math.ceil(n / k), dtype=torch.long)
        labels = torch.full((n,), -1, dtype=torch.long)
        while (labels < 0).any():
            pending = torch.nonzero(labels < 0).squeeze(1)
            d = distance[pending].masked_fill((room == 0)[None, :], float("inf"))
            best, choice = d.min(dim=1)
            # Closest proposers first within each cluster: sort by distance, then stably by cluster.
            by_distance = torch.argsort(best, stable=True)
            order = by_distance[torch.argsort(choice[by_distance], stable=True)]
            chosen = choice[order]
            first = torch.searchsorted(chosen, chosen, right=False)
            rank = torch.arange(len(order)) - first
            accept = rank < room[chosen]
            labels[pending[order[accept]]] = chosen[accept]
            room -= torch.bincount(chosen[accept], minlength=k)
        return labels

    def fit(self, vectors: Tensor) -> Tensor:
        x = vectors.detach().double()
        if x.dim() != 2 or len(x) < self.k:
            raise ValueError(f"need an (N, d) array with N >= k = {self.k}, got shape {tuple(x.shape)}")
        generator = torch.Generator().manual_seed(self.seed)
        centres = self._seeds(x, generator)
        labels = self.assign(x, centres)
        for _ in range(self.iters):
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=self.k).clamp_min(1)
            centres = sums / counts[:, None].to(x.dtype)
            updated = self.assign(x, centres)
            if torch.equal(updated, labels):
                break
            labels = updated
        return labels
