"""A softmax router over experts (MMoE gate)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import register


@register("gate/router")
class SoftmaxRouter(nn.Module):
    """Mixes E expert outputs with softmax weights computed from a query.

    ``forward(query: (B, dim), experts: (B, E, dim)) -> (mixed (B, dim), weights (B, E))``;
    the weights of each row sum to 1. ``temperature`` divides the routing logits.
    """

    def __init__(self, dim: int, num_experts: int, temperature: float = 1.0) -> None:
        super().__init__()
        if dim <= 0 or num_experts <= 0:
            raise ValueError(f"dim and num_experts must be positive, got {dim}, {num_experts}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.num_experts = num_experts
        self.temperature = temperature
        self.logits = nn.Linear(dim, num_experts)

    def forward(self, query: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
        if experts.shape[1] != self.num_experts:
            raise ValueError(f"expected {self.num_experts} experts, got {experts.shape[1]}")
        weights = torch.softmax(self.logits(query) / self.temperature, dim=-1)
        return torch.einsum("be,bed->bd", weights, experts), weights
