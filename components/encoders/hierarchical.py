"""DMGIN's grouped history encoder: a transformer within each item group, then one across groups."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import Factory, register


@register("encoder/hierarchical")
class HierarchicalEncoder(nn.Module):
    """Long history → one vector per item group, in temporal order (DMGIN's IGIEM + inter-group).

    ``forward(x: (B, L, dim), groups: (B, L) long in [0, num_groups), mask: (B, L) bool,
    True = valid) -> (groups_out: (B, K, dim), group_mask: (B, K) bool, True = non-empty)``
    with ``K = num_groups``. Rows are left-padded (the last column is the most recent item).

    1. Intra-group: each group's ``max_per_group`` most recent items, in time order, go through
       ``intra`` (a non-causal ``encoder/transformer``); the group vector is the mean over them.
    2. Statistics: ``log(1 + count)`` and the recency of the group's last item (0 = the most
       recent position, 1 = the oldest) are projected to ``dim`` and added.
    3. Inter-group: groups are ordered by their last occurrence, oldest first and empty groups
       as left padding, and ``inter`` runs over that sequence (skipped when ``inter`` is null).
    """

    def __init__(
        self,
        dim: int,
        num_groups: int,
        intra: Factory[nn.Module],
        inter: Factory[nn.Module] | None = None,
        max_per_group: int = 16,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_groups <= 0 or max_per_group <= 0:
            raise ValueError(
                f"dim, num_groups and max_per_group must be positive, got {dim}, {num_groups}, {max_per_group}"
            )
        self.dim = dim
        self.num_groups = num_groups
        self.max_per_group = max_per_group
        self.intra = intra(dim=dim)
        self.inter = inter(dim=dim) if inter is not None else None
        self.stats = nn.Linear(2, dim)

    def _slots(self, groups: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per position: keep (B, L) bool and slot (B, L) in its group's window; counts (B, K)."""
        b, length = groups.shape
        k, p = self.num_groups, self.max_per_group
        positions = torch.arange(length, device=groups.device).expand(b, length)
        # Sort each row by (group, position); padding sorts after every group.
        key = torch.where(mask, groups, k) * (length + 1) + positions
        order = key.argsort(dim=1)
        sorted_groups = torch.where(mask, groups, k).gather(1, order)
        counts = torch.zeros(b, k + 1, dtype=torch.long, device=groups.device).scatter_add_(
            1, sorted_groups, torch.ones_like(sorted_groups)
        )
        starts = counts.cumsum(1) - counts
        within = torch.arange(length, device=groups.device) - starts.gather(1, sorted_groups)
        from_end = counts.gather(1, sorted_groups) - 1 - within  # 0 = the group's most recent item
        keep_sorted = (sorted_groups < k) & (from_end < p)
        keep = torch.zeros_like(mask).scatter(1, order, keep_sorted)
        slot = torch.zeros_like(groups).scatter(1, order, p - 1 - from_end)
        return keep, slot, counts[:, :k]

    def forward(self, x: Tensor, groups: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        b, length, dim = x.shape
        k, p = self.num_groups, self.max_per_group
        keep, slot, counts = self._slots(groups, mask)
        rows, cols = keep.nonzero(as_tuple=True)
        windows = x.new_zeros(b, k, p, dim).index_put(
            (rows, groups[rows, cols], slot[rows, cols]), x[rows, cols]
        )
        filled = torch.zeros(b, k, p, dtype=torch.bool, device=x.device).index_put(
            (rows, groups[rows, cols], slot[rows, cols]), torch.ones_like(rows, dtype=torch.bool)
        )
        group_mask = counts > 0
        # Only non-empty groups go through the intra-group transformer.
        present = group_mask.nonzero(as_tuple=True)
        encoded = self.intra(windows[present], ~filled[present])  # (G, P, dim), zeros at padding
        size = filled[present].sum(1, keepdim=True).clamp_min(1).to(x.dtype)
        pooled = x.new_zeros(b, k, dim).index_put(present, encoded.sum(1) / size)

        positions = torch.arange(length, device=x.device).expand(b, length)
        last = torch.full((b, k), -1, dtype=torch.long, device=x.device).scatter_reduce(
            1, torch.where(mask, groups, 0), torch.where(mask, positions, -1), reduce="amax"
        )
        recency = (length - 1 - last).to(x.dtype) / max(length - 1, 1)
        stats = torch.stack([torch.log1p(counts.to(x.dtype)), recency], dim=-1)
        pooled = (pooled + self.stats(stats)) * group_mask.unsqueeze(-1).to(x.dtype)

        # Temporal order of groups by last occurrence; empty groups (last = -1) come first.
        order = last.argsort(dim=1, stable=True)
        ordered = pooled.gather(1, order.unsqueeze(-1).expand(b, k, dim))
        ordered_mask = group_mask.gather(1, order)
        if self.inter is not None:
            ordered = self.inter(ordered, ~ordered_mask)
        return ordered, ordered_mask
