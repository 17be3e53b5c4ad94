"""Statistics of item code tuples: collisions and codebook usage (pure torch)."""

from __future__ import annotations

import torch
from torch import Tensor


def collision_ranks(codes: Tensor) -> Tensor:
    """(N, L) code tuples → (N,) long: how many earlier rows hold the same tuple.

    0 for the first row of each tuple and 1, 2, ... for the rows that collide with it, in row
    order; appended as a last code it makes every row unique (TIGER's extra code).
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, L), got shape {tuple(codes.shape)}")
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    order = torch.argsort(group, stable=True)
    grouped = group[order]
    first = torch.searchsorted(grouped, grouped)  # where each row's group starts in the sorted order
    ranks = torch.empty_like(group)
    ranks[order] = torch.arange(len(codes), device=codes.device) - first
    return ranks


def semantic_ids(codes: Tensor) -> Tensor:
    """(N, L) codes of items 1 .. N → (N + 1, L + 1) long semantic IDs as a tokenizer exports
    them: row 0 (padding) is -1; row i is item i's L codes and its :func:`collision_ranks`, so
    every item's row is unique (TIGER's extra code)."""
    rows = torch.cat([codes.long(), collision_ranks(codes)[:, None]], 1)
    return torch.cat([rows.new_full((1, rows.shape[1]), -1), rows])


def collision_rate(codes: Tensor) -> float:
    """Share of the (N, L) rows whose code tuple some other row also holds."""
    if len(codes) == 0:
        raise ValueError("collision_rate of no codes")
    _, group, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return float((counts[group] > 1).float().mean())


def codebook_usage(codes: Tensor, size: int) -> Tensor:
    """(L,) share of each level's ``size`` codes that the (N, L) rows use."""
    used = torch.zeros(codes.shape[1], size, dtype=torch.bool, device=codes.device)
    used.scatter_(1, codes.T, True)
    return used.float().mean(1)
