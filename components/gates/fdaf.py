"""Diff-MSIN's Feature Dynamic Adaptive Fusion (FDAF)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import register


@register("gate/fdaf")
class FDAF(nn.Module):
    """Pairwise interaction between experts, target attention within each, then scoring.

    ``forward(experts: (B, E, L, dim), targets: (B, E, dim), mask: (B, L) bool True = valid)
    -> (B, E, score_dim)``.

    1. Interaction (the official ``cross_net``): ``x_e <- x_e + scale * mean_j (x_e * x_j)``,
       element-wise over every expert pair.
    2. Attention: each expert's target t_e weighs its positions,
       ``a_{e,l} = softmax_l(x_{e,l} . t_e / sqrt(dim))`` over valid positions.
    3. Scoring: ``s_e = sum_l a_{e,l} * MLP(x_{e,l} * t_e)``, a score vector per expert, so the
       output width does not depend on the history length.
    """

    def __init__(self, dim: int, score_dim: int = 8, hidden: int | None = None, scale: float = 0.1) -> None:
        super().__init__()
        if dim <= 0 or score_dim <= 0:
            raise ValueError(f"dim and score_dim must be positive, got {dim}, {score_dim}")
        self.scale = scale
        self.score_dim = score_dim
        self.score = nn.Sequential(
            nn.Linear(dim, hidden or 2 * dim), nn.ReLU(), nn.Linear(hidden or 2 * dim, score_dim)
        )

    def forward(self, experts: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        x = experts + self.scale * (experts.unsqueeze(2) * experts.unsqueeze(1)).mean(dim=2)
        t = targets.unsqueeze(2)  # (B, E, 1, dim)
        logits = (x * t).sum(-1) * x.shape[-1] ** -0.5  # (B, E, L)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, :], torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1)
        if mask is not None:
            weights = weights * mask[:, None, :].to(weights.dtype)  # an all-padding row scores 0
        return torch.einsum("bel,bels->bes", weights, self.score(x * t))
