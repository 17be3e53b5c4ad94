"""DCN-V2's cross network (Wang et al., WWW 2021, arXiv:2008.13535)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import register


@register("interaction/cross")
class CrossNetwork(nn.Module):
    """Explicit bounded-degree feature crosses over the flattened field embeddings, as a logit.

    Input ``(B, F, d)`` field embeddings, flattened to ``x0`` of width ``D = F * d``; each of the
    ``layers`` cross layers computes ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``, so layer ``l``
    holds crosses up to degree ``l + 1``. ``W_l`` is a full ``D x D`` matrix, or with ``rank``
    the low-rank ``U_l V_l^T`` of the paper's cost-efficient variant. Output ``(B,)``: a linear
    head over ``x_L``. Beside ``model/ctr``'s MLP tower, whose logit it is added to, this is
    DCN-V2's parallel structure (one linear layer over ``[x_L; h_deep]`` is the sum of two).
    ``num_fields`` and ``dim`` are supplied by the parent.
    """

    def __init__(self, num_fields: int, dim: int, layers: int = 3, rank: int | None = None) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be a positive integer or null (full rank), got {rank}")
        width = num_fields * dim
        self.crosses = nn.ModuleList(
            nn.Linear(width, width)
            if rank is None
            else nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))
            for _ in range(layers)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, emb: Tensor) -> Tensor:
        x0 = emb.flatten(1)
        x = x0
        for cross in self.crosses:
            x = torch.addcmul(x, x0, cross(x))
        return self.head(x).squeeze(-1)
