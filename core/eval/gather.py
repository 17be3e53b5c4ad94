"""One split's evaluation state from every data-parallel process, so a metric is computed once
over the whole split, never averaged over shards (a mean of per-shard AUCs is not the AUC).

Outside a process group each function returns its input: single-process evaluation pays nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all(value: Any) -> list[Any]:
    parts: list[Any] = [None] * _world()
    # Pickled rather than padded tensors: shards differ in length, and any backend (gloo, nccl)
    # carries objects.
    dist.all_gather_object(parts, value)
    return parts


def gather_rows(rows: Tensor) -> Tensor:
    """Every process's ``rows`` (N_p, ...) concatenated in rank order: (sum N_p, ...)."""
    if _world() == 1:
        return rows
    return torch.cat(_all(rows.cpu()))


def sum_counts(*counts: float) -> tuple[float, ...]:
    """Each of ``counts`` summed over the processes."""
    if _world() == 1:
        return counts
    return tuple(sum(values) for values in zip(*_all(counts), strict=True))
