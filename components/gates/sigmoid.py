"""A scalar sigmoid gate fusing two representations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import register


@register("gate/sigmoid")
class SigmoidGate(nn.Module):
    """``g * a + (1 - g) * b`` with one gate per row, ``g = sigmoid(w . [a, b] + c)``.

    ``forward(a: (..., dim), b: (..., dim)) -> (..., dim)``. The bias starts at 0 (g = 0.5 for
    inputs of zero mean): an even mix until training says otherwise.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.score = nn.Linear(2 * dim, 1)
        nn.init.zeros_(self.score.bias)

    def weight(self, a: Tensor, b: Tensor) -> Tensor:
        """The gate g in (0, 1): (..., 1)."""
        return torch.sigmoid(self.score(torch.cat([a, b], dim=-1)))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        g = self.weight(a, b)
        return g * a + (1 - g) * b
